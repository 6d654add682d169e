"""Bounds on strangers (meshd.peer.limits): slot accounting, and a quiet log when accepting fails
for want of file descriptors (a real server process at a low open-file limit)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from meshd.peer.limits import SourceLimit

pytestmark = pytest.mark.glue


def test_source_limit_bounds_each_source_and_the_total() -> None:
    lim = SourceLimit(total=3, per_source=2)
    assert lim.admit("a") is None and lim.admit("a") is None
    assert lim.admit("a") == "source"
    assert lim.admit("b") is None
    assert lim.admit("c") == "total" and len(lim) == 3 and lim.sources == 2
    lim.release("a")
    assert lim.admit("c") is None
    lim.release("zz")  # never admitted: nothing changes
    assert len(lim) == 3


SERVER = textwrap.dedent("""
    import asyncio, logging, resource, sys
    from meshd.peer.limits import quiet_accept_errors
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    async def main():
        loop = asyncio.get_running_loop()
        quiet_accept_errors(loop)
        quiet = loop.get_exception_handler()
        def counted(loop, context):  # tells the test each time asyncio reports a failure
            print("failure", flush=True)
            quiet(loop, context)
        loop.set_exception_handler(counted)
        held = []
        def take(reader, writer):
            held.append(writer)
        server = await asyncio.start_server(take, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
    asyncio.run(main())
""")


def test_running_out_of_descriptors_logs_one_line_not_a_traceback_per_accept() -> None:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conns = []
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        for _ in range(120):  # far more than 48 descriptors: accept fails again and again
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for _ in range(3):  # asyncio retries accepting once a second, and fails each time
            assert proc.stdout.readline().strip() == "failure"
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()
        err = proc.stderr.read()
        proc.wait(30)
    finally:
        for c in conns:
            c.close()
        proc.kill()
    assert "Traceback" not in err
    assert err.count("cannot accept connections") == 1, err
