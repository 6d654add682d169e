"""Configuration of the membership core: one typed dataclass, memberlist LAN defaults."""

from __future__ import annotations

from dataclasses import dataclass

from meshd.errors import LocalError


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Tunables of :class:`~meshd.swim.core.Membership`.  Times are seconds.

    With the defaults and ``N`` live members: a failed member is suspected within about
    ``probe_interval * 2``, declared dead ``suspicion_mult * log10(N) * probe_interval`` (12 s at
    N=1000) to ``suspicion_max_timeout_mult`` times that (72 s) later depending on how many
    independent confirmations arrive; each update is piggybacked
    ``retransmit_mult * ceil(log10(N + 1))`` times (16 at N=1000).
    """

    probe_interval: float = 1.0
    """Time between probes of one member, round-robin: 1 s (memberlist LAN).  Effective value is
    ``probe_interval * (health + 1)`` (Lifeguard), and it is the probe's overall deadline."""

    probe_timeout: float = 0.5
    """Wait for a direct ack before asking helpers: 500 ms (memberlist LAN), about the 99th
    percentile round trip.  Effective value is ``probe_timeout * (health + 1)``; helpers wait
    the unscaled value before sending a nack."""

    gossip_interval: float = 0.2
    """Time between gossip fan-outs: 200 ms (memberlist LAN).  A fan-out sends nothing when
    there is nothing to disseminate."""

    gossip_nodes: int = 3
    """Random members each gossip fan-out goes to: 3 (memberlist LAN)."""

    indirect_checks: int = 3
    """Helpers asked to ping a member that missed its direct ack (k): 3 (memberlist LAN)."""

    retransmit_mult: int = 4
    """Transmit limit of one update is ``retransmit_mult * ceil(log10(N + 1))``: 4."""

    suspicion_mult: int = 4
    """Minimum suspicion timeout is ``suspicion_mult * max(1, log10(max(1, N))) * probe_interval``;
    confirmations expected ``k = suspicion_mult - 2`` (0 when ``N - 2 < k``): 4."""

    suspicion_max_timeout_mult: int = 6
    """Maximum (unconfirmed) suspicion timeout is this times the minimum: 6."""

    awareness_max_multiplier: int = 8
    """Local health score ranges over ``0 .. awareness_max_multiplier - 1``: 8."""

    push_pull_interval: float = 30.0
    """Full-state exchange with one random member: 30 s (memberlist LAN), scaled for large
    clusters to ``(ceil(log2(N) - log2(32)) + 1) * push_pull_interval`` above 32 members."""

    gossip_to_the_dead_time: float = 30.0
    """Keep gossiping to a dead member this long, so a falsely dead member can learn it and
    refute: 30 s (memberlist LAN)."""

    reconnect_interval: float = 30.0
    """Every this often, with probability ``dead / live`` members, push-pull with one random dead
    member, so that the two sides of a healed partition find each other again: 30 s (Serf)."""

    dead_retention: float = 72 * 3600.0
    """Forget a dead member (stop reconnect attempts and rejoin probes) after this long: 72 h
    (Consul's ``reconnect_timeout``; a member forgotten sooner never comes back by itself, e.g.
    after a partition longer than this).  ``math.inf``: never (an owner that knows the member
    set itself, like the daemon, forgets members with :meth:`Membership.forget`)."""

    rejoin_interval: float = 2.0
    """A dead member (not left, not forgotten) gets a rejoin probe this long after its death: a
    ping carrying the accusation, which a live member refutes at once (see
    :mod:`meshd.swim.rejoin`); the interval then doubles up to ``rejoin_max_interval``: 2 s."""

    rejoin_max_interval: float = 30.0
    """Longest interval between two rejoin probes of one dead member: 30 s (= Serf's
    ``reconnect_interval``)."""

    left_retention: float = 30.0
    """Forget a member that left after this long: 30 s (so stale alive gossip cannot revive it)."""

    packet_budget: int = 1400
    """Bytes of piggybacked updates one message may carry: 1400 (memberlist UDP buffer)."""

    outbound_anchors: int = 3
    """An outbound-only (``reachable=False``) node sends a heartbeat ping every probe interval to
    this many reachable members, its anchors, which watch it: 3 (= ``indirect_checks``)."""

    outbound_watch_mult: float = 3.0
    """An anchor suspects its outbound-only member after ``outbound_watch_mult * probe_interval``
    (scaled by its health) without hearing from it: 3."""

    max_blobs: int = 4096
    """Most verified opaque blobs held (and carried in push-pull): 4096."""

    fallback_ping: bool = True
    """Send a second direct ping together with the ping-reqs (memberlist sends it over TCP);
    a lost ping or ack then rarely causes a suspicion: at 10% loss it makes false suspicions
    about five times rarer."""

    buddy_system: bool = True
    """Lifeguard buddy system: a ping to a suspected member carries its suspicion first, so it
    learns it quickly and can refute."""

    max_incarnation_step: int = 16
    """A message about member N from a sender other than N (hearsay: gossip, piggybacked
    updates, push-pull rows) moves N's incarnation at most this far above the one held when the
    message arrived; a larger claim counts as a claim at that height (``Membership.clamped``).
    Only N itself raises its own incarnation further.  It bounds what one forged message can do
    (issue 11); an honest site that lags further behind catches up by this much per message, or
    at once from N: 16."""

    def __post_init__(self) -> None:
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval",
                     "reconnect_interval", "outbound_watch_mult", "rejoin_interval"):
            if not getattr(self, name) > 0:
                raise LocalError(f"SwimConfig.{name} must be positive", reason="config")
        if self.rejoin_max_interval < self.rejoin_interval:
            raise LocalError("SwimConfig.rejoin_max_interval must not be below rejoin_interval",
                             reason="config")
        if self.probe_timeout > self.probe_interval:
            raise LocalError("SwimConfig.probe_timeout must not exceed probe_interval", reason="config")
        for name in ("gossip_nodes", "indirect_checks", "retransmit_mult", "suspicion_mult",
                     "suspicion_max_timeout_mult", "awareness_max_multiplier", "packet_budget",
                     "max_incarnation_step"):
            if getattr(self, name) < 1:
                raise LocalError(f"SwimConfig.{name} must be at least 1", reason="config")
