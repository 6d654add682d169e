"""Real daemons on loopback: invitations, approval, record propagation, refusals.

Every site is a separate ``meshd run`` process; the CLI runs as separate processes too, and talks
to the daemons over their real control sockets; the daemons talk over their real CURVE peer ports.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from meshd.state.home import Home, HomeLock
from meshd.trust import tokens
from meshd.testing.processes import wait_until

from tests.helpers import (
    ROOT, Site, as_email, invite, meshd, mesh_of, state_dump, verified_names)


def test_three_sites_join_by_email_and_approval(sites: Any) -> None:
    a, b, c = sites("aps-8id"), sites("alcf"), sites("nersc")

    token_ab = invite(a, "--name", "alcf", "--role", "introducer")
    assert token_ab.startswith("-----BEGIN MESHD INVITATION-----")
    r = b.cli("join", input=as_email(token_ab))
    assert r.returncode == 0, r.stderr + b.log()

    token_bc = invite(b, "--name", "nersc", "--approve")
    email = c.home / "invitation.eml"
    email.write_text(as_email(token_bc))
    join_c = subprocess.Popen(
        [sys.executable, "-m", "meshd", "join", str(email), "--home", str(c.home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pending = wait_until(lambda: b.json("pending"), 30, "the pending join at alcf")
    assert [p["name"] for p in pending] == ["nersc"]
    c_fp = c.json("status")["fingerprint"]
    assert pending[0]["fingerprint"] == c_fp
    assert c.client.peers() == []  # not admitted yet: nothing adopted
    r = b.cli("approve", c_fp.lower().replace("-", " "))
    assert r.returncode == 0, r.stderr
    out, err = join_c.communicate(timeout=60)
    assert join_c.returncode == 0, err + c.log()
    assert c_fp in err and b.json("status")["fingerprint"] in err  # both shown for the phone call

    for site in (a, b, c):
        wait_until(lambda s=site: verified_names(s) == {"aps-8id", "alcf", "nersc"}, 30,
                   f"{site.name} to know all three sites")
        peers = site.json("peers")
        assert {p["name"]: p["role"] for p in peers} == {
            "aps-8id": "introducer", "alcf": "introducer", "nersc": "member"}
        assert all(p["verified"] and p["site_id"] and p["state"] for p in peers)
        assert [p["name"] for p in peers if p["self"]] == [site.name]
        assert all(p["state"] in ("alive", "suspect", "dead", "left", "unseen") for p in peers)

    # nersc's role is member: it may not invite.
    r = c.cli("invite")
    assert r.returncode == 1 and "only introducers" in r.stderr

    # The used token is refused over the real sockets, also after the inviter restarts.
    assert a.stop() == 0
    a.start()
    d = sites("desy")
    r = d.cli("join", input=token_ab)
    assert r.returncode == 1
    assert "already been used" in r.stderr
    assert d.json("status")["mesh_id"] is None
    assert a.json("status")["counters"].get("joins_refused_used") == 1


def test_bad_tokens_are_refused_and_write_nothing(sites: Any) -> None:
    a = sites("aps-8id", start=False)
    config = a.home / "config.toml"
    config.write_text(config.read_text().replace("join_failure_base = 1.0",
                                                 "join_failure_base = 600.0"))
    a.start()
    d = sites("desy")
    token = invite(a, "--name", "desy")
    inv = tokens.parse(token)
    before = state_dump(d)

    expired = tokens.encode(tokens.Invitation(**{**_fields(inv), "expires": 1_000_000_000}))
    typo = _change_one_symbol(tokens.encode(inv))
    other_mesh = tokens.encode(tokens.Invitation(**{**_fields(inv), "mesh_id": b"\x01" * 16}))
    cases = {
        "expired": (expired, "expired"),
        "typo": (typo, "typo"),
        "truncated": (tokens.encode(inv)[:60], "cut short"),
        "missing": ("hello, no token here", "no meshd invitation"),
    }
    for name, (text, words) in cases.items():
        r = d.cli("join", input=text)
        assert r.returncode == 1, name
        assert words in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert state_dump(d) == before, name

    # For another mesh than the inviter's: refused by the inviter, nothing written.
    r = d.cli("join", input=other_mesh)
    assert r.returncode == 1 and "another mesh" in r.stderr, r.stderr
    assert state_dump(d) == before

    # A wrong secret is refused, counted, and the next try from the same source is slowed.
    wrong = tokens.encode(tokens.Invitation(**{**_fields(inv), "secret": b"\x00" * 16}))
    r1 = d.cli("join", "--json", input=wrong)
    assert r1.returncode == 1
    assert json.loads(r1.stdout)["error"]["reason"] == "unknown"
    r2 = d.cli("join", "--json", input=tokens.encode(inv))
    assert r2.returncode == 1 and json.loads(r2.stdout)["error"]["reason"] == "throttled"
    counters = a.json("status")["counters"]
    assert counters["joins_refused_unknown"] == 1 and counters["joins_refused_throttled"] == 1
    assert state_dump(d) == before


def _fields(inv: tokens.Invitation) -> dict[str, Any]:
    return {f: getattr(inv, f) for f in inv.__slots__}  # type: ignore[attr-defined]


def _change_one_symbol(token: str) -> str:
    i = len(token) // 2
    while token[i] == "-":
        i += 1
    new = "X" if token[i] != "X" else "Y"
    return token[:i] + new + token[i + 1:]


def test_cli_without_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    home = tmp_path / "site"
    assert meshd("init", "--name", "lonely", "--listen", "127.0.0.1:0", home=home).returncode == 0
    r = meshd("status", home=home)
    assert r.returncode == 3
    assert "no meshd daemon is running" in r.stderr and "meshd run" in r.stderr
    r = meshd("peers", "--json", home=home)
    assert r.returncode == 3 and json.loads(r.stdout)["error"]["reason"] == "not-running"


def test_init_refuses_overwrite_and_run_refuses_loose_key(tmp_path: Path) -> None:
    home = tmp_path / "site"
    r = meshd("init", "--name", "aps-8id", "--json", home=home)
    assert r.returncode == 0
    info = json.loads(r.stdout)
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", info["fingerprint"])
    assert (home / "site.key").stat().st_mode & 0o777 == 0o600
    assert (home / "state.db").stat().st_mode & 0o077 == 0
    assert "listen" in (home / "config.toml").read_text()
    key_before = (home / "site.key").read_bytes()
    r = meshd("init", "--name", "other", home=home)
    assert r.returncode == 1 and "already exists" in r.stderr
    assert (home / "site.key").read_bytes() == key_before
    (home / "site.key").chmod(0o644)
    r = meshd("run", home=home, timeout=30)
    assert r.returncode == 1
    assert "chmod 600" in r.stderr


def test_two_daemons_find_each_other_on_the_lan_without_addresses(sites: Any) -> None:
    a, b = sites("aps-8id"), sites("alcf")

    def sees(site: Site, other: Site) -> dict[str, Any] | None:
        other_id = other.json("status")["site_id"]
        hits = [s for s in site.client.peers(discovered=True) if s["site_id"] == other_id]
        return hits[0] if hits else None

    seen = wait_until(lambda: sees(a, b), 30, "aps-8id to see alcf by mDNS")
    assert seen["name"] == "alcf" and seen["member"] is False
    assert seen["addrs"] == [b.json("status")["listen"]]
    wait_until(lambda: sees(b, a), 30, "alcf to see aps-8id by mDNS")
    r = a.cli("peers", "--discovered", "--json")
    assert r.returncode == 0 and any(s["name"] == "alcf" for s in json.loads(r.stdout))
    # A stranger on the LAN is listed, never trusted: it is not among the members.
    assert "alcf" not in {p["name"] for p in a.client.peers()}


def test_meshd_stop_leaves_gracefully_waits_until_gone_and_the_port_is_free_again(
        sites: Any) -> None:
    """``meshd stop`` asks for the graceful stop (the others see the site *left*, not dead),
    returns once the process is gone, and a new daemon can start on the same port at once."""
    with socket.socket() as probe:  # a free port, named in the config so the restart reuses it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    a, b = mesh_of(sites, "aps", "alcf", listen={"alcf": f"127.0.0.1:{port}"})
    assert b.proc is not None
    pid = b.proc.pid
    r = b.cli("stop", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stopped"] is True and out["pid"] == pid
    assert b.proc.poll() == 0, "meshd stop returned before the daemon had exited cleanly"
    b.proc = None
    assert not (b.home / "daemon.pid").exists()
    r = b.cli("stop")
    assert r.returncode == 3 and "no meshd daemon is running" in r.stderr
    wait_until(lambda: {p["name"]: p["state"] for p in a.client.peers()}["alcf"] == "left", 30,
               "aps to see alcf leave")
    b.start()
    assert b.client.status()["listen"].endswith(f":{port}")
    wait_until(lambda: {p["name"]: p["state"] for p in a.client.peers()}["alcf"] == "alive", 60,
               "aps to see alcf back")
    assert "Traceback" not in b.log()


def test_a_second_daemon_for_a_running_home_is_refused_in_one_line_and_changes_nothing(
        sites: Any) -> None:
    """Before: the second ``meshd run`` bound a port (rewriting the running daemon's
    ``last_port``) and ended in a traceback on a fixed port.  Now the home's lock refuses it
    before it reads or changes anything."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for listen in ("127.0.0.1:0", f"127.0.0.1:{port}"):
        a = sites(f"aps-{listen.rpartition(':')[2]}", listen=listen)
        assert a.proc is not None
        before = state_dump(a)
        r = a.cli("run", "--json")
        assert r.returncode == 1, r.stderr
        assert f"another meshd daemon (pid {a.proc.pid}) is already running" in r.stderr
        assert "meshd stop --home" in r.stderr and "Traceback" not in r.stderr
        assert json.loads(r.stdout)["error"]["reason"] == "running"
        assert state_dump(a) == before
        assert a.client.status()["pid"] == a.proc.pid and a.proc.poll() is None


