"""Fixtures that start real ``meshd`` daemons as separate processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from meshd.client import Client
from meshd.demo import start_daemon, wait_until

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
        self.proc = start_daemon(self.home, self.home / "daemon.log")
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


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Any]:
    """``sites(name, listen="127.0.0.1:0")`` makes and starts a real daemon; all are stopped after."""
    made: list[Site] = []

    def make(name: str, listen: str | None = "127.0.0.1:0", start: bool = True) -> Site:
        home = tmp_path / name
        args = ["init", "--name", name] + (["--listen", listen] if listen else ["--no-listen"])
        r = meshd(*args, home=home)
        assert r.returncode == 0, r.stderr
        site = Site(name, home)
        made.append(site)
        return site.start() if start else site

    yield make
    for site in made:
        if site.proc is not None:
            code = site.stop()
            assert code == 0, f"{site.name} did not stop cleanly (exit {code}):\n{site.log()}"
