"""The daemon's settings: one typed dataclass, a docstring per field, written as commented TOML.

``meshd init`` writes ``config.toml`` into the state directory with every field and its meaning;
``meshd run`` reads it back.  Unknown keys and wrong types are refused with the field's name.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from meshd.errors import LocalError
from meshd.state.files import write_atomic

DEFAULT_PORT = 4750


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of one site's daemon."""

    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    """The one inbound TCP port for all peer traffic, as HOST:PORT ("" for a site that can only
    dial out). Port 0 picks a free port at start and advertises it."""

    advertise: list[str] = field(default_factory=list)
    """Addresses other sites should dial, as HOST:PORT. Empty: the listen address, or, when it
    listens on 0.0.0.0, every non-loopback IPv4 address of this host with the listen port."""

    sync_interval: float = 60.0
    """Seconds between full exchanges of signed objects with one random member. Changes are
    pushed to every member at once and also ride on the membership protocol's push-pull, so
    this is only a backstop."""

    request_timeout: float = 5.0
    """Seconds to wait for a peer's answer before calling it unreachable."""

    invite_expiry: float = 72 * 3600.0
    """Default lifetime of an invitation in seconds (``meshd invite --expires`` overrides)."""

    vouch_lifetime: float = 0.0
    """How long a membership granted by this site lasts, in seconds (0: until revoked). Vouches
    are not renewed yet, so a lifetime ends the membership, and that of sites admitted through it."""

    join_failure_base: float = 1.0
    """Throttle for wrong join secrets: after n failures from one source address it must wait
    join_failure_base * 2**(n-1) seconds (capped at join_failure_cap) before trying again."""

    join_failure_cap: float = 300.0
    """Longest wait imposed on a source that keeps sending wrong join secrets, in seconds."""

    discovery: bool = True
    """Advertise this site and look for others on the LAN with zeroconf (mDNS). A member seen
    there is also dialed at its LAN address; anyone else is only listed."""

    discovery_interfaces: list[str] = field(default_factory=list)
    """IPv4 addresses of the interfaces for mDNS. Empty: the listen address's interface when it
    listens on one address, otherwise every interface."""

    relay: bool = True
    """Forward other members' channels through this site when they cannot reach each other
    (it sees only ciphertext). Only a site others can dial is useful as a relay."""

    paths: list[str] = field(default_factory=lambda: ["direct", "reversed", "relay"])
    """Which paths this site's outgoing channels may take: any of direct (we dial the
    receiver), reversed (the receiver dials us) and relay (both dial a third member)."""

    channel_window_bytes: int = 64 << 20
    """Memory per channel, in bytes: payload a receiving site holds for its application, and
    what a sending site keeps for resending until acknowledged. At least 17 MiB (one largest
    message of 16 MiB plus framing)."""

    channel_window_messages: int = 4096
    """Most batches of messages a receiving site holds per channel before the sender waits."""

    channel_give_up: float = 60.0
    """Seconds a sending channel may go without any path to its receiver before it ends and its
    application's next send, flush or close raises ChannelClosed (reason ``no-path``); what the
    receiver has not acknowledged is then dropped. 0: retry for ever."""

    channel_wait_limit: float = 600.0
    """Seconds a receiving channel waits without a connection for its sender to resume it
    before it ends and its receiver gets ChannelClosed (reason ``failed``): the sender gave up
    (its own channel_give_up) or never existed. 0: wait for ever. Keep it longer than the
    channel_give_up of the sites that send to this one."""

    channel_handover: bool = True
    """Hand each outgoing channel's data connection and keys to the sending application, which
    then seals and sends the data itself (the daemon keeps choosing and resuming the path).
    False: every channel's data goes through this daemon. An application can also ask for the
    daemon path per channel (``mesh.sender(..., via_daemon=True)``)."""

    tunnel_streams_per_site: int = 4096
    """Most TCP connections one member may hold open at once to the services this site
    exposes to it (all of them together); a new one beyond is reset (``busy``), so that one
    member cannot take every open file of the daemon from the others."""

    reach_interval: float = 60.0
    """Seconds between checks of which members can dial this site (each member is asked to
    dial us back at our advertised addresses; re-checked sooner when members change)."""

    log_level: str = "info"
    """One of debug, info, warning, error."""

    def __post_init__(self) -> None:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise LocalError(f"config: log_level must be debug, info, warning or error,"
                             f" not {self.log_level!r}", reason="config")
        for name in ("sync_interval", "request_timeout", "invite_expiry", "join_failure_base",
                     "join_failure_cap", "vouch_lifetime"):
            if not math.isfinite(getattr(self, name)):
                raise LocalError(f"config: {name} must be a finite number", reason="config")
        for name in ("sync_interval", "request_timeout", "invite_expiry", "join_failure_base",
                     "join_failure_cap"):
            if getattr(self, name) <= 0:
                raise LocalError(f"config: {name} must be positive", reason="config")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if not (low <= value <= high or (value == 0 and name in ZERO_MEANS_NEVER)):
                raise LocalError(f"config: {name} must be from {low:g} to {high:g}"
                                 + (" (or 0: never)" if name in ZERO_MEANS_NEVER else "")
                                 + f", not {value:g}", reason="config")
        for address in self.discovery_interfaces:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise LocalError(f"config: discovery_interfaces holds {address[:60]!r}, not an"
                                 " IPv4 address", reason="config") from None
        bad = [p for p in self.paths if p not in ("direct", "reversed", "relay")]
        if bad or not self.paths:
            raise LocalError(f"config: paths must name some of direct, reversed, relay, not"
                             f" {self.paths!r}", reason="config")
        if self.channel_window_bytes < 17 << 20:
            raise LocalError("config: channel_window_bytes must be at least 17 MiB (17825792)",
                             reason="config")
        if self.channel_window_messages < 1:
            raise LocalError("config: channel_window_messages must be at least 1", reason="config")
        if not (math.isfinite(self.channel_give_up) and self.channel_give_up >= 0):
            raise LocalError("config: channel_give_up must be 0 (never) or a positive number of"
                             " seconds", reason="config")
        if not (math.isfinite(self.channel_wait_limit) and self.channel_wait_limit >= 0):
            raise LocalError("config: channel_wait_limit must be 0 (never) or a positive number"
                             " of seconds", reason="config")
        if not (math.isfinite(self.reach_interval) and self.reach_interval > 0):
            raise LocalError("config: reach_interval must be a positive number", reason="config")
        if self.listen:
            check_listen(self.listen)
        for address in self.advertise:
            check_listen(address, allow_port_zero=False)
        if self.vouch_lifetime < 0:
            raise LocalError("config: vouch_lifetime must be >= 0", reason="config")


