"""Tunnels for unmodified TCP applications (asyncio glue over :mod:`meshd.tunnel`).

- :mod:`.service` — :class:`TunnelService`: the registry (persisted), the API, cutting sites;
- :mod:`.owner` — the exposed services' side: accepting data connections, allow-lists, targets;
- :mod:`.consumer` — ``connect``: the local listener and the raced data connection;
- :mod:`.carrier` — one data connection's pump between its records and its local streams;
- :mod:`.local` — one local TCP connection with its flow control;
- :mod:`.routes` — the control API's tunnel routes.
"""
