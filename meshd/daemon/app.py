"""The per-site daemon: builds the services, wires them together, starts and stops them.

One asyncio process per site.  What each service does is in its own module: ``transport`` (peer
port, dialed links, LAN discovery), ``router`` (peer messages to their service), ``sync``
(anti-entropy of signed objects), ``roster`` (following the member set), ``membership`` (SWIM),
``joins``, ``admin`` (invitations, approval, revocation), ``rotation``, ``reports``, ``control``
(the local API) and ``channels``.  This module holds no protocol logic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

import zmq
import zmq.asyncio
from aiohttp import web

from meshd.daemon.admin import Admin
from meshd.daemon.channels.service import ChannelService
from meshd.daemon.contacts import Contacts
from meshd.daemon.control import ControlServer
from meshd.daemon.counters import Counters
from meshd.daemon.joins import Joins
from meshd.daemon.links import MemberLinks
from meshd.daemon.membership import MembershipService
from meshd.daemon.own_record import OwnRecord
from meshd.daemon.rekeys import Rekeys
from meshd.daemon.reports import Reports
from meshd.daemon.roster import Roster
from meshd.daemon.rotation import Rotation
from meshd.daemon.router import PeerRouter
from meshd.daemon.site import LocalSite
from meshd.daemon.sync import MeshSync
from meshd.daemon.tasks import TaskSet
from meshd.daemon.transport import Transport
from meshd.daemon.tunnels.service import TunnelService
from meshd.peer.limits import quiet_accept_errors, raise_fd_limit
from meshd.errors import StateError
from meshd.local import api
from meshd.state import config as config_mod
from meshd.state.admission import Admissions
from meshd.state.files import file_id, stale_socket, unlink_if_same
from meshd.state.home import Home, HomeLock
from meshd.state.site import SiteKeys, finish_rotation
from meshd.state.store import Store
from meshd.state.view import MeshView
from meshd.trust.identity import SiteKey

log = logging.getLogger("meshd")

ZMQ_SOCKETS = 8192
"""The ZeroMQ context's socket limit (libzmq's default, 1023, is reached by 341 channel ends:
each holds 3); the channel service bounds its own share (``MAX_SENDERS``, ``MAX_RECEIVERS``)."""
LEAVE_TIMEOUT = 1.0
"""Seconds a stopping daemon waits for its leave notice to be gossiped."""


class Daemon:
    """One site's running daemon (see the module docstring)."""

    def __init__(self, home: Home, *, now: float | None = None,
                 lock: HomeLock | None = None) -> None:
        home.require()
        self.home = home
        self.lock = lock or HomeLock(home)
        if not self.lock.try_acquire():  # before anything is read or changed (a rotation's end)
            raise self.lock.refusal()
        config = self.config = config_mod.load(home.config_path)
        store = self.store = Store(home.db_path)
        half_done = finish_rotation(home, store)  # a rotation that stopped half-way, if any
        if half_done is not None:
            log.warning("a key rotation had stopped half-way; %s", {
                "finished": "it was stored, so it may have been announced: the new key replaces"
                            " the old one",
                "discarded": "it was never announced: the old key stays"}[half_done])
        keys = SiteKeys(SiteKey.load(home.key_path))
        name = store.get_meta("name")
        if not isinstance(name, str):
            raise StateError(f"{home.db_path} has no site name; was `meshd init` interrupted?",
                             reason="not-initialised")
        site = self.site = LocalSite(name, keys)
        view = self.view = MeshView(store, keys)
        view.load(int(now if now is not None else time.time()))
        admissions = self.admissions = Admissions(store, view, keys, config)
        counters = self.counters = Counters()
        links = self.links = MemberLinks(view)
        contacts = self.contacts = Contacts()
        tasks = self.tasks = TaskSet("daemon")
        self.zctx = zmq.asyncio.Context()
        self.zctx.set(zmq.MAX_SOCKETS, ZMQ_SOCKETS)

        membership = self.membership = MembershipService(
            site=site, view=view, store=store, links=links, counters=counters.scoped("swim_"),
            on_change=self._mesh_changed)
        channels = self.channels = ChannelService(
            site=site, view=view, config=config, home=home, zctx=self.zctx, links=links,
            liveness=lambda key: membership.state_of(key)["state"],
            counters=counters.scoped("channel_"))
        tunnels = self.tunnels = TunnelService(
            site=site, view=view, config=config, home=home, channels=channels, links=links,
            counters=counters.scoped("tunnel_"))
        roster = self.roster = Roster(view=view, membership=membership, links=links,
                                      on_members_changed=self._members_changed,
                                      on_revoked=channels.cut_member)
        own_record = self.own_record = OwnRecord(site, view, store)
        sync = self.sync = MeshSync(site=site, view=view, config=config, links=links,
                                    contacts=contacts, counters=counters, tasks=tasks,
                                    on_change=roster.changed, start_membership=membership.start)
        joins = self.joins = Joins(site=site, view=view, admissions=admissions, config=config,
                                   links=links, own_record=own_record, counters=counters,
                                   tasks=tasks, announce=sync.announce,
                                   advertise_mesh=self._advertise_mesh)
        admin = self.admin = Admin(site=site, view=view, admissions=admissions, config=config,
                                   own_record=own_record, announce=sync.announce,
                                   advertise_mesh=self._advertise_mesh)
        router = self.router = PeerRouter(
            view=view, links=links, contacts=contacts, counters=counters,
            strangers={"join": joins.answer,
                       "rekey": Rekeys(view=view, keep=sync.keep_verified,
                                       counters=counters).answer},
            refused_us=sync.on_refused,
            members={"swim": lambda key, msg: membership.deliver(msg["m"], key),
                     "chan": lambda key, msg: channels.on_control(key, msg["op"], msg["b"]),
                     "tunl": lambda key, msg: tunnels.on_control(key, msg["op"], msg["b"]),
                     "sync": sync.on_sync})
        transport = self.transport = Transport(
            site=site, config=config, view=view, store=store, links=links, zctx=self.zctx,
            on_request=router.on_request, on_link_message=router.on_link_message,
            on_other=channels.accept, on_sighting=lambda s: sync.on_sighting(s.key))
        rotation = self.rotation = Rotation(
            site=site, view=view, key_path=home.key_path, sync=sync, own_record=own_record,
            contacts=contacts, roster=roster, membership=membership,
            restart_transport=transport.restart)
        reports = self.reports = Reports(
            site=site, view=view, admissions=admissions, counters=counters, contacts=contacts,
            membership=membership, links=links, reach_of=channels.reach_of,
            dropped=lambda: transport.dropped, port=transport.port_stats,
            untrusted=lambda: len(channels.untrusted))
        self.control = ControlServer(view=view, reports=reports, admin=admin, joins=joins,
                                     membership=membership, channels=channels,
                                     rotate=rotation.rotate, tunnels=tunnels)
        self.control.app.router.add_post(api.STOP, self._stop_asked)
        membership.subscribe(self._on_member_event)
        membership.on_back = channels.reach.member_back
        membership.on_suspect = sync.on_suspect
        self._stopping = asyncio.Event()
        self._pid_file: tuple[int, int] | None = None

    # Late bindings: these services are built after the ones that call them.

    def _mesh_changed(self) -> None:
        self.roster.changed()

    def _members_changed(self) -> None:
        self.channels.on_members_changed()
        self.tunnels.on_members_changed()

    def _advertise_mesh(self) -> None:
        self.transport.advertise_mesh()

    def _on_member_event(self, event: dict[str, Any]) -> None:
        if event["type"] in ("joined", "alive"):  # a member to check reachability with now
            self.channels.on_members_changed()

    async def _stop_asked(self, request: web.Request) -> web.Response:
        """``POST /v1/stop`` (``meshd stop``): the graceful stop SIGTERM starts, answered first."""
        log.info("a stop was asked on the control socket")
        self._stopping.set()
        return web.json_response({"pid": os.getpid(), "stopping": True})

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        site, view = self.site, self.view
        # Before anything binds: what is not a socket where one goes is refused and left alone.
        stale_socket(self.home.socket_path, "control socket")
        stale_socket(self.channels.handovers.path, "hand-over socket")
        await self.transport.start()
        self.admissions.recover(int(time.time()))
        self.own_record.refresh()
        await self.control.start(self.home.socket_path)
        self.home.pid_path.write_text(f"{os.getpid()}\n")
        self._pid_file = file_id(self.home.pid_path)
        self.roster.reset()
        self.membership.start()
        self.channels.start()
        await self.tunnels.start()
        self.tasks.spawn(self.sync.run(), "sync-loop")
        key = site.keys.key
        log.info("site %s (%s, fingerprint %s) running; peer port %s; control %s",
                 site.name, key.site_id, key.fingerprint, site.bound or "none (dial-out only)",
                 self.home.socket_path)
        if view.mesh_id is not None:
            log.info("member of mesh %s (%s) with %d members", view.mesh_name,
                     view.mesh_id.hex(), len(view.members))
            self.sync.announce()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        fds = raise_fd_limit()
        log.debug("open-file limit %d", fds)
        quiet_accept_errors(loop)
        # SIGHUP too: the terminal of a `meshd run &` closing ends it gracefully (members see
        # it leave), not by the signal's default action (no leave, sockets left behind).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        try:
            await self._stopping.wait()
            log.info("stopping")
        finally:
            await self.stop()

    async def stop(self) -> None:
        self.control.stopping = True
        await self.membership.leave(LEAVE_TIMEOUT)
        await self.membership.close()
        await self.tunnels.stop()
        await self.channels.stop()
        await self.tasks.close()
        self.sync.close()
        await self.control.stop()
        await self.transport.close()
        self.zctx.destroy(linger=0)
        self.store.close()
        unlink_if_same(self.home.pid_path, self._pid_file)
        self.lock.release()
        log.info("stopped; state flushed")
