"""The typed client of a local daemon's control socket (synchronous, standard library only).

The CLI is a thin caller of this class; applications use it through ``meshd.connect()``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from typing import Any, Iterator
from urllib.parse import quote

from meshd.local import api
from meshd.errors import ChannelClosed, DaemonNotRunning, LocalError, MeshdError, RemoteError
from meshd.state.home import Home, resolve_home


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        """Connects within the timeout.  A unix socket with a timeout is non-blocking, and its
        ``connect`` fails at once with EAGAIN while the daemon's accept backlog is full (a burst
        of clients, or a daemon busy for a moment): that is waited out, not reported."""
        deadline = time.monotonic() + (self.timeout or 30.0)
        pause = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._path)
            except BlockingIOError:
                sock.close()
                if time.monotonic() + pause > deadline:
                    raise socket.timeout(f"the daemon's control socket {self._path} accepted"
                                         " no connection in time (its backlog is full)") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            return


class Client:
    """Calls one daemon's control API. Every method raises a MeshdError subclass on failure."""

    def __init__(self, home: str | os.PathLike[str] | None = None, timeout: float = 30.0) -> None:
        self.home = Home(resolve_home(home))
        self.home.check_socket_room()  # else every call fails with "AF_UNIX path too long"
        self.timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def _not_running(self) -> DaemonNotRunning:
        return DaemonNotRunning(f"no meshd daemon is running for {self.home.root}; start one"
                                f" with: meshd run --home {self.home.root}", reason="not-running")

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              timeout: float | None = None) -> Any:
        sock_path = self.home.socket_path
        conn = _UnixConnection(str(sock_path), timeout or self.timeout)
        try:
            try:
                payload = None if body is None else json.dumps(body)
                headers = {"Content-Type": "application/json"} if payload is not None else {}
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
                raise self._not_running() from None
            except socket.timeout:
                raise LocalError(f"the daemon did not answer {path} within"
                                 f" {timeout or self.timeout:.0f} s", reason="timeout") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                raise LocalError(f"the daemon closed the connection before it answered {path}"
                                 " (it stopped or restarted?); if it runs again, run the command"
                                 " again", reason="disconnected") from None
        finally:
            conn.close()
        if resp.headers.get_content_type() != "application/json":
            if resp.status >= 400:
                raise MeshdError(f"daemon answered {resp.status}", reason="http")
            return data.decode()
        try:
            out = json.loads(data)
        except json.JSONDecodeError:
            raise MeshdError("the daemon answered with invalid JSON", reason="http") from None
        if resp.status >= 400:
            err = out.get("error", {}) if isinstance(out, dict) else {}
            if resp.status == api.GONE:
                raise ChannelClosed(str(err.get("message", "the channel ended")),
                                    reason=str(err.get("reason", "failed")))
            cls = RemoteError if resp.status == 502 else LocalError if resp.status == 400 else MeshdError
            raise cls(str(err.get("message", f"HTTP {resp.status}")),
                      reason=str(err.get("reason", "error")))
        return out

    def status(self) -> dict[str, Any]:
        return self._call("GET", api.STATUS)  # type: ignore[no-any-return]

    def invite(self, *, name: str = "", expires: float | None = None, uses: int = 1,
               role: str = "member", approve: bool = False) -> dict[str, Any]:
        return self._call("POST", api.INVITES, {"name": name, "expires": expires, "uses": uses,  # type: ignore[no-any-return]
                                                "role": role, "approve": approve})

    def join(self, text: str) -> dict[str, Any]:
        return self._call("POST", api.JOINS, {"text": text})  # type: ignore[no-any-return]

    def join_state(self, join_id: str, *, wait: float = 0.0, state: str | None = None) -> dict[str, Any]:
        query = f"?wait={wait}" + (f"&state={quote(state)}" if state else "")
        return self._call("GET", f"{api.JOINS}/{quote(join_id)}{query}",  # type: ignore[no-any-return]
                          timeout=self.timeout + wait)

    def pending(self) -> list[dict[str, Any]]:
        return self._call("GET", api.PENDING)  # type: ignore[no-any-return]

    def approve(self, fingerprint: str) -> dict[str, Any]:
        return self._call("POST", api.APPROVE, {"fingerprint": fingerprint})  # type: ignore[no-any-return]

    def deny(self, fingerprint: str) -> dict[str, Any]:
        return self._call("POST", api.DENY, {"fingerprint": fingerprint})  # type: ignore[no-any-return]

    def peers(self, *, discovered: bool = False, revoked: bool = False) -> list[dict[str, Any]]:
        """Members with their verified records; with ``discovered``, daemons seen on the LAN;
        with ``revoked``, the sites shut out of the mesh."""
        query = "?discovered=1" if discovered else "?revoked=1" if revoked else ""
        return self._call("GET", api.PEERS + query)  # type: ignore[no-any-return]

    def revoke(self, site: str, reason: str = "") -> dict[str, Any]:
        return self._call("POST", api.REVOKE, {"site": site, "reason": reason})  # type: ignore[no-any-return]

    def events(self, *, history: bool = True) -> Iterator[dict[str, Any]]:
        """Membership events as they happen (after the recent history, unless ``history`` is
        False); runs until the daemon stops or the caller stops iterating."""
        conn = _UnixConnection(str(self.home.socket_path), None)  # type: ignore[arg-type]
        try:
            try:
                conn.request("GET", api.EVENTS + ("" if history else "?history=0"))
                resp = conn.getresponse()
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
                raise self._not_running() from None
            while True:
                line = resp.readline()
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()

    def rotate(self) -> dict[str, Any]:
        """Retire this site's key and hand its membership to a new one."""
        return self._call("POST", api.ROTATE, {})  # type: ignore[no-any-return]

    def stop(self) -> dict[str, Any]:
        """Ask the daemon to stop gracefully (as SIGTERM does); it answers before it stops.
        Raises MeshdError with reason ``stopping`` if it is stopping already."""
        return self._call("POST", api.STOP, {})  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self._call("GET", api.METRICS)  # type: ignore[no-any-return]

    # -- channels (the streaming API in meshd.app.streams builds on these) ------------------------------

    def channels(self) -> list[dict[str, Any]]:
        """Channels at this site: outgoing, incoming and relayed."""
        return self._call("GET", api.CHANNELS)  # type: ignore[no-any-return]

    def open_sender(self, name: str, to: str, paths: list[str] | None = None,
                    handover: bool = False) -> dict[str, Any]:
        """``handover``: ask to take the data connection (the answer's ``handover`` is the
        hand-over socket's path if granted, else null)."""
        return self._call("POST", api.CHANNELS, {"name": name, "to": to,  # type: ignore[no-any-return]
                                                 "paths": paths, "handover": handover})

    def attach_ring(self, channel_id: str, path: str) -> dict[str, Any]:
        """Hand a sender's shared-memory ring (a file path) to the daemon; ``{"ring": bool}``."""
        return self._call("POST", f"{api.CHANNELS}/{quote(channel_id)}/ring",  # type: ignore[no-any-return]
                          {"ring": path})

    def flush_sender(self, channel_id: str, messages: int,
                     timeout: float | None = None) -> dict[str, Any]:
        return self._call("POST", f"{api.CHANNELS}/{quote(channel_id)}/flush",  # type: ignore[no-any-return]
                          {"messages": messages, "timeout": timeout},
                          timeout=None if timeout is None else timeout + 5)

    def close_sender(self, channel_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"{api.CHANNELS}/{quote(channel_id)}")  # type: ignore[no-any-return]

    def open_receiver(self, name: str, allow: list[str] | None = None,
                      ring_bytes: int = 0, handover: bool = False,
                      rejoin: bool = False, claim: str | None = None) -> dict[str, Any]:
        """``handover``: ask to take the channels' data connections (the answer's ``handover``
        is the hand-over socket's path and ``port`` the receiver's token if granted);
        ``rejoin``: a receiver coming back to its restarted daemon, which must not take the
        name from a receiver opened meanwhile (LocalError ``conflict``), unless that one was
        opened with the same ``claim`` (a random token of the receiver: its own earlier try)."""
        return self._call("POST", api.RECEIVERS, {"name": name, "allow": allow,  # type: ignore[no-any-return]
                                                  "ring_bytes": ring_bytes,
                                                  "handover": handover, "rejoin": rejoin,
                                                  "claim": claim})

    def close_receiver(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"{api.RECEIVERS}/{quote(name, safe='')}")  # type: ignore[no-any-return]


    # -- tunnels ------------------------------------------------------------------------------

    def expose(self, name: str, target: str, allow: list[str],
               update: bool = False) -> dict[str, Any]:
        """Expose ``target`` (``HOST:PORT``) as ``name`` to the sites in ``allow`` (``["*"]``:
        every member)."""
        return self._call("POST", api.SERVICES, {"name": name, "target": target,  # type: ignore[no-any-return]
                                                 "allow": allow, "update": update})

    def unexpose(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"{api.SERVICES}/{quote(name, safe='')}")  # type: ignore[no-any-return]

    def services(self, *, remote: bool = False) -> list[dict[str, Any]]:
        """What this site exposes; with ``remote``, what the other members expose to it."""
        return self._call("GET", api.SERVICES + ("?remote=1" if remote else ""))  # type: ignore[no-any-return]

    def connect_tunnel(self, site: str, name: str, listen: str | None = None) -> dict[str, Any]:
        """Listen on ``listen`` (``[ADDR:]PORT``; default 127.0.0.1, a free port) for the
        service ``name`` of ``site``."""
        return self._call("POST", api.TUNNELS, {"site": site, "name": name, "listen": listen})  # type: ignore[no-any-return]

    def disconnect_tunnel(self, site: str, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"{api.TUNNELS}/{quote(site, safe='')}/{quote(name, safe='')}")  # type: ignore[no-any-return]

    def tunnels(self) -> list[dict[str, Any]]:
        return self._call("GET", api.TUNNELS)  # type: ignore[no-any-return]
