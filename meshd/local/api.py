"""The control API's routes and the JSON shapes they exchange, shared by server and client.

All routes live under ``/v1``; a request body and every answer is a JSON object (or array).  A
failed request answers with a 4xx/5xx status and ``{"error": {"reason": …, "message": …}}``:
400 for the caller's mistakes (LocalError), 502 when a peer refused or failed (RemoteError).
"""

from __future__ import annotations

from typing import Any, TypedDict

VERSION = "v1"

STATUS = "/v1/status"          # GET  -> Status
INVITES = "/v1/invites"        # POST InviteRequest -> {"token", "invite_id", "expires", ...}
JOINS = "/v1/joins"            # POST {"text"} -> Join ;  GET /v1/joins/{id}?wait=S -> Join
PENDING = "/v1/pending"        # GET  -> [Pending]
APPROVE = "/v1/pending/approve"  # POST {"fingerprint"} -> Pending (decided)
DENY = "/v1/pending/deny"      # POST {"fingerprint"} -> Pending (decided)
PEERS = "/v1/peers"            # GET  -> [Peer];  ?discovered=1 -> [Discovered]
REVOKE = "/v1/revoke"          # POST {"site", "reason"} -> {"revoked": site_id, "name": …}
ROTATE = "/v1/rotate"          # POST {} -> {"old_site_id", "site_id", "fingerprint", "told", "members"}
STOP = "/v1/stop"              # POST {} -> {"pid", "stopping": true}: a graceful stop begins
METRICS = "/v1/metrics"        # GET  -> Prometheus text exposition
EVENTS = "/v1/events"          # GET  -> JSON lines: membership events, history then live
CHANNELS = "/v1/channels"      # GET -> [Channel];  POST {"name", "to", "paths"?, "handover"?} -> OpenSender
                               #   ({"id", "endpoint", "name", "peer", "peer_id", "handover": path | null};
                               #   the hand-over socket: meshd.local.handover)
                               # DELETE /v1/channels/{id};  POST /v1/channels/{id}/flush
                               #   {"messages", "timeout"?} -> {"acked_messages"}
                               # POST /v1/channels/{id}/ring {"ring": path} -> {"ring": bool}
RECEIVERS = "/v1/receivers"    # POST {"name", "allow"?, "ring_bytes"?} -> OpenReceiver;  DELETE /v1/receivers/{name}
SERVICES = "/v1/services"      # GET -> [Service] (?remote=1 -> [RemoteService]);
                               # POST {"name", "target", "allow": [site|"*"], "update"?} -> Service
                               # DELETE /v1/services/{name} -> Service
TUNNELS = "/v1/tunnels"        # GET -> [Tunnel];  POST {"site", "name", "listen"?} -> Tunnel
                               # DELETE /v1/tunnels/{site}/{name} -> Tunnel


class Status(TypedDict):
    name: str
    site_id: str
    fingerprint: str
    mesh_id: str | None
    mesh_name: str | None
    role: str | None
    listen: str | None
    addrs: list[str]
    members: int
    version: str
    pid: int
    stopping: bool             # a graceful stop has begun (SIGTERM or POST /v1/stop)
    counters: dict[str, int]


class InviteRequest(TypedDict, total=False):
    name: str
    expires: float
    uses: int
    role: str
    approve: bool


class Join(TypedDict):
    id: str
    state: str                 # connecting | pending | admitted | failed
    inviter: str               # inviter's site id
    inviter_name: str | None
    inviter_fingerprint: str
    fingerprint: str           # this site's fingerprint, to compare by phone
    mesh_id: str
    error: dict[str, str] | None


class Pending(TypedDict):
    name: str
    site_id: str
    fingerprint: str
    invite: str
    since: int
    addrs: list[str]
    state: str


class Peer(TypedDict):
    name: str
    site_id: str
    fingerprint: str
    role: str
    state: str                 # self | alive | unreachable | unknown | revoked
    addrs: list[str]
    reachable: bool
    seq: int | None
    vouched_by: str | None     # site id of the voucher; None for the founder
    verified: bool
    last_seen: float | None


GONE = 410
"""The HTTP status of a call on a channel that ended (revoked, no path): ChannelClosed."""


class Service(TypedDict):
    name: str
    target: str                # HOST:PORT the owning daemon connects to
    allow: list[str]           # site names, or ["*"] for every member
    connections: int           # open TCP connections carried now
    bytes: int                 # carried both ways since the daemon started


class Tunnel(TypedDict):
    service: str
    site: str                  # the owning site's name
    site_id: str
    listen: str                # ADDR:PORT clients connect to
    path: str | None           # direct | reversed | relay (None: no data connection now)
    relay: str | None
    state: str                 # open | racing | idle
    connections: int
    connections_total: int
    bytes: int
    rate_Bps: int
    error: str | None


def error_body(reason: str, message: str) -> dict[str, Any]:
    return {"error": {"reason": reason, "message": message}}
