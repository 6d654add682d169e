"""Dialing a data connection to another daemon (asyncio glue)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from meshd.daemon.channels.connection import DataConnection

__all__ = ["dial", "dial_any"]


async def dial(address: str, *, timeout: float,
               on_lost: Callable[[DataConnection], None] | None = None) -> DataConnection:
    """Open a data connection to ``HOST:PORT``; OSError (or TimeoutError) on failure."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: DataConnection(on_lost), host, int(port)), timeout)
    return proto


async def dial_any(addresses: list[str], *, timeout: float,
                   on_lost: Callable[[DataConnection], None] | None = None
                   ) -> tuple[DataConnection, str, float]:
    """Dial each address in turn; the connection, the address and the connect time."""
    if not addresses:
        raise OSError("no address to dial (the site only dials out)")
    loop = asyncio.get_running_loop()
    errors = []
    for address in addresses:
        t0 = loop.time()
        try:
            conn = await dial(address, timeout=timeout, on_lost=on_lost)
            return conn, address, loop.time() - t0
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            errors.append(f"{address}: {exc or type(exc).__name__}")
    raise OSError("; ".join(errors))
