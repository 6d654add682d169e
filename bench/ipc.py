"""Raw pyzmq vs meshd's array codec, PUSH/PULL over ipc:// between two processes; print JSON.

    python bench/ipc.py --json [--bytes 1073741824] [--max-messages 200000]

One run.  The sender is a separate process (multiprocessing spawn); this process receives.
For each message size (64 B, 64 KiB, 1 MiB, 16 MiB) and each mode it sends
``min(--max-messages, max(64, --bytes // size))`` messages:

- ``raw``: one ``bytes`` frame, ``send(copy=False)`` / ``recv(copy=False)``;
- ``codec``: a float32 array of that many bytes, ``send_array`` / ``recv_array``
  (header frame + zero-copy buffer frame, decoded into an ``np.frombuffer`` view).

pyzmq copies frames under ``zmq.COPY_THRESHOLD`` (64 KiB) even with ``copy=False``.  The clock
runs on the receiver from the "go" it sends the sender to the last message received.  MB/s is
10**6 bytes of payload (headers not counted) per second.  Both sides close with a linger and
terminate their context.  This is a benchmark, not a test: figures vary with machine and load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import msgpack
import numpy as np
import zmq

from meshd.channel.arrays import encode_message, recv_array, send_array

SIZES = {"64B": 64, "64KiB": 64 << 10, "1MiB": 1 << 20, "16MiB": 16 << 20}
MODES = ("raw", "codec")
TIMEOUT_MS = 60_000


def sender(data_addr: str, ctl_addr: str) -> None:
    """Wait for ``[mode, size, count]`` on the control socket, send, repeat until ``stop``."""
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        ctl.connect(ctl_addr)
        push.connect(data_addr)
        while True:
            cmd = msgpack.unpackb(ctl.recv())
            if cmd == "stop":
                break
            mode, size, count = cmd
            if mode == "raw":
                payload = os.urandom(size)
                for _ in range(count):
                    push.send(payload, copy=False)
            else:
                arr = np.random.default_rng(size).standard_normal(size // 4).astype("<f4")
                for _ in range(count):
                    send_array(push, arr)
    finally:
        push.close(linger=TIMEOUT_MS)  # zero-copy sends still queued would be lost without it
        ctl.close(linger=TIMEOUT_MS)
        ctx.term()


def receive(pull: Any, mode: str, size: int, count: int) -> None:
    if mode == "raw":
        for _ in range(count):
            frame = pull.recv(copy=False)
        if len(frame.buffer) != size:
            raise RuntimeError(f"raw: got {len(frame.buffer)} bytes, expected {size}")
    else:
        for _ in range(count):
            msg = recv_array(pull)
        if msg.array.dtype != np.float32 or msg.array.nbytes != size:
            raise RuntimeError(f"codec: got {msg.array.dtype} {msg.array.shape}")


def run(total_bytes: int, max_messages: int) -> dict[str, dict[str, dict[str, float]]]:
    tmp = tempfile.mkdtemp(prefix="meshd-bench-")
    data_addr, ctl_addr = f"ipc://{tmp}/data", f"ipc://{tmp}/ctl"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ctl = ctx.socket(zmq.PUSH)
    pull.rcvtimeo = TIMEOUT_MS
    ctl.sndtimeo = TIMEOUT_MS
    pull.bind(data_addr)
    ctl.bind(ctl_addr)
    proc = mp.get_context("spawn").Process(target=sender, args=(data_addr, ctl_addr))
    proc.start()
    results: dict[str, dict[str, dict[str, float]]] = {m: {} for m in MODES}
    try:
        for name, size in SIZES.items():
            count = min(max_messages, max(64, total_bytes // size))
            for mode in MODES:
                t0 = time.perf_counter()
                ctl.send(msgpack.packb([mode, size, count]))
                receive(pull, mode, size, count)
                dt = time.perf_counter() - t0
                results[mode][name] = {
                    "messages": count,
                    "seconds": round(dt, 4),
                    "MB_s": round(count * size / dt / 1e6, 1),
                    "msg_s": round(count / dt),
                }
        ctl.send(msgpack.packb("stop"))
        proc.join(TIMEOUT_MS / 1000)
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        pull.close(linger=0)
        ctl.close(linger=1000)
        ctx.term()
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.exitcode != 0:
        raise RuntimeError(f"sender exited with {proc.exitcode}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object (the default "
                   "prints a table)")
    p.add_argument("--bytes", type=int, default=1 << 30, help="payload bytes per size and mode")
    p.add_argument("--max-messages", type=int, default=200_000)
    args = p.parse_args(argv)
    results = run(args.bytes, args.max_messages)
    header = encode_message(np.zeros(16, "<f4"))[0]
    report = {
        "bench": "ipc push/pull, separate processes",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "numpy": np.__version__,
        "codec_header_bytes": len(header),
        "results": results,
        "codec_vs_raw": {name: round(results["codec"][name]["MB_s"]
                                     / results["raw"][name]["MB_s"], 2) for name in SIZES},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'size':>6} {'raw MB/s':>10} {'raw msg/s':>10} {'codec MB/s':>11} "
              f"{'codec msg/s':>11} {'ratio':>6}")
        for name in SIZES:
            r, c = results["raw"][name], results["codec"][name]
            print(f"{name:>6} {r['MB_s']:>10} {r['msg_s']:>10} {c['MB_s']:>11} "
                  f"{c['msg_s']:>11} {report['codec_vs_raw'][name]:>6}")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
