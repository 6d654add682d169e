"""The ``tunl`` messages daemons exchange about services, and the text forms the tunnel
registry takes (``HOST:PORT``, ``[ADDR:]PORT``, ``SITE/NAME``) (pure).

``tunl`` messages travel one way over the membership links, like ``chan`` messages, as
``{"t": "tunl", "id": 0, "op": OP, "b": BODY}`` with BODY a msgpack map:

==========  ==================================  ==============================================
op          body                                meaning
==========  ==================================  ==============================================
``svc?``    ``{"q": 8 B}``                      which services do you expose to me?
``svc``     ``{"q": 8 B, "names": [str, ...]}``  these (only those whose allow-list names the
                                                asker); ``q`` echoes the query
==========  ==================================  ==============================================

:func:`decode` raises :class:`~meshd.errors.ProtocolError` on anything malformed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import msgpack

from meshd.errors import LocalError, ProtocolError

from .codec import check_service

PEER_TYPE = "tunl"
MAX_LISTED = 256
"""Most service names one ``svc`` answer carries."""


@dataclass(frozen=True, slots=True)
class ServicesQuery:
    query: bytes


@dataclass(frozen=True, slots=True)
class ServicesReport:
    query: bytes
    names: tuple[str, ...]


TunnelMessage = ServicesQuery | ServicesReport


def peer_message(msg: TunnelMessage) -> dict[str, Any]:
    body: dict[str, Any]
    if isinstance(msg, ServicesQuery):
        op, body = "svc?", {"q": msg.query}
    else:
        op, body = "svc", {"q": msg.query, "names": list(msg.names[:MAX_LISTED])}
    return {"t": PEER_TYPE, "id": 0, "op": op, "b": msgpack.packb(body, use_bin_type=True)}


def decode(op: str, body: bytes) -> TunnelMessage:
    try:
        msg = msgpack.unpackb(body, raw=False, max_bin_len=64, max_str_len=4096,
                              max_array_len=MAX_LISTED, max_map_len=4)
    except Exception:
        raise ProtocolError(f"{op}: undecodable body", reason="malformed") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("q"), bytes) or len(msg["q"]) != 8:
        raise ProtocolError(f"{op}: malformed body", reason="malformed")
    if op == "svc?":
        return ServicesQuery(msg["q"])
    if op == "svc":
        names = msg.get("names")
        if not isinstance(names, list):
            raise ProtocolError("svc: names missing", reason="malformed")
        try:
            return ServicesReport(msg["q"], tuple(check_service(n) for n in names))
        except ValueError:
            raise ProtocolError("svc: a bad service name", reason="malformed") from None
    raise ProtocolError(f"unknown tunnel operation {op!r}", reason="type")


# -- text forms --------------------------------------------------------------------------------

def _host_error(host: str) -> str | None:
    """Why ``host`` is not an IP address or an ASCII DNS name (labels of 1-63 letters, digits,
    ``-`` or ``_``; 253 characters in all), or None.  Non-ASCII names are refused rather than
    IDNA-encoded: the resolver would turn ``１２７.0.0.1`` into ``127.0.0.1``, so the target
    shown would not be the one dialed."""
    if ":" in host:
        return "is not an IPv4 address or a host name (an IPv6 address goes in [brackets])"
    if not host.isascii() or len(host) > 253 or not all(
            0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
            for label in host.split(".")):
        return ("is not a host name (ASCII letters, digits, '-' and '_' in labels of 1-63,"
                " separated by single dots) or an address")
    return None


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 5


def parse_address(text: str, *, default_host: str | None = None,
                  allow_port_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (IPv4, ``[IPv6]`` or a DNS name; with ``default_host``, ``PORT`` alone)
    as ``(host, port)``; LocalError ``bad-address`` naming the problem."""
    text = text.strip()
    if default_host is not None and _is_port(text):
        host, port_text = default_host, text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise LocalError(f"{text!r} is not HOST:PORT", reason="bad-address")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise LocalError(f"{text!r}: {host!r} is not an IPv6 address",
                             reason="bad-address") from None
    elif (why := _host_error(host)) is not None:
        raise LocalError(f"{text!r}: {host!r} {why}", reason="bad-address")
    if not _is_port(port_text) or not (0 if allow_port_zero else 1) <= int(port_text) <= 65535:
        raise LocalError(f"{text!r}: the port must be a number from"
                         f" {0 if allow_port_zero else 1} to 65535", reason="bad-address")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_ref(text: str) -> tuple[str, str]:
    """``SITE/NAME`` as ``(site, name)``; LocalError ``usage`` if it is not that form."""
    site, sep, name = text.partition("/")
    if not sep or not site or not name:
        raise LocalError(f"{text!r} is not SITE/NAME", reason="usage")
    try:
        return site, check_service(name)
    except ValueError as exc:
        raise LocalError(str(exc), reason="bad-name") from None