BOUNDS: dict[str, tuple[float, float]] = {
    "sync_interval": (0.1, 1e6),
    "request_timeout": (0.1, 3600.0),
    "invite_expiry": (1.0, 1e9),
    "join_failure_base": (0.001, 86400.0),
    "join_failure_cap": (0.001, 1e7),
    "vouch_lifetime": (1.0, 1e10),
    "reach_interval": (0.1, 1e6),
    "channel_give_up": (0.1, 1e9),
    "channel_wait_limit": (0.1, 1e9),
    "channel_window_bytes": (17 << 20, 1 << 40),
    "channel_window_messages": (1, 1 << 20),
    "tunnel_streams_per_site": (1, 1 << 20),
}
"""The range of each number setting.  Below it a timer fires all the time (an interval of
1e-9 s kept a core busy); above it a number no longer fits the timers or the 64-bit fields of
the channel protocol."""
ZERO_MEANS_NEVER = frozenset({"vouch_lifetime", "channel_give_up", "channel_wait_limit"})


_HOST_RE = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]|\*")


def check_listen(text: str, *, allow_port_zero: bool = True) -> str:
    """Validate ``HOST:PORT`` (an IPv4 address, ``[IPv6]``, a DNS name or ``*``); returns it,
    or raises LocalError naming what is wrong."""
    host, sep, port = text.rpartition(":")
    low = 0 if allow_port_zero else 1
    if not sep or not _HOST_RE.fullmatch(host) or not (port.isascii() and port.isdigit()) \
            or not low <= int(port) <= 65535:
        raise LocalError(f"address {text!r} must be HOST:PORT with a port {low}..65535",
                         reason="usage")
    return text


def _field_docs() -> dict[str, str]:
    """Field docstrings, read from this module's source (they are not kept at run time)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Config))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML-safe
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def render(config: Config) -> str:
    """The commented TOML text of ``config``: every field with its documentation."""
    import textwrap

    docs = _field_docs()
    out = ["# meshd daemon settings. Edit, then restart `meshd run`.", ""]
    for f in fields(config):
        for line in textwrap.wrap(docs.get(f.name, ""), 96):
            out.append(f"# {line}")
        if f.name in BOUNDS:
            low, high = BOUNDS[f.name]
            out.append(f"# Range: {low:g} to {high:g}"
                       + (" (or 0)." if f.name in ZERO_MEANS_NEVER else "."))
        out.append(f"{f.name} = {_toml_value(getattr(config, f.name))}")
        out.append("")
    return "\n".join(out)


def load(path: Path) -> Config:
    """Read ``config.toml``; a missing file gives the defaults."""
    if not path.exists():
        return Config()
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LocalError(f"config: {path} is not valid TOML: {exc}", reason="config") from None
    except OSError as exc:
        raise LocalError(f"config: cannot read {path}: {exc.strerror or exc}",
                         reason="config") from None
    known = {f.name: f for f in fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise LocalError(f"config: unknown setting {key!r} in {path}", reason="config")
        default = getattr(Config(), key)
        expected: type | tuple[type, ...] = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, expected) or isinstance(value, bool) != isinstance(default, bool):
            raise LocalError(f"config: {key} in {path} must be a {type(default).__name__}",
                             reason="config")
        if isinstance(default, float):
            try:
                value = float(value)  # type: ignore[arg-type]
            except OverflowError:
                raise LocalError(f"config: {key} in {path} must be a finite number",
                                 reason="config") from None
        if isinstance(default, list) and not all(isinstance(v, str) for v in value):
            raise LocalError(f"config: {key} in {path} must be a list of strings", reason="config")
        kwargs[key] = value
    return Config(**kwargs)


def save(path: Path, config: Config) -> None:
    """Write ``config`` as commented TOML (atomically, mode 0600; StateError if the disk
    refuses)."""
    write_atomic(path, render(config).encode(), "the config")


def replace(config: Config, **changes: Any) -> Config:
    """A copy of ``config`` with ``changes`` applied and validated."""
    return dataclasses.replace(config, **changes)
