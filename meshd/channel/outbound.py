"""The sending end of one channel: path race, keys, reliable sender, retry back-off (pure).

Theory of operation.  The sending site owns a channel.  :class:`SendingEnd` races the paths
(:class:`~.paths.PathRace`); the glue carries out each :class:`~.paths.StartAttempt` (connect,
then either the handshake as initiator or, once keyed, a resume probe) and reports
:meth:`SendingEnd.attempt_succeeded` or :meth:`SendingEnd.attempt_failed`.  The first success
gives the channel its keys for life: the first frame then names the channel
(:data:`~.control.CTRL_OPEN`).  A later success *resumes*: the sender core resends every
unacked frame on the new connection.  A lost connection races again; a race that finds no
path is run again after a back-off that doubles from :data:`RETRY_MIN` to :data:`RETRY_MAX`
and starts over once a path is chosen.  A channel that has had no connection for
``give_up_s`` when a race finds no path *gives up*: it fails with ``end_reason`` ``no-path``,
so that the application hears of it instead of waiting forever.  :meth:`SendingEnd.cut` ends
a channel from outside (its receiver was revoked).

The application's batches go in through :meth:`SendingEnd.send_batch` (``WouldBlock`` while the
receiver gives no credit: wait for :class:`~.events.Writable`); :class:`~.events.Acked` tells
how many messages the receiver's daemon holds.

Transitions (channel state; an input not in the table leaves the state as it is)::

    state          input              -> state
    negotiating    path-chosen        -> open
    negotiating    no-path            -> no-path        (retry timer armed)
    open           connection-lost    -> negotiating    (race again)
    no-path        retry              -> negotiating    (race again)
    no-path        give-up            -> failed         (no connection for give_up_s)
    any but closed fail               -> failed         (cut, or a bug in the glue: keep why)
    any            close              -> closed         (last frame CTRL_CLOSE if connected)

Outgoing actions (:meth:`SendingEnd.outgoing`): :class:`~.paths.StartAttempt`,
:class:`~.paths.CancelAttempt`, :class:`~.events.SendFrame`.  Events (:meth:`SendingEnd.events`):
:class:`~.events.PathOpen`, :class:`~.events.PathLost`, :class:`~.events.NoPathLeft`,
:class:`~.events.Writable`, :class:`~.events.Acked`, :class:`~.events.ChannelEnded`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from meshd.errors import LocalError, ProtocolError

from .control import CLOSE_PAYLOAD, open_payload
from .events import (
    Acked,
    ChannelEnded,
    Feedback,
    NoPathLeft,
    PathLost,
    PathOpen,
    Probe,
    SendFrame,
    Transmit,
    Writable,
)
from .frames import FRAME_OVERHEAD, KIND_CONTROL, MAX_PAYLOAD, Block, Buffer, Opener, Sealer
from .frames import byte_view
from .handshake import ChannelKeys
from .paths import CancelAttempt, NoPath, Path, PathChosen, PathKind, PathRace, RaceConfig
from .paths import StartAttempt
from .reach import NodeId, ReachabilityTable
from .reliable import Sender, SenderConfig, decode_control, encode_control
from .stream import LEASE

RETRY_MIN = 0.5
"""Seconds before the first new race after a race found no path."""
RETRY_MAX = 10.0
"""The back-off doubles up to this many seconds."""

NEGOTIATING, OPEN, NO_PATH, CLOSED, FAILED = "negotiating", "open", "no-path", "closed", "failed"

_TRANSITIONS: dict[tuple[str, str], str] = {
    (NEGOTIATING, "path-chosen"): OPEN,
    (NEGOTIATING, "no-path"): NO_PATH,
    (OPEN, "connection-lost"): NEGOTIATING,
    (NO_PATH, "retry"): NEGOTIATING,
    (NO_PATH, "give-up"): FAILED,
    **{(s, "fail"): FAILED for s in (NEGOTIATING, OPEN, NO_PATH)},
    **{(s, "close"): CLOSED for s in (NEGOTIATING, OPEN, NO_PATH, FAILED)},
}
"""(state, input) -> next state; see the module docstring."""

Action = StartAttempt | CancelAttempt | SendFrame
Event = PathOpen | PathLost | NoPathLeft | Writable | Acked | ChannelEnded


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    window_bytes: int = 64 << 20
    """Most bytes of sealed frames kept for resending (the sender's buffer)."""
    give_up_s: float | None = 60.0
    """Seconds without a connection after which a race that finds no path ends the channel
    (None: never)."""
    race: RaceConfig = RaceConfig()


class SendingEnd:
    """The sending end's protocol decisions (see the module docstring)."""

    def __init__(self, name: str, me: NodeId, peer: NodeId, table: ReachabilityTable, *,
                 relays: Callable[[], Iterable[NodeId]], kinds: Iterable[PathKind],
                 config: OutboundConfig = OutboundConfig()) -> None:
        """``relays``: the members that may relay now (asked at each race)."""
        self.name = name
        self.peer = peer
        self._relays = relays
        self.sender = Sender(SenderConfig(max_buffer_bytes=config.window_bytes,
                                          max_message_bytes=MAX_PAYLOAD,
                                          first_message_free=True),
                             seal=self._seal, overhead=FRAME_OVERHEAD)
        self.race = PathRace(me, peer, table, relays(), config.race, kinds=kinds)
        self.keys: ChannelKeys | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._give_up_s = config.give_up_s
        self.state = NEGOTIATING
        self.error: str | None = None
        self.end_reason: str | None = None
        """Why the channel failed: ``no-path``, ``revoked``, ``failed`` (None until then)."""
        self._unconnected_since: float | None = None  # set at start and at each lost connection
        self.path: Path | None = None
        self.setup_s: float | None = None
        self.connected = False
        self.messages = 0
        self.bytes = 0
        self.acked_messages = 0
        self.retransmits = 0
        self.renegotiations = 0
        self.retry_s = RETRY_MIN
        self._retry_at: float | None = None
        self._marks: deque[tuple[int, int]] = deque()  # (batch seq, messages up to it)
        self._actions: list[Action] = []
        self._events: list[Event] = []
        self.handed_over = False
        """The application holds the connection and runs the sender (:mod:`.stream`); this
        core only races, keys and resumes."""
        self._resume_feedback: Feedback | None = None

    # -- inputs --------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self._unconnected_since = now
        self.race.start(now)
        self._pump(now)

    def attempt_succeeded(self, path: Path, now: float, rtt: float, keys: ChannelKeys,
                          feedback: Feedback | None = None) -> bool:
        """The attempt over ``path`` connected and (first time) made ``keys`` or (resume) got
        ``feedback``.  False if the attempt is no longer wanted (the glue closes its
        connection); else its connection is now the channel's."""
        if self.ended or path not in self.race.running:
            return False
        self.connected = True
        if self.keys is None:
            self.keys = keys
            self._sealer = Sealer.for_channel(keys)
            self._opener = Opener.for_channel(keys)
            self._actions.append(SendFrame(self._sealer.seal_control(open_payload(self.name))))
        elif self.handed_over:  # the application's sender resumes with this feedback
            self._resume_feedback = feedback
        else:
            self.sender.on_reconnect(now=now)
            if feedback is not None:
                self.sender.on_feedback(feedback, now=now)
        self.race.attempt_succeeded(path, now, rtt)
        self._pump(now)
        return True

    def attempt_failed(self, path: Path, now: float, reason: str) -> None:
        if not self.race.done and not self.ended:
            self.race.attempt_failed(path, now, reason)
            self._pump(now)

    def frame_received(self, body: Block, now: float) -> None:
        """A frame from the receiver on the current connection; ProtocolError if it is bad."""
        frame = self.opener.open(body)
        if frame.kind != KIND_CONTROL:
            raise ProtocolError("a data frame from the receiver", reason="unexpected")
        msg = decode_control(frame.payload)
        if isinstance(msg, Feedback):
            if self.handed_over:  # for the application's sender, with the next grant
                self._resume_feedback = msg
            else:
                self.sender.on_feedback(msg, now=now)
        self._pump(now)

    def send_batch(self, payload: Buffer, messages: int, now: float) -> int:
        """Queue one batch of ``messages`` messages; its seq.  WouldBlock without credit,
        LocalError before the channel has keys."""
        if self.ended:
            raise LocalError(f"the channel is {self.state}", reason=self.end_reason or "closed")
        if self.keys is None:
            raise LocalError("the channel has no keys yet", reason="not-keyed")
        seq = self.sender.send(payload, now=now)
        self.messages += messages
        self.bytes += byte_view(payload).nbytes
        self._marks.append((seq, self.messages))
        self._pump(now)
        return seq

    def connection_lost(self, now: float) -> None:
        """The channel's connection is gone: race again (unless closed)."""
        self.connected = False
        if self._go("connection-lost"):
            self._unconnected_since = now
            self._events.append(PathLost())
            self._renegotiate(now, "connection-lost")
            self._pump(now)

    def handle_timer(self, now: float) -> None:
        self.race.handle_timer(now)
        self.sender.handle_timer(now)
        if self._retry_at is not None and self._retry_at <= now:
            self._retry_at = None
            if self._go("retry"):
                self._renegotiate(now, "no-path")
        self._pump(now)

    def fail(self, error: str, reason: str = "failed") -> None:
        """The glue cannot go on with this channel (a bug): keep why, stop."""
        if self._go("fail"):
            self.error = error[:200]
            self.end_reason = reason
            self._end()

    def cut(self, reason: str, error: str) -> None:
        """End the channel from outside (``reason``: ``revoked``): no last frame, the glue
        drops its connection."""
        self.fail(error, reason)

    @property
    def ended(self) -> bool:
        """Closed or failed: the channel carries nothing any more."""
        return self.state in (CLOSED, FAILED)

    def close(self) -> None:
        """The application closed the channel: say so to the receiver if connected."""
        was = self.state
        if not self._go("close"):
            return
        if was != FAILED:
            if self.connected and self._sealer is not None:
                self._actions.append(SendFrame(self._sealer.seal_control(CLOSE_PAYLOAD)))
            self._end()

    def _end(self) -> None:
        """Stop racing and retrying; tell the glue (:class:`~.events.ChannelEnded`)."""
        self._retry_at = None
        for path in self.race.running:
            self._actions.append(CancelAttempt(path))
        self.connected = False
        self._events.append(ChannelEnded(self.end_reason or "closed", self.error))

    # -- hand-over to the application (see :mod:`.stream`) ----------------------------------------

    def hand_over(self) -> tuple[int, int, Feedback | None]:
        """The connection goes to the application: ``(ctl_seal, ctl_open, feedback)`` for its
        :class:`~.stream.Grant`.  The application may seal control seqs from ``ctl_seal`` on
        (:data:`~.stream.LEASE` of them); this core's own counter moves past that range."""
        if self._sealer is None or self._opener is None:
            raise LocalError("the channel has no keys yet", reason="not-keyed")
        self.handed_over = True
        start = self._sealer.next_control_seq
        self._sealer.next_control_seq = start + LEASE
        feedback, self._resume_feedback = self._resume_feedback, None
        return start, self._opener.next_control_seq, feedback

    def adopt(self, keys: ChannelKeys, ctl_seal: int, ctl_open: int, path: Path | None) -> None:
        """Take a handed-over channel from an application that still holds its connection
        (this daemon restarted, and with it went the channel): open over ``path``, no race
        until :meth:`taken_back`.  ``ctl_seal``: the first control seq this core may use
        (beyond any the application or an earlier daemon used); instead of :meth:`start`."""
        if self.keys is not None or self.race.started:
            raise LocalError("only a new channel can be adopted", reason="usage")
        self.keys = keys
        self._sealer = Sealer.for_channel(keys)
        self._sealer.next_control_seq = ctl_seal
        self._opener = Opener.for_channel(keys)
        self._opener.next_control_seq = ctl_open
        self.handed_over = True
        self.connected = True
        self.state = OPEN
        self.path = path

    def taken_back(self, ctl_open: int, now: float) -> None:
        """The application's connection broke: race again and resume (the application's
        opener took control seqs up to ``ctl_open``)."""
        if self._opener is not None:
            self._opener.next_control_seq = max(self._opener.next_control_seq, ctl_open)
        self.connection_lost(now)

    # -- what the glue needs during an attempt ---------------------------------------------------

    def probe_frame(self) -> Block:
        """The sealed Probe that proves a resuming connection belongs to this channel."""
        assert self._sealer is not None
        return self._sealer.seal_control(encode_control(Probe()))

    def feedback_in(self, body: Block) -> Feedback | None:
        """The Feedback a frame on a resuming connection carries, if it does."""
        frame = self.opener.open(body)
        if frame.kind == KIND_CONTROL:
            msg = decode_control(frame.payload)
            if isinstance(msg, Feedback):
                return msg
        return None

    @property
    def opener(self) -> Opener:
        if self._opener is None:
            raise ProtocolError("a frame before the channel has keys", reason="unexpected")
        return self._opener

    # -- outputs -------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The earliest of the race's, the sender's and the retry deadlines (None once ended)."""
        if self.ended:
            return None
        times = [t for t in (self.sender.get_timer(), self.race.get_timer(), self._retry_at)
                 if t is not None]
        return min(times, default=None)

    def outgoing(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    # -- internals -----------------------------------------------------------------------------

    def _go(self, what: str) -> bool:
        nxt = _TRANSITIONS.get((self.state, what))
        if nxt is None:
            return False
        self.state = nxt
        return True

    def _seal(self, seq: int, payload: Buffer) -> Block:
        assert self._sealer is not None
        return self._sealer.seal(seq, payload)

    def _renegotiate(self, now: float, reason: str) -> None:
        if not self.race.started:  # adopted (see :meth:`adopt`): the first race of this daemon
            self.race.start(now)
            return
        if not self.race.done:
            return
        self.renegotiations += 1
        self.race.renegotiate(now, reason, relays=self._relays())

    def _pump(self, now: float) -> None:
        """Carry the race's and the sender's outputs into this core's."""
        for action in self.race.outgoing():
            self._actions.append(action)
        for event in self.race.events():
            if isinstance(event, PathChosen) and self._go("path-chosen"):
                self._unconnected_since = None
                self.path = event.path
                self.retry_s = RETRY_MIN
                if self.setup_s is None:
                    self.setup_s = event.setup_s
                self._events.append(PathOpen(event.path, event.setup_s))
            elif isinstance(event, NoPath) and self._go("no-path"):
                self.path = None
                self.error = "; ".join(f"{p}: {r}" for p, r in event.reasons)
                since = self._unconnected_since
                if (self._give_up_s is not None and since is not None
                        and now - since >= self._give_up_s and self._go("give-up")):
                    self.error = f"no path for {now - since:.0f} s ({self.error})"[:200]
                    self.end_reason = "no-path"
                    self._end()
                    continue
                self._events.append(NoPathLeft(self.error, self.retry_s))
                self._retry_at = now + self.retry_s
                self.retry_s = min(self.retry_s * 2, RETRY_MAX)
        for ev in self.sender.events():
            if isinstance(ev, Writable):
                self._events.append(ev)
        first = self.sender.first_unacked
        progressed = False
        while self._marks and self._marks[0][0] < first:
            self.acked_messages = self._marks.popleft()[1]
            progressed = True
        if progressed:
            self._events.append(Acked(self.acked_messages))
        for item in self.sender.take_outgoing():
            if not self.connected:
                continue  # resent from the buffer on the next connection
            if isinstance(item, Transmit):
                self._actions.append(SendFrame(item.frame))
                self.retransmits += item.resend
            else:
                assert self._sealer is not None
                self._actions.append(SendFrame(self._sealer.seal_control(encode_control(item))))
