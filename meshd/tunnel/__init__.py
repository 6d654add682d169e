"""Tunnels: many TCP streams of unmodified applications over one end-to-end encrypted data
connection between the consuming and the owning daemon (pure, sans-IO).

- :mod:`.codec` — the multiplexer's messages (OPEN, DATA, FIN, RESET, CREDIT), checked;
- :mod:`.mux` — :class:`Mux`: stream states, half-close, per-stream credit windows;
- :mod:`.sealed` — :class:`TunnelEnd`: the mux's plaintext in channel AEAD frames;
- :mod:`.events` — what the mux reports to its glue;
- :mod:`.control` — the ``tunl`` messages daemons exchange about services, and the
  ``HOST:PORT`` / allow-list forms the registry stores.

No clock is needed: the data connection below is TCP (ordered, reliable), a lost connection
resets its streams, and idle streams cost nothing.
"""

from .codec import REASONS, check_service
from .events import Ended, Event, Finished, Received, StreamOpened, StreamReset, Writable
from .mux import CONSUMER, GROWTH_BUDGET, MAX_STREAM_WINDOW, MAX_STREAMS, OWNER, WINDOW, Mux
from .sealed import TunnelEnd

__all__ = [
    "CONSUMER",
    "GROWTH_BUDGET",
    "MAX_STREAM_WINDOW",
    "MAX_STREAMS",
    "OWNER",
    "REASONS",
    "WINDOW",
    "Ended",
    "Event",
    "Finished",
    "Mux",
    "Received",
    "StreamOpened",
    "StreamReset",
    "TunnelEnd",
    "Writable",
    "check_service",
]
