"""The per-site daemon: wiring of the trust store, the peer port and the control socket.

One asyncio process per site.  It owns the site key, the SQLite trust store and the verified
``MeshView``; it answers peers on its one inbound port (or none, for a site that can only dial
out), exchanges signed objects with members (pushed at once on a change, and pulled from one
random member every ``sync_interval``), runs joins for ``meshd join`` and serves the local
control API.  Decisions live in ``admission``, ``mesh`` and ``trust``; this module moves data
between them and the sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from meshd.trust import records
from meshd.trust import tokens
from meshd import __version__
from meshd.state import config as config_mod
from meshd.state.admission import Admissions
from meshd.daemon.channels.service import ChannelService
from meshd.state.config import Config
from meshd.daemon.discovery import Discovery, Sighting
from meshd.errors import (
    JoinRefused,
    LocalError,
    MeshdError,
    RecordError,
    RemoteError,
    StateError,
    TokenError,
)
from meshd.state.home import Home
from meshd.trust.identity import SiteKey, curve_public_of, fingerprint_of, site_id_of
from meshd.daemon.membership import MembershipService
from meshd.state.view import MeshView
from meshd.peer.dialer import Dialer, Unreachable
from meshd.peer.server import PeerInfo, PeerServer
from meshd.trust.records import Revocation, SiteRecord, Vouch
from meshd.state.site import SiteKeys
from meshd.state.store import Store

log = logging.getLogger("meshd")


@dataclass(slots=True)
class Contact:
    """What this site saw of its exchanges with one member."""

    last_ok: float | None = None
    last_fail: float | None = None
    error: str | None = None


@dataclass(slots=True)
class JoinAttempt:
    """A join this site is making, as the control API reports it."""

    id: str
    invitation: tokens.Invitation
    state: str = "connecting"
    inviter_name: str | None = None
    error: dict[str, str] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def set(self, state: str, **changes: Any) -> None:
        self.state = state
        for k, v in changes.items():
            setattr(self, k, v)
        self.changed.set()
        self.changed = asyncio.Event()


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed big blocks for reuse (False where that is not glibc).

    A channel allocates a frame of up to 16 MiB per message and frees it once acknowledged.
    By default glibc maps blocks that big afresh and trims the heap as they are freed, so each
    frame's pages are faulted in and zeroed by the kernel again: measured, that made the sending
    daemon spend about as long in page faults as in AES-GCM.  With the thresholds raised, freed
    frames are reused; the cost is that the daemon's heap stays at its peak (bounded by the
    channel windows, see docs/performance.md) instead of shrinking after a burst."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold,
                                                                     1 << 30))


def advertised_addresses(cfg: Config, bound: str | None) -> list[str]:
    """The addresses to put in this site's record (see ``Config.advertise``)."""
    if cfg.advertise:
        return list(cfg.advertise)
    if bound is None:
        return []
    host, _, port = bound.rpartition(":")
    if host not in ("0.0.0.0", "*", "[::]"):
        return [bound]
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and not ip.ip.startswith("127."):
                out.append(f"{ip.ip}:{port}")
    return out[:8] or [f"127.0.0.1:{port}"]


