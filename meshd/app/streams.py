"""The application API: stream numpy arrays and bytes over channels (sync and asyncio).

::

    import meshd
    with meshd.connect() as mesh:                  # the local daemon (home or $MESHD_HOME)
        tx = mesh.sender("frames", to="alcf")      # a channel; the daemons negotiate its path
        tx.send(frame, meta={"shot": 17})          # blocks while the receiver has no room
        tx.flush()                                 # returns when the far daemon has it all
    with meshd.connect() as mesh:                  # at the other site
        for msg in mesh.receiver("frames"):        # msg.array (a zero-copy view), .meta, .seq,
            ...                                    # .sender (site name), .sender_id

The client asks the daemon over the control socket for a channel and gets an ipc endpoint; the
data then flows app -> daemon over ZeroMQ ipc, never through the control socket.  Small
messages are batched here (up to :data:`~meshd.channel.batch.MAX_BATCH_BYTES`, and for at most
``linger`` seconds) so that the daemons pay their per-frame cost once per batch; a message of
256 KiB or more goes at once (and one of 64 KiB or more is not copied).  ``flush`` sends what
is batched and waits for the receiving daemon's acknowledgement of every message sent so far.

Guarantee: messages reach the receiving daemon in order and exactly once while the sending
daemon runs (across lost connections and relays).  A receiving application gets them in order;
a receiving application that dies loses what was in its ipc queue (at most a few batches).

The modules, one concern each (both flavours share everything but how they wait):

=====================  ==========================================================================
:mod:`.message`        :class:`Message`, the encoding of what is sent, the decoding of deliveries
:mod:`.batching`       the sans-IO batcher: which batches to ship when, inline or in the ring
:mod:`.ends`           the state of a mesh, sender and receiver; their blocking control steps
:mod:`.sync`           :func:`connect`, :class:`Mesh`, ``Sender``, ``Receiver``
:mod:`.aio`            :func:`aconnect`, :class:`AsyncMesh`, ``AsyncSender``, ``AsyncReceiver``
:mod:`meshd.local.ipc` the frames on the ipc socket between the application and its daemon
=====================  ==========================================================================
"""

from __future__ import annotations

from meshd.app.aio import AsyncMesh, AsyncReceiver, AsyncSender, aconnect
from meshd.app.batching import RING_BYTES
from meshd.app.message import Message
from meshd.app.sync import Mesh, Receiver, Sender, connect

__all__ = ["RING_BYTES", "AsyncMesh", "AsyncReceiver", "AsyncSender", "Mesh", "Message",
           "Receiver", "Sender", "aconnect", "connect"]
