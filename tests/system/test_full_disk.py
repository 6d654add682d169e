"""A daemon whose state directory's disk fills up (a real 4 MiB tmpfs, which needs root, as the
whole suite runs; no skipping): every change it cannot write is refused with one line that says
so, the daemon keeps running and serving, nothing half-written stays in memory or on disk, and
once there is room again it takes changes, catches up with the mesh and restarts with its state
whole."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshd.testing.processes import wait_until
from tests.helpers import invite, meshd, state_dump, verified_names

pytestmark = pytest.mark.system


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs at ``tmp_path / "alcf"`` (set up before ``sites``, so removed after its
    daemons stopped)."""
    mount = tmp_path / "alcf"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"cannot mount a small tmpfs (the suite runs as root): {r.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; the file that fills it."""
    filler = disk / "filler"
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as fh:
        for size in (64 << 10, 4096, 512, 1):
            try:
                while True:
                    fh.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


def _refused_in_one_line(r: subprocess.CompletedProcess[str], what: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "free some space" in lines[0], r.stderr


def test_a_full_disk_refuses_changes_clearly_and_loses_nothing(small_disk: Path,
                                                               sites: Any) -> None:
    aps = sites("aps")
    alcf = sites("alcf", start=False)  # its state directory is the small disk
    assert alcf.home == small_disk
    (alcf.home / "daemon.log").symlink_to(small_disk.parent / "alcf.log")  # the log has room
    alcf.start()  # it founds the mesh; aps joins as an introducer
    r = aps.cli("join", input=invite(alcf, "--role", "introducer"))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: verified_names(alcf) == {"aps", "alcf"}, 60, "aps to join")
    before = state_dump(alcf)

    filler = _fill(small_disk)
    _refused_in_one_line(alcf.cli("invite", "--name", "dcs"), "cannot write the state store")
    _refused_in_one_line(alcf.cli("expose", "svc", "127.0.0.1:9", "--allow", "aps"),
                         "cannot write the tunnel registry")
    assert alcf.json("services") == []  # not in memory either
    # A rotation whose new key cannot be written is not announced: the key stays.
    key_before = (small_disk / "site.key").read_bytes()
    _refused_in_one_line(alcf.cli("rotate"), "cannot write site key")
    assert (small_disk / "site.key").read_bytes() == key_before
    assert sorted(p.name for p in small_disk.iterdir() if "key" in p.name) == ["site.key"]
    assert not list(small_disk.glob("*.tmp"))
    # A change that comes from the mesh: a new site, whose record alcf cannot store yet.
    dcs = sites("dcs")
    r = dcs.cli("join", input=invite(aps, "--name", "dcs"))
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "cannot write the state store" in alcf.log(), 60,
               "alcf to meet dcs's record and be unable to store it")
    assert alcf.proc is not None and alcf.proc.poll() is None
    assert alcf.client.status()["name"] == "alcf"
    assert state_dump(alcf) == before  # nothing half-written

    filler.unlink()  # room again: it takes changes, and catches up with the mesh
    assert alcf.cli("expose", "svc", "127.0.0.1:9", "--allow", "aps").returncode == 0
    wait_until(lambda: "dcs" in verified_names(alcf), 90, "alcf to store dcs's record")
    assert alcf.stop() == 0
    alcf.start()
    assert [s["name"] for s in alcf.json("services")] == ["svc"]
    wait_until(lambda: verified_names(alcf) == {"aps", "alcf", "dcs"}, 60,
               "alcf to know every site after its restart")
    assert alcf.cli("rotate").returncode == 0  # with room, the rotation goes through
    wait_until(lambda: verified_names(aps) == {"aps", "alcf", "dcs"}
               and (small_disk / "site.key").read_bytes() != key_before, 60,
               "the mesh to follow alcf's new key")
    assert "Traceback" not in alcf.log(), alcf.log()


def test_init_on_a_full_disk_says_so_and_can_be_run_again(small_disk: Path) -> None:
    home = small_disk / "site"
    filler = _fill(small_disk)
    r = meshd("init", "--name", "aps", home=home)
    _refused_in_one_line(r, "cannot write the config")
    assert not list(home.glob("*.tmp")) and not (home / "site.key").exists()
    filler.unlink()
    r = meshd("init", "--name", "aps", home=home)
    assert r.returncode == 0, r.stderr
    assert (home / "site.key").exists() and (home / "config.toml").exists()
