"""What an operator does by mistake, against the real CLI and real daemons: each is one line on
stderr and exit 1 (3: no daemon), nothing changed, no traceback.  Found by attacking the
operational surface (state directories, signals, pipes, endless input)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Site, meshd, mesh_of

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def one_line(r: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


def test_init_refuses_a_directory_with_things_in_it_and_leaves_its_mode(tmp_path: Path) -> None:
    """Before: ``init --home /tmp`` (or ``~``) made it 0700, shutting other users out."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "theirs").write_text("data")
    err = one_line(meshd("init", "--name", "x", "--listen", "127.0.0.1:0", home=shared))
    assert "is not empty" in err
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert sorted(p.name for p in shared.iterdir()) == ["theirs"]


def test_an_empty_home_is_refused_not_taken_as_the_current_directory(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "meshd", "init", "--name", "y", "--home", ""],
                       cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=60)
    assert "--home is empty" in one_line(r)
    assert list(tmp_path.iterdir()) == []


def test_a_home_too_long_for_a_unix_socket_is_refused_by_init_and_the_client(
        tmp_path: Path) -> None:
    """Before: init took it, then run, status and stop each died on ``AF_UNIX path too long``."""
    long_home = tmp_path / ("x" * (110 - len(str(tmp_path))))
    err = one_line(meshd("init", "--name", "l", "--listen", "127.0.0.1:0", home=long_home))
    assert "too long for the daemon's unix sockets" in err and not long_home.exists()
    assert "too long" in one_line(meshd("status", home=long_home))


def test_join_refuses_an_endless_stream_quickly(tmp_path: Path) -> None:
    """Before: ``meshd join /dev/zero`` (or ``yes | meshd join``) read for ever to count it."""
    home = tmp_path / "site"
    assert meshd("init", "--name", "j", "--listen", "127.0.0.1:0", home=home).returncode == 0
    err = one_line(meshd("join", "/dev/zero", home=home, timeout=60))
    assert "the input of more than" in err and "exceeds the limit" in err
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        r = subprocess.run([sys.executable, "-m", "meshd", "join", "--home", str(home)],
                           stdin=yes.stdout, capture_output=True, text=True, env=ENV, timeout=60)
    finally:
        yes.kill()
        yes.wait()
    assert "the input of more than" in one_line(r)


def test_a_reader_that_left_the_pipe_is_no_traceback(sites: Any) -> None:
    """``meshd peers | head -1``: the reader may be gone before the output is written."""
    a = sites("aps")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left already: every write fails with EPIPE
    try:
        r = subprocess.run([sys.executable, "-m", "meshd", "status", "--home", str(a.home)],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, env=ENV,
                           timeout=60)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr


