"""One line of ``meshd channels`` per sending end (asyncio glue, read only)."""

from __future__ import annotations

import time
from typing import Any

from meshd.daemon.channels.outbound import OutChannel
from meshd.trust.identity import site_id_of


def describe(ch: OutChannel) -> dict[str, Any]:
    """One line of ``meshd channels`` for a sending end."""
    core = ch.core
    path = core.path
    elapsed = max(1e-9, time.time() - ch.created)
    return {
        "id": ch.cid.hex(), "name": ch.name, "direction": "out",
        "peer": ch.owner.name(ch.peer), "peer_id": site_id_of(ch.peer),
        "path": path.kind.value if path else None,
        "relay": ch.owner.name(path.relay) if path and path.relay else None,
        "state": core.state, "error": core.error if core.state != "open" else None,
        "bytes": core.bytes, "messages": core.messages,
        "acked_messages": core.acked_messages,
        "rate_Bps": round(core.bytes / elapsed), "retransmits": core.retransmits,
        "renegotiations": core.renegotiations,
        "setup_ms": None if core.setup_s is None else round(core.setup_s * 1000, 3),
        "buffered_bytes": core.sender.buffered_bytes,
        **({"retransmits": ch.reported.get("retransmits", 0),
            "buffered_bytes": ch.reported.get("buffered", 0)} if ch.reported else {}),
        "handed_over": core.handed_over,
    }
