"""Helpers shared by the tests: real ``meshd`` processes, meshes of them, and the network lab."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from meshd.app.client import Client
from meshd.testing.processes import start_daemon, wait_until


ROOT = Path(__file__).resolve().parent.parent


def meshd(*args: str, home: Path | None = None, input: str | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real ``meshd`` command line in a child process."""
    cmd = [sys.executable, "-m", "meshd", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                          env=env)


def meshd_json(*args: str, home: Path) -> Any:
    r = meshd(*args, "--json", home=home)
    assert r.returncode == 0, f"meshd {' '.join(args)} failed: {r.stderr}"
    return json.loads(r.stdout)


@dataclass
class Site:
    name: str
    home: Path
    proc: subprocess.Popen[bytes] | None = None
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = Client(self.home)

    def start(self) -> "Site":
        return self.launch().wait_up()

    def launch(self) -> "Site":
        """Start the daemon without waiting for it (see :meth:`wait_up`)."""
        self.proc = start_daemon(self.home, self.home / "daemon.log")
        return self

    def wait_up(self) -> "Site":
        """Wait until the daemon answers on its control socket."""
        wait_until(self.client.status, 30, f"the daemon of {self.name}")
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(20)
        self.proc = None

    def log(self) -> str:
        path = self.home / "daemon.log"
        return path.read_text() if path.exists() else ""

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return meshd(*args, home=self.home, input=input)

    def json(self, *args: str) -> Any:
        return meshd_json(*args, home=self.home)


def invite(site: Site, *args: str) -> str:
    r = site.cli("invite", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def as_email(token: str) -> str:
    """The token after a mail client: quoted, CRLF line ends, prose around it."""
    quoted = "".join(f"> {line}\r\n" for line in token.splitlines())
    return f"Hello,\r\nhere is the invitation:\r\n{quoted}\r\nregards\r\n"


def verified_names(site: Site) -> set[str]:
    return {p["name"] for p in site.client.peers() if p["verified"]}


VOLATILE_META = ("incarnation",)
"""Meta rows a live daemon rewrites on its own (a SWIM refutation under load bumps the
incarnation): left out of :func:`state_dump`."""


def state_dump(site: Site) -> list[Any]:
    """The stored trust state and invitations, to compare before and after an attack."""
    db = sqlite3.connect(site.home / "state.db")
    try:
        return [[r for r in db.execute(f"SELECT * FROM {t} ORDER BY 1")
                 if t != "meta" or r[0] not in VOLATILE_META]
                for t in ("meta", "site_records", "vouches", "revocations", "invitations",
                          "redemptions")]
    finally:
        db.close()


def set_config(site: Site, line: str) -> None:
    """Replace one ``key = value`` line of a site's config.toml."""
    path = site.home / "config.toml"
    key = line.split("=")[0].strip()
    lines = [line if ln.split("=")[0].strip() == key else ln
             for ln in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


def mesh_of(sites: Any, *names: str, configs: dict[str, str] | None = None,
            listen: dict[str, str | None] | None = None) -> list[Site]:
    made = []
    for n in names:
        s = sites(n, listen=(listen or {}).get(n, "127.0.0.1:0"), start=False)
        for line in (configs or {}).get(n, "").splitlines():
            set_config(s, line)
        made.append(s.launch())  # all start at once; the waits follow
    for up in made:
        up.wait_up()
    token = invite(made[0], "--uses", str(len(made) - 1))
    for s in made[1:]:
        r = s.cli("join", input=token)
        assert r.returncode == 0, r.stderr
    for s in made:
        wait_until(lambda s=s: {p["name"]: p["state"] for p in s.client.peers()}
                   == {n: "alive" for n in names}, 60, f"{s.name} to see every site alive")
    return made


LAB = ROOT / "bootstrap" / "lab"


def lab(*args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(LAB), *args], check=False, capture_output=True,
                          text=True, timeout=timeout, **kw)


def lab_up(*args: str) -> None:
    down = lab("down")
    assert down.returncode == 0, f"bootstrap/lab down failed:\n{down.stdout}{down.stderr}"
    r = lab("up", *args)
    if r.returncode != 0:
        pytest.fail(f"bootstrap/lab up {' '.join(args)} failed ({r.returncode}):\n"
                    f"{r.stdout}{r.stderr}", pytrace=False)


# -- what the hostile suites measure of a live daemon --------------------------------------------

def rss(site: Site) -> int:
    """The daemon's resident memory in bytes."""
    assert site.proc is not None
    for line in Path(f"/proc/{site.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(site: Site) -> int:
    assert site.proc is not None
    return len(os.listdir(f"/proc/{site.proc.pid}/fd"))


def status_times(site: Site, n: int = 20) -> list[float]:
    """Round trips of ``n`` status calls over the control socket, in seconds."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        site.client.status()
        out.append(time.perf_counter() - t0)
    return out


def closed_by_peer(s: socket.socket) -> bool:
    """True once the daemon has closed (or reset) this connection."""
    try:
        s.settimeout(0.0)
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def channel_works(sender: Site, receiver: Site, name: str) -> None:
    """An array from ``sender`` reaches ``receiver`` over a new channel ``name``."""
    import numpy as np

    import meshd as api

    with api.connect(receiver.home) as mr, api.connect(sender.home) as ms:
        rx = mr.receiver(name)
        tx = ms.sender(name, to=receiver.name)
        tx.send(np.arange(1000))
        tx.flush(timeout=30)
        assert np.array_equal(rx.recv(timeout=30).array, np.arange(1000))