def test_stop_waits_for_a_daemon_whose_control_socket_closed_already(tmp_path: Path) -> None:
    """Before: a second ``meshd stop`` that came after the first had closed the daemon's control
    socket said no daemon runs (exit 3) while it was still on its way out.  Here the pid file
    names a live meshd process with no control socket, as late in a stop."""
    home = tmp_path / "site"
    assert meshd("init", "--name", "s", "--listen", "127.0.0.1:0", home=home).returncode == 0
    late = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "meshd"],
                            stdin=subprocess.PIPE)
    try:
        (home / "daemon.pid").write_text(f"{late.pid}\n")
        stop = subprocess.Popen([sys.executable, "-m", "meshd", "stop", "--home", str(home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=ENV)
        assert stop.stderr is not None and stop.stdout is not None
        assert stop.stderr.readline() == f"stopping meshd (pid {late.pid}) for {home} ...\n"
        assert stop.poll() is None  # it waits for the process
        assert late.stdin is not None
        late.stdin.close()  # the process ends
        assert stop.wait(30) == 0
        assert stop.stdout.read().startswith(f"stopped meshd (pid {late.pid}) in ")
    finally:
        late.kill()
        late.wait()
    (home / "daemon.pid").write_text(f"{late.pid}\n")  # a stale pid file: no daemon at all
    assert "no meshd daemon is running" in one_line(meshd("stop", home=home), code=3)


def test_sighup_stops_the_daemon_gracefully(sites: Any) -> None:
    """Before: the terminal of a ``meshd run &`` closing killed it (signal -1): no leave
    notice, the control socket and the pid file left behind."""
    a = sites("aps")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    assert a.proc.wait(30) == 0
    a.proc = None
    assert "stopped; state flushed" in a.log()
    assert not (a.home / "control.sock").exists() and not (a.home / "daemon.pid").exists()


@pytest.mark.parametrize("name", ["control.sock", "handover.sock"])
def test_a_file_where_a_socket_goes_is_left_alone(tmp_path: Path, name: str) -> None:
    """Before: a regular file at control.sock was deleted without a word, a directory there was
    a traceback; at handover.sock a file was deleted too.  Nothing is bound before the check:
    no pid file, and the other socket is not made."""
    home = tmp_path / "site"
    assert meshd("init", "--name", "c", "--listen", "127.0.0.1:0", home=home).returncode == 0
    sock = home / name
    sock.write_text("precious")
    assert "is not a socket" in one_line(meshd("run", home=home, timeout=60))
    assert sock.read_text() == "precious"
    sock.unlink()
    sock.mkdir()
    assert "is not a socket" in one_line(meshd("run", home=home, timeout=60))
    assert sock.is_dir()
    sock.rmdir()
    sock.symlink_to(tmp_path / "elsewhere")
    assert "is not a socket" in one_line(meshd("run", home=home, timeout=60))
    assert sock.is_symlink() and not (tmp_path / "elsewhere").exists()
    assert not (home / "daemon.pid").exists()
    assert {p.name for p in home.iterdir()} & {"control.sock", "handover.sock"} == {name}


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    home = tmp_path / "site"
    assert meshd("init", "--name", "s", "--listen", "127.0.0.1:0", home=home).returncode == 0
    target = tmp_path / "elsewhere"
    (home / "daemon.lock").symlink_to(target)
    assert "daemon.lock" in one_line(meshd("run", home=home, timeout=60))
    assert not target.exists()


def test_stop_of_a_frozen_daemon_gives_up_within_its_timeout(sites: Any) -> None:
    """Before: ``--timeout 2`` waited the client's own 30 s for the status."""
    a = sites("aps")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        err = one_line(meshd("stop", "--timeout", "2", home=a.home, timeout=60))
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert "did not answer /v1/status within 2 s" in err
    assert Site("aps", a.home).client.status()["pid"] == a.proc.pid


def test_a_home_renamed_under_its_daemon_costs_the_new_site_there_nothing(sites: Any) -> None:
    """Before: the old daemon's stop unlinked control.sock, handover.sock and daemon.pid by
    name, at the old path, which now belonged to a new site: that daemon ran on unreachable.
    And ``meshd stop`` trusted the moved, stale pid file and waited its whole timeout."""
    old = sites("aps")
    assert old.proc is not None
    moved = old.home.with_name("aps-moved")
    old.home.rename(moved)
    new = sites("aps")  # a new site where the old one was
    assert new.proc is not None and new.home == old.home
    r = meshd("stop", "--json", home=moved, timeout=60)
    assert r.returncode == 0, r.stderr
    assert old.proc.wait(10) == 0
    old.proc = None
    assert new.client.status()["pid"] == new.proc.pid
    for name in ("control.sock", "handover.sock", "daemon.pid"):
        assert (new.home / name).exists(), name


def test_rotate_warns_when_a_member_did_not_hear_of_it(sites: Any) -> None:
    """The operator is told how many members heard of the rotation while the old key still
    opened their doors (one that missed it learns it later: see the membership tests)."""
    a, b = mesh_of(sites, "aps", "alcf")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        r = b.cli("rotate", "--json")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["told"], out["members"]) == (0, 1)
    assert "warning: only 0 of 1 members heard of the rotation" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_store_deleted_under_the_running_daemon_takes_no_more_writes(sites: Any) -> None:
    """Before: ``invite`` still answered after ``rm state.db*``, with a secret only the deleted
    file held (the invitation could never be redeemed after a restart)."""
    a = sites("aps")
    a.cli("invite")  # founds the mesh: the store has something to lose
    for f in a.home.glob("state.db*"):
        f.unlink()
    err = one_line(a.cli("invite"))
    assert "was removed or replaced while the daemon ran" in err
    assert a.proc is not None and a.client.status()["pid"] == a.proc.pid  # and it runs on
    assert "Traceback" not in a.log()
