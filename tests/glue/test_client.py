"""The control client's connect over a real unix socket whose accept backlog is full.

A unix socket with a timeout is non-blocking, and its ``connect`` fails at once with EAGAIN while
the listener's backlog is full.  A burst of clients (or a daemon busy for a moment) does that; the
client must wait it out within its timeout, not fail.  (CI once failed on exactly this: a
``status`` call during a burst of 2,200 connections raised ``BlockingIOError``.)
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import meshd.app.client as client_module
from meshd.app.client import Client
from meshd.errors import LocalError


@pytest.fixture
def full_listener(tmp_path: Path) -> Iterator[tuple[socket.socket, list[socket.socket], str]]:
    """A listening unix socket at ``<home>/control.sock`` that accepts nothing, its backlog
    filled by blocking connections (the list returned)."""
    home = tmp_path / "site"
    home.mkdir()
    path = str(Client(home).home.socket_path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fillers: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    try:
        yield listener, fillers, str(home)
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_a_full_backlog_is_waited_out_and_the_call_goes_through(
        full_listener: tuple[socket.socket, list[socket.socket], str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    listener, fillers, home = full_listener
    assert fillers, "the backlog was never full"
    pauses: list[float] = []
    answered = threading.Event()

    def serve() -> None:
        # The first pause of the client frees the backlog; then one status call is answered.
        for _ in fillers:
            listener.accept()[0].close()
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            body = b'{"site": "x"}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        answered.set()

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 1:
            threading.Thread(target=serve, daemon=True).start()

    real_sleep = client_module.time.sleep
    monkeypatch.setattr(client_module.time, "sleep",
                        lambda s: (pause(s), real_sleep(s))[-1])
    out: Any = Client(home, timeout=10).status()
    assert out == {"site": "x"}
    assert pauses, "the client never met the full backlog"
    assert answered.wait(10)


def test_a_backlog_that_stays_full_is_a_timeout_in_one_line(
        full_listener: tuple[socket.socket, list[socket.socket], str]) -> None:
    _, _, home = full_listener
    with pytest.raises(LocalError) as caught:
        Client(home, timeout=0.3).status()
    assert caught.value.reason == "timeout"
