"""The sending application's data socket (``app.direct.send_timeout``): blocking, so that a
frame goes in one ``sendmsg``, yet a receiver that stops reading breaks the connection after
the timeout instead of blocking the sender for ever."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from meshd.app.direct import send_timeout, sendmsg_all


def test_a_frame_goes_whole_in_one_blocking_send_while_the_peer_reads() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_timeout(a, 5.0)
        assert a.gettimeout() is None  # no poll() before each call
        frame = bytes(range(256)) * 4096  # 1 MiB, more than the socket buffer holds
        got = bytearray()
        reader = threading.Thread(target=lambda: got.extend(_read(b, len(frame))))
        reader.start()
        sendmsg_all(a, [frame[:100], memoryview(frame)[100:]])
        reader.join(30)
        assert bytes(got) == frame


def _read(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += sock.recv(n - len(out))
    return bytes(out)


def test_a_peer_that_stops_reading_breaks_the_send_after_the_timeout() -> None:
    a, b = socket.socketpair()
    with a, b:
        send_timeout(a, 0.3)
        t0 = time.monotonic()
        with pytest.raises(OSError):
            sendmsg_all(a, [bytes(64 << 20)])  # b never reads
        # It gave up (without the timeout it would block for ever), and not before it.
        assert time.monotonic() - t0 >= 0.3