def test_a_peer_port_held_by_another_program_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        home = tmp_path / "site"
        assert meshd("init", "--name", "aps", "--listen", f"127.0.0.1:{port}",
                     home=home).returncode == 0
        r = meshd("run", home=home, timeout=30)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "config.toml" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (home / "control.sock").exists() and not (home / "daemon.pid").exists()


def test_a_new_daemon_waits_for_the_one_still_holding_the_home_then_starts(
        tmp_path: Path) -> None:
    """A restart right after a stop: the old daemon still holds the home (here the test holds
    its lock, as a daemon in its last steps of stopping does, with no control socket), so the
    new one says it waits, and starts as soon as the lock is let go."""
    home = tmp_path / "site"
    assert meshd("init", "--name", "aps", "--listen", "127.0.0.1:0", home=home).returncode == 0
    lock = HomeLock(Home(home))
    assert lock.try_acquire()
    site = Site("aps", home).launch()
    try:
        wait_until(lambda: "waiting for the daemon" in site.log(), 30, "the new daemon to wait")
        assert not (home / "control.sock").exists()
        lock.release()
        site.wait_up()
        assert site.client.status()["stopping"] is False
    finally:
        lock.release()
        assert site.stop() == 0
    assert "Traceback" not in site.log()


def test_a_damaged_state_store_is_refused_in_one_line_and_left_as_it_is(tmp_path: Path) -> None:
    """Before: a traceback (``sqlite3.DatabaseError``).  The file is the operator's evidence
    and maybe their only copy: it is neither repaired nor replaced."""
    home = tmp_path / "site"
    assert meshd("init", "--name", "aps", "--listen", "127.0.0.1:0", home=home).returncode == 0
    db = home / "state.db"
    good = db.read_bytes()
    for damaged in (b"this is not a database" * 200, good[:100]):
        db.write_bytes(damaged)
        r = meshd("run", "--json", home=home, timeout=30)
        assert r.returncode == 1
        assert f"the state store {db} is damaged" in r.stderr and "Traceback" not in r.stderr
        assert json.loads(r.stdout)["error"]["reason"] == "store-damaged"
        assert db.read_bytes() == damaged
        assert not (home / "control.sock").exists() and not (home / "daemon.pid").exists()