class Daemon:
    """One site's running daemon."""

    def __init__(self, home: Home, *, now: float | None = None) -> None:
        home.require()
        self.home = home
        self.config = config_mod.load(home.config_path)
        self.keys = SiteKeys(SiteKey.load(home.key_path))
        self.store = Store(home.db_path)
        name = self.store.get_meta("name")
        if not isinstance(name, str):
            raise StateError(f"{home.db_path} has no site name; was `meshd init` interrupted?",
                             reason="not-initialised")
        self.name = name
        self.view = MeshView(self.store, self.keys)
        self.view.load(int(now if now is not None else time.time()))
        self.admissions = Admissions(self.store, self.view, self.keys, self.config)
        self.contacts: dict[bytes, Contact] = {}
        self.joins: dict[str, JoinAttempt] = {}
        self.counters: dict[str, int] = {}
        self.bound: str | None = None
        self.addrs: list[str] = []
        self._ctx: zmq.asyncio.Context | None = None
        self.server: PeerServer | None = None
        self.dialer: Dialer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self._rng = random.Random()
        self.discovery: Discovery | None = None
        self.membership = MembershipService(self)
        self.membership.subscribe(self._on_member_event)
        self.channels = ChannelService(self)
        self._known_members: frozenset[bytes] = frozenset()
        self._known_revoked: frozenset[bytes] = frozenset()

    @property
    def key(self) -> SiteKey:
        return self.keys.key

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        from meshd.daemon.control import ControlServer

        self._ctx = zmq.asyncio.Context()
        curve = self.key.curve_keypair()
        self.dialer = Dialer(self._ctx, curve, on_message=self._on_link_message)
        if self.config.listen:
            self.server = PeerServer(self._ctx, curve, self._on_peer,
                                     on_other=self.channels.accept)
            self.bound = await self._bind(self.server, self.config.listen)
        self.addrs = advertised_addresses(self.config, self.bound)
        self.admissions.recover(self._now())
        self._refresh_own_record()
        if self.config.discovery:
            await self._start_discovery()
        self.control = ControlServer(self)
        await self.control.start(self.home.socket_path)
        self.home.pid_path.write_text(f"{os.getpid()}\n")
        self._known_members = frozenset(self.view.members)
        self._known_revoked = self.view.revoked
        self.membership.start()
        self.channels.start()
        self._spawn(self._sync_loop(), "sync-loop")
        log.info("site %s (%s, fingerprint %s) running; peer port %s; control %s",
                 self.name, self.key.site_id, self.key.fingerprint, self.bound or "none (dial-out only)",
                 self.home.socket_path)
        if self.view.mesh_id is not None:
            log.info("member of mesh %s (%s) with %d members", self.view.mesh_name,
                     self.view.mesh_id.hex(), len(self.view.members))
            self.announce()

    async def _start_discovery(self) -> None:
        interfaces = list(self.config.discovery_interfaces)
        host = self.bound.rpartition(":")[0] if self.bound else ""
        if not interfaces and host and host not in ("0.0.0.0", "*"):
            interfaces = [host]
        self.discovery = Discovery(
            name=self.name, key=self.key.public, mesh_id=self.view.mesh_id,
            port=int(self.bound.rpartition(":")[2]) if self.bound else None,
            addresses=[a.rpartition(":")[0] for a in self.addrs], interfaces=interfaces or None,
            on_sighting=self._on_sighting)
        try:
            await self.discovery.start()
        except OSError as exc:
            log.warning("LAN discovery is off: %s", exc)
            self.discovery = None

    def _on_sighting(self, sighting: Sighting) -> None:
        if self.view.is_member(sighting.key) and sighting.key not in self.contacts:
            self._spawn(self.sync_with(sighting.key), "sync-discovered")

    def dial_addresses(self, key: bytes) -> list[str]:
        """Where to dial a member: LAN addresses seen by discovery first, then its record's."""
        out: list[str] = []
        if self.discovery is not None and (s := self.discovery.sightings.get(key)) is not None:
            out += s.addrs
        rec = self.view.record_of(key)
        if rec is not None:
            out += [a for a in rec.addrs if a not in out]
        return out

    async def _bind(self, server: PeerServer, listen: str) -> str:
        """Bind the peer port; with port 0, prefer the port picked last time, so that addresses
        in records and tokens stay valid across restarts."""
        host, _, port = listen.rpartition(":")
        last = self.store.get_meta("last_port")
        if port == "0" and isinstance(last, int):
            try:
                return await server.start(f"{host}:{last}")
            except OSError:
                log.info("port %d used last time is taken; picking another", last)
        bound = await server.start(listen)
        self.store.set_meta("last_port", int(bound.rpartition(":")[2]))
        return bound

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        try:
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        if self.membership.core is not None and self.view.mesh_id is not None:
            self.membership.leave()
            deadline = time.monotonic() + 1.0
            while not self.membership.core.leave_done and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.membership.close()
        await self.channels.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if getattr(self, "control", None) is not None:
            await self.control.stop()
        if self.discovery is not None:
            await self.discovery.close()
        if self.server is not None:
            await self.server.close()
        if self.dialer is not None:
            self.dialer.close()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        self.store.close()
        self.home.pid_path.unlink(missing_ok=True)
        log.info("stopped; state flushed")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    @staticmethod
    def _now() -> int:
        return int(time.time())

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- this site's own record --------------------------------------------------------------------

    def _refresh_own_record(self) -> bool:
        """Sign a new own record when name or addresses changed; True if one was made."""
        mesh_id = self.view.mesh_id
        if mesh_id is None:
            return False
        held = self.view.record_of(self.key.public)
        addrs = tuple(self.addrs)
        reachable = self.bound is not None
        if held is not None and (held.name, held.addrs, held.reachable) == (self.name, addrs, reachable):
            return False
        seq = max(held.seq if held else 0, self.store.get_int("own_seq")) + 1
        self.store.set_meta("own_seq", seq)
        signed = records.sign(SiteRecord(self.key.public, mesh_id, self.name, addrs, reachable,
                                         seq, self._now()), self.key)
        self.view.add_own(signed, self._now())
        return True

    def _own_record_for(self, mesh_id: bytes) -> records.Signed:
        seq = self.store.get_int("own_seq") + 1  # kept only once admitted
        return records.sign(SiteRecord(self.key.public, mesh_id, self.name, tuple(self.addrs),
                                       self.bound is not None, seq, self._now()), self.key)

    # -- peers ------------------------------------------------------------------------------------

    def _on_link_message(self, msg: dict[str, Any], server_curve: bytes) -> None:
        """A one-way message that came back on a link we dialed."""
        key = self.view.by_curve.get(server_curve)
        if key is None or msg["t"] not in ("swim", "chan", "sync"):
            self.count("peer_refused_not_member" if key is None else "peer_unexpected")
            return
        self._contact(key, ok=True)
        if msg["t"] == "chan":
            self.channels.on_control(key, msg["op"], msg["b"])
        elif msg["t"] == "sync":  # a member we cannot dial pushed its news (see ``announce``)
            if msg["mesh"] == self.view.mesh_id:
                self._log_ingest(self.view.ingest(msg["items"], self._now()), key)
        else:
            self.membership.deliver(msg["m"], key)

    def _on_member_event(self, event: dict[str, Any]) -> None:
        if event["type"] in ("joined", "alive"):  # a member to check reachability with now
            self.channels.on_members_changed()

    async def send_to_member(self, key: bytes, msg: dict[str, Any]) -> bool:
        """A one-way message to a member: over the connection it keeps to us if there is one,
        else over a link we dial.  False when there is no way to send it."""
        curve = curve_public_of(key)
        if self.server is not None and await self.server.push(curve, msg):
            return True
        if self.dialer is not None and self.dial_addresses(key):
            return await self.dialer.send(curve, self.dial_addresses(key), msg)
        return False

    def on_mesh_change(self) -> None:
        """Follow changes of the member set: new members to the membership core, revoked ones
        cut off (their links closed, their connections to us refused from now on)."""
        members, revoked = frozenset(self.view.members), self.view.revoked
        if members == self._known_members and revoked == self._known_revoked:
            self.membership.sync_blobs()  # a newer record, say: the core carries it from now on
            self.channels.on_members_changed()  # maybe with new addresses
            return
        for key in members - self._known_members:
            self.membership.emit("admitted", key)
        for key in revoked - self._known_revoked:
            log.info("%s (%s) is revoked; cutting it off", self.view.name_of(key),
                     site_id_of(key))
            self.membership.emit("revoked", key)
        for key in self._known_members - members:  # revoked, or its key retired by a rotation
            curve = curve_public_of(key)
            if self.dialer is not None:
                self.dialer.forget(curve)
            if self.server is not None:
                self.server.routes.pop(curve, None)
        self._known_members, self._known_revoked = members, revoked
        self.membership.sync_members()
        self.channels.on_members_changed()

    async def _on_peer(self, msg: dict[str, Any], info: PeerInfo) -> dict[str, Any] | None:
        now = self._now()
        kind = msg["t"]
        self.count(f"peer_requests_{kind}")
        if kind == "join":
            if msg["inviter"] != self.key.public:
                return await self._forward_join(msg, info.address, now)
            source = info.address
            before = self.admissions.admitted
            forwarded = info.curve_key in self.view.by_curve  # an alternate passing a join on
            reply = self.admissions.handle_join(msg, info.curve_key, source, now,
                                                forwarded=forwarded)
            if self.admissions.admitted != before:
                log.info("admitted a new site (fingerprint %s)", reply.get("joiner_fp"))
                self.announce()
            elif reply.get("status") == "pending":
                log.info("join from %s waits for approval: meshd approve %s", source,
                         reply.get("joiner_fp"))
            return reply
        key = self.view.by_curve.get(info.curve_key)
        if key is None:
            self.count("peer_refused_not_member")
            raise RemoteError("this site does not know you as a member of its mesh",
                              reason="not-member")
        self._contact(key, ok=True)
        if self.server is not None:
            self.server.routes[info.curve_key] = info.route
        if kind == "swim":
            self.membership.deliver(msg["m"], key)
            return None
        if kind == "chan":
            self.channels.on_control(key, msg["op"], msg["b"])
            return None
        if kind == "sync":
            if msg["mesh"] != self.view.mesh_id:
                raise RemoteError("sync for another mesh", reason="wrong-mesh")
            result = self.view.ingest(msg["items"], now)
            self._log_ingest(result, key)
            return {"t": "ok", "items": self.view.snapshot()}
        raise RemoteError(f"unsupported request {kind!r}", reason="type")

    async def _forward_join(self, msg: dict[str, Any], source: str, now: int) -> dict[str, Any]:
        """An alternate named in a token passes a join on to the inviter (it sees only a proof).

        The alternate throttles the joiner's address as the inviter would, since the inviter
        sees only the alternate's."""
        self.admissions.check_throttle(source, now)
        inviter = msg["inviter"]
        rec = self.view.record_of(inviter)
        if rec is None or not self.view.is_member(inviter) or self.dialer is None:
            raise JoinRefused("this site cannot forward the join: it does not know the inviter",
                              reason="unknown")
        fwd = {k: v for k, v in msg.items() if k != "id"}
        try:
            reply, _ = await self.dialer.request(curve_public_of(inviter), list(rec.addrs), fwd,
                                                 self.config.request_timeout)
        except Unreachable as exc:
            raise JoinRefused(f"the inviter is unreachable from this alternate: {exc}",
                              reason="unreachable") from None
        self.count("joins_forwarded")
        if reply["t"] == "error" and reply["reason"] in ("unknown", "bad-secret", "bad-record"):
            self.admissions.throttle.failure(source, now)
        return {k: v for k, v in reply.items() if k != "id"}

    def _log_ingest(self, result: Any, key: bytes) -> None:
        if result.stored:
            self.count("records_stored", result.stored)
            self.on_mesh_change()
        for reason, n in result.refused.items():
            self.count(f"records_refused_{reason.replace('-', '_')}", n)
            log.warning("refused %d signed object(s) from %s: %s", n,
                        self.view.name_of(key) or site_id_of(key), reason)

    def _contact(self, key: bytes, *, ok: bool, error: str | None = None) -> None:
        c = self.contacts.setdefault(key, Contact())
        if ok:
            c.last_ok, c.error = time.time(), None
        else:
            c.last_fail, c.error = time.time(), error

    async def sync_with(self, key: bytes) -> bool:
        """One push-pull exchange with a member; True if it answered."""
        addrs = self.dial_addresses(key)
        if not addrs or self.dialer is None or self.view.mesh_id is None:
            return False
        msg = {"t": "sync", "mesh": self.view.mesh_id, "items": self.view.snapshot()}
        try:
            reply, _ = await self.dialer.request(curve_public_of(key), addrs, msg,
                                                 self.config.request_timeout)
        except Unreachable as exc:
            self._contact(key, ok=False, error=str(exc))
            return False
        if reply["t"] == "error":
            self._contact(key, ok=False, error=reply["message"])
            log.warning("%s refused sync: %s", self.view.name_of(key), reply["message"])
            return False
        self._contact(key, ok=True)
        result = self.view.ingest(reply.get("items", []), self._now())
        self._log_ingest(result, key)
        return True

    def announce(self) -> None:
        """Push our signed objects to every member, now: an exchange with each member we can
        dial, a one-way push over its own connection to each member that only dials out."""
        self.on_mesh_change()
        self.membership.start()
        push: dict[str, Any] | None = None  # one snapshot for every member that only dials out
        for key in list(self.view.members):
            if key == self.key.public:
                continue
            if self.dial_addresses(key):
                self._spawn(self.sync_with(key), "announce")
            elif self.view.mesh_id is not None:
                if push is None:
                    push = {"t": "sync", "mesh": self.view.mesh_id, "items": self.view.snapshot()}
                self._spawn(self.send_to_member(key, push), "announce-push")

    async def _sync_loop(self) -> None:
        while True:
            interval = self.config.sync_interval
            await asyncio.sleep(interval * (0.5 + self._rng.random()))
            if self._expiry_passed():  # a vouch lapsed: membership changes with the clock
                self.view.load(self._now())
                self.on_mesh_change()
            others = [k for k in self.view.members if k != self.key.public
                      and self.dial_addresses(k)]
            if others:
                try:
                    await self.sync_with(self._rng.choice(others))
                except Exception:  # one bad round must not end anti-entropy for good
                    log.exception("a sync round failed")

    def _expiry_passed(self) -> bool:
        now = self._now()
        return any(0 < m.expires <= now for m in self.view.members.values())

    # -- joining another mesh -------------------------------------------------------------------------

    def start_join(self, text: str) -> JoinAttempt:
        """Check a pasted invitation and start redeeming it; errors come back at once."""
        inv = tokens.parse(text)
        try:
            for key in (inv.inviter_key, *(alt.key for alt in inv.alternates)):
                curve_public_of(key)
        except ValueError:
            raise TokenError("the invitation names a key that is not a valid site key; ask for a"
                             " new invitation", reason="malformed") from None
        tokens.check_expiry(inv, time.time())
        if inv.inviter_key == self.key.public:
            raise TokenError("this invitation was issued by this very site", reason="own-token")
        if self.view.mesh_id is not None:
            if self.view.mesh_id == inv.mesh_id:
                raise TokenError(f"this site is already a member of mesh {self.view.mesh_name}",
                                 reason="member")
            if len(self.view.members) > 1:
                raise TokenError(
                    f"the invitation is for another mesh ({inv.mesh_id.hex()[:12]}…) than the one"
                    f" this site belongs to ({self.view.mesh_name}, {self.view.mesh_id.hex()[:12]}…)",
                    reason="wrong-mesh")
        for attempt in self.joins.values():
            if attempt.invitation == inv and attempt.state in ("connecting", "pending"):
                return attempt
        attempt = JoinAttempt(secrets.token_hex(8), inv)
        self.joins[attempt.id] = attempt
        self._spawn(self._run_join(attempt), f"join-{attempt.id}")
        return attempt

    async def _run_join(self, attempt: JoinAttempt) -> None:
        inv = attempt.invitation
        assert self.dialer is not None
        record = self._own_record_for(inv.mesh_id)
        msg = {"t": "join", "mesh": inv.mesh_id, "invite": inv.invite_id,
               "inviter": inv.inviter_key, "record": record.raw,
               "proof": tokens.join_proof(inv.secret, mesh_id=inv.mesh_id,
                                          inviter_key=inv.inviter_key, joiner_key=self.key.public)}
        routes = [(inv.inviter_key, [str(a) for a in inv.addrs])]
        routes += [(alt.key, [str(a) for a in alt.addrs]) for alt in inv.alternates]
        deadline = time.monotonic() + 24 * 3600
        try:
            while time.monotonic() < deadline:
                reply = await self._ask_any(routes, msg)
                if reply["t"] == "error":
                    attempt.set("failed", error={"reason": reply["reason"],
                                                 "message": reply["message"]})
                    return
                attempt.inviter_name = reply.get("inviter_name")
                if reply.get("status") == "pending":
                    if attempt.state != "pending":
                        attempt.set("pending")
                    await asyncio.sleep(1.0)
                    continue
                if reply.get("status") == "admitted":
                    self._complete_join(inv, reply, record)
                    attempt.set("admitted")
                    return
                attempt.set("failed", error={"reason": "protocol",
                                             "message": "the inviter's answer made no sense"})
                return
        except MeshdError as exc:
            attempt.set("failed", error={"reason": exc.reason, "message": exc.message})

    async def _ask_any(self, routes: list[tuple[bytes, list[str]]],
                       msg: dict[str, Any]) -> dict[str, Any]:
        assert self.dialer is not None
        failures = []
        for key, addrs in routes:
            try:
                reply, _ = await self.dialer.request(curve_public_of(key), addrs, msg,
                                                     self.config.request_timeout)
                return reply
            except Unreachable as exc:
                failures.append(str(exc))
        raise Unreachable("could not reach the inviter or any alternate: " + "; ".join(failures))

    def _complete_join(self, inv: tokens.Invitation, reply: dict[str, Any],
                       record: records.Signed) -> None:
        now = self._now()
        vouch = records.decode(reply.get("vouch", b""), now=now, mesh_id=inv.mesh_id,
                               kinds=("vouch",))
        body = vouch.body
        assert isinstance(body, Vouch)
        if body.subject != self.key.public or body.voucher != inv.inviter_key:
            raise RecordError("the inviter sent a vouch for another site", reason="unauthorized")
        self.view.adopt([*reply.get("items", []), vouch.raw, record.raw], inv.mesh_id, now)
        self._refresh_own_record()
        if self.discovery is not None:
            self._spawn(self.discovery.update(self.view.mesh_id), "discovery-update")
        log.info("joined mesh %s (%s) through %s; %d members", self.view.mesh_name,
                 inv.mesh_id.hex(), reply.get("inviter_name"), len(self.view.members))
        self.announce()

    # -- actions for the control API ------------------------------------------------------------

    def invite(self, name_hint: str, expires: float | None, uses: int, role: str,
               approve: bool) -> tokens.Invitation:
        now = self._now()
        if self.view.mesh_id is None:
            self.view.found(self.name, os.urandom(16), now)
            self._refresh_own_record()
            if self.discovery is not None:
                self._spawn(self.discovery.update(self.view.mesh_id), "discovery-update")
            log.info("founded mesh %s (%s)", self.view.mesh_name, self.view.mesh_id.hex()
                     if self.view.mesh_id else "")
        addrs = [tokens.Address.parse(a) for a in self.addrs]
        alternates = []
        for key in self.view.members:
            rec = self.view.record_of(key)
            if key != self.key.public and rec is not None and rec.reachable and rec.addrs:
                alternates.append(tokens.Alternate(key, tuple(tokens.Address.parse(a)
                                                              for a in rec.addrs[:2])))
        if addrs:
            alternates = alternates[:1]
        inv = self.admissions.invite(addrs=addrs, alternates=alternates[:2], name_hint=name_hint,
                                     expires_in=expires or self.config.invite_expiry, uses=uses,
                                     role=role, approve=approve, now=now)
        log.info("issued an invitation (%s, %d use(s), role %s%s, expires %s)",
                 name_hint or "no name hint", uses, role, ", needs approval" if approve else "",
                 time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(inv.expires)))
        return inv

    def approve(self, fingerprint: str) -> Any:
        done = self.admissions.approve(fingerprint, self._now())
        log.info("approved the join of %s (%s)", done.name, fingerprint_of(done.joiner))
        self.announce()
        return done

    def deny(self, fingerprint: str) -> Any:
        done = self.admissions.deny(fingerprint, self._now())
        log.info("denied the join of %s (%s)", done.name, fingerprint_of(done.joiner))
        return done

    def find_site(self, text: str) -> bytes:
        """A member's key by name, site id, or fingerprint (a unique prefix is enough)."""
        from meshd.state.admission import normalize_fingerprint

        wanted = text.strip()
        candidates = set(self.view.members) | set(self.view.site_records)
        hits = [k for k in candidates if self.view.name_of(k) == wanted or site_id_of(k) == wanted]
        if not hits and len(wanted) >= 4:
            fp = normalize_fingerprint(wanted)
            hits = [k for k in candidates if site_id_of(k).startswith(wanted.lower())
                    or (fp and normalize_fingerprint(fingerprint_of(k)).startswith(fp))]
        if not hits:
            raise LocalError(f"no member named or identified as {text!r}; see meshd peers",
                             reason="not-found")
        if len(hits) > 1:
            raise LocalError(f"{text!r} matches {len(hits)} sites; give the site id",
                             reason="ambiguous")
        return hits[0]

    def revoke(self, site: str, reason: str) -> bytes:
        mesh_id = self.view.mesh_id
        if mesh_id is None:
            raise StateError("this site is in no mesh", reason="no-mesh")
        subject = self.find_site(site)
        if subject == self.key.public and self.view.genesis is not None \
                and self.view.genesis.signer == subject:
            raise LocalError("the founder of a mesh cannot be revoked", reason="usage")
        signed = records.sign(Revocation(mesh_id, self.key.public, subject, self._now(),
                                         reason[:200]), self.key)
        result = self.view.ingest([signed.raw], self._now())
        if result.stored != 1 and not result.duplicate:
            raise LocalError("only the founder, an introducer, or the site itself may revoke a"
                             " site", reason="unauthorized")
        log.info("revoked %s (%s)", self.view.name_of(subject), site_id_of(subject))
        self.announce()
        return subject

    async def rotate(self) -> tuple[bytes, bytes]:
        """Retire this site's key and hand its membership to a new one (signed by both).

        The rotation is pushed to every member we can dial while the old key still opens their
        doors; then the new key replaces the old one on disk (the old is deleted), and the peer
        port, links and membership core restart under the new key.  Invitations issued under
        the old key stop working (their tokens name it)."""
        mesh_id = self.view.mesh_id
        if mesh_id is None or not self.view.is_member(self.key.public):
            raise StateError("only a member of a mesh can rotate its key", reason="no-mesh")
        old, new = self.key, SiteKey.generate()
        now = self._now()
        rotation = records.sign_rotation(mesh_id, old, new, now)
        others = [k for k in self.view.members if k != old.public]
        result = self.view.ingest([rotation.raw], now)
        if result.stored != 1:
            raise LocalError(f"the rotation was refused: {result.refused}", reason="unauthorized")
        told = await asyncio.gather(*(self.sync_with(k) for k in others))
        log.info("key rotation announced to %d of %d members", sum(told), len(others))
        tmp = self.home.key_path.with_name("site.key.new")
        tmp.unlink(missing_ok=True)
        new.save(tmp)
        os.replace(tmp, self.home.key_path)
        self.keys.rotate_to(new)
        await self._restart_transport()
        self._refresh_own_record()
        log.info("rotated the site key: %s -> %s (fingerprint %s)", old.site_id, new.site_id,
                 new.fingerprint)
        self.announce()
        return old.public, new.public

    async def _restart_transport(self) -> None:
        """Peer port, links, membership core and LAN advertisement under the current key."""
        assert self._ctx is not None
        curve = self.key.curve_keypair()
        self.membership.close()
        self.membership = MembershipService(self, self.membership.config)
        self.membership.subscribe(self._on_member_event)
        if self.dialer is not None:
            self.dialer.close()
        self.dialer = Dialer(self._ctx, curve, on_message=self._on_link_message)
        if self.server is not None and self.bound is not None:
            auth = self.server._auth
            await self.server.close(keep_auth=True)
            self.server = PeerServer(self._ctx, curve, self._on_peer, auth,
                                     on_other=self.channels.accept)
            for attempt in range(50):
                try:
                    await self.server.start(self.bound)
                    break
                except OSError:
                    if attempt == 49:
                        raise
                    await asyncio.sleep(0.05)  # the old socket's close is asynchronous
        if self.discovery is not None:
            await self.discovery.close()
            await self._start_discovery()
        self.contacts.clear()
        self._known_members = frozenset(self.view.members)
        self.membership.start()

    # -- reports ------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        me = self.view.members.get(self.key.public)
        counters = dict(self.counters)
        for reason, n in self.view.refused.items():
            counters[f"records_refused_{reason.replace('-', '_')}"] = n
        for reason, n in self.admissions.refused.items():
            counters[f"joins_refused_{reason.replace('-', '_')}"] = n
        counters["joins_admitted"] = self.admissions.admitted
        counters["peer_dropped"] = self.server.dropped if self.server else 0
        return {
            "name": self.name, "site_id": self.key.site_id, "fingerprint": self.key.fingerprint,
            "mesh_id": self.view.mesh_id.hex() if self.view.mesh_id else None,
            "mesh_name": self.view.mesh_name or None, "role": me.role if me else None,
            "listen": self.bound, "addrs": self.addrs, "members": len(self.view.members),
            "version": __version__, "pid": os.getpid(), "counters": counters,
        }

    def peers(self, *, revoked: bool = False) -> list[dict[str, Any]]:
        """Members with their verified records and what the membership protocol knows of them;
        with ``revoked``, the revoked sites instead."""
        out = []
        keys = sorted(self.view.revoked) if revoked else list(self.view.members)
        for key in keys:
            member = self.view.members.get(key)
            rec = self.view.record_of(key)
            contact = self.contacts.get(key)
            swim_state = self.membership.state_of(key)
            if revoked:
                swim_state["state"] = "revoked"
            rtt = swim_state["rtt_ms"]
            if rtt is None and self.dialer is not None and \
                    (r := self.dialer.rtt.get(curve_public_of(key))) is not None:
                rtt = round(r * 1000, 3)
            out.append({
                "name": self.view.name_of(key), "site_id": site_id_of(key),
                "fingerprint": fingerprint_of(key), "role": member.role if member else None,
                "self": key == self.key.public, **swim_state, "rtt_ms": rtt,
                "reached": self._reached(key, rec),
                **(self.channels.reach_of(key) if key != self.key.public else
                   {"we_dial": None, "dials_us": None}),
                "addrs": list(rec.addrs) if rec else [],
                "reachable": bool(rec.reachable) if rec else False,
                "seq": rec.seq if rec else None,
                "vouched_by": site_id_of(member.vouched_by) if member and member.vouched_by else None,
                "verified": rec is not None,
                "error": contact.error if contact else None,
            })
        return out

    def _reached(self, key: bytes, rec: SiteRecord | None) -> str:
        """How this site reaches a member: self, lan, direct, inbound (over the connection the
        member keeps to us: it cannot be dialed) or indirect (only through other members)."""
        if key == self.key.public:
            return "self"
        if self.discovery is not None and key in self.discovery.sightings:
            return "lan"
        if rec is not None and rec.reachable and rec.addrs:
            return "direct"
        if self.server is not None and curve_public_of(key) in self.server.routes:
            return "inbound"
        return "indirect"

    def discovered(self) -> list[dict[str, Any]]:
        """Daemons seen on the LAN; only members are trusted, and only after a handshake."""
        if self.discovery is None:
            return []
        return [{"name": s.name, "site_id": s.site_id, "fingerprint": fingerprint_of(s.key),
                 "mesh_id": s.mesh_id.hex() if s.mesh_id else None, "addrs": list(s.addrs),
                 "member": self.view.is_member(s.key), "seen": s.seen}
                for s in sorted(self.discovery.sightings.values(), key=lambda s: s.name)]

    def join_view(self, attempt: JoinAttempt) -> dict[str, Any]:
        inv = attempt.invitation
        return {"id": attempt.id, "state": attempt.state,
                "inviter": site_id_of(inv.inviter_key), "inviter_name": attempt.inviter_name,
                "inviter_fingerprint": fingerprint_of(inv.inviter_key),
                "fingerprint": self.key.fingerprint, "mesh_id": inv.mesh_id.hex(),
                "approve": inv.approve, "error": attempt.error}
