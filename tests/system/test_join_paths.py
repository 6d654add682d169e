"""Joins through an alternate, denial, and durability across a crash, with real daemons."""

from __future__ import annotations

import subprocess
import sys
from email.mime.text import MIMEText
from typing import Any

from meshd.trust import tokens
from meshd.testing.processes import wait_until

from tests.helpers import invite, ROOT


def test_join_is_forwarded_by_an_alternate_when_the_inviter_is_unreachable(sites: Any) -> None:
    a, b, d = sites("aps-8id"), sites("alcf"), sites("desy")
    assert b.cli("join", input=invite(a, "--role", "introducer")).returncode == 0
    wait_until(lambda: sum(p["verified"] for p in a.client.peers()) == 2, 30, "alcf's record at aps-8id")
    inv = tokens.parse(invite(a, "--name", "desy"))
    assert [alt.key for alt in inv.alternates]  # alcf is named as an alternate
    # The joiner cannot reach the inviter at the address in the token (a firewall, say).
    blocked = tokens.Invitation(**{**{f: getattr(inv, f) for f in inv.__slots__},  # type: ignore[attr-defined]
                                   "addrs": (tokens.Address("127.0.0.1", 1),)})
    r = d.cli("join", input=tokens.armor(blocked))
    assert r.returncode == 0, r.stderr + d.log()
    assert b.json("status")["counters"]["joins_forwarded"] == 1
    for s in (a, b, d):
        wait_until(lambda s=s: sum(p["verified"] for p in s.client.peers()) == 3, 30,
                   f"{s.name} to know all three")


def test_denied_join_exits_non_zero_and_gives_the_use_back(sites: Any) -> None:
    a, e, f = sites("aps-8id"), sites("eve"), sites("frank")
    token = invite(a, "--approve")
    path = e.home / "token.txt"
    path.write_text(token)
    join = subprocess.Popen([sys.executable, "-m", "meshd", "join", str(path), "--home", str(e.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pending = wait_until(lambda: a.json("pending"), 30, "the pending join")
    r = a.cli("deny", pending[0]["fingerprint"])
    assert r.returncode == 0 and "denied" in r.stdout
    _, err = join.communicate(timeout=60)
    assert join.returncode == 1 and "denied" in err
    assert e.json("status")["mesh_id"] is None
    assert a.json("pending") == []
    # The denied site's attempt did not use the invitation up: the real invitee still can.
    path = f.home / "token.txt"
    path.write_text(token)
    join = subprocess.Popen([sys.executable, "-m", "meshd", "join", str(path), "--home", str(f.home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    pending = wait_until(lambda: a.json("pending"), 30, "frank's pending join")
    assert a.cli("approve", pending[0]["fingerprint"]).returncode == 0
    _, err = join.communicate(timeout=60)
    assert join.returncode == 0, err


def test_acknowledged_join_survives_an_inviter_crash(sites: Any) -> None:
    a, b, d = sites("aps-8id"), sites("alcf"), sites("desy")
    token = invite(a)
    assert b.cli("join", input=token).returncode == 0  # acknowledged to the joiner
    a.kill()
    a.start()
    peers = {p["name"]: p for p in a.json("peers")}
    assert peers["alcf"]["verified"] and peers["alcf"]["role"] == "member"
    r = d.cli("join", "--json", input=token)
    assert r.returncode == 1 and '"used"' in r.stdout


def test_join_from_a_base64_mail_on_stdin(sites: Any) -> None:
    """The mail as Python's email package writes it (``MIMEText`` sends a UTF-8 body as
    base64), whole, headers and all, on the stdin of the real ``meshd join``."""
    a, b = sites("aps-8id"), sites("alcf")
    msg = MIMEText("Hi \u2014 the invitation to our mesh:\n\n" + invite(a) + "\nBob\n", "plain", "utf-8")
    msg["From"], msg["To"], msg["Subject"] = "admin@aps.example", "admin@alcf.example", "meshd"
    assert msg["Content-Transfer-Encoding"] == "base64" and b"MESHD1" not in bytes(msg)
    r = subprocess.run([sys.executable, "-m", "meshd", "join", "--home", str(b.home)],
                       input=bytes(msg), capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr.decode() + b.log()
    assert b"Joined" in r.stdout
    wait_until(lambda: {p["name"] for p in a.client.peers() if p["verified"]} == {"aps-8id", "alcf"},
               30, "alcf's record at aps-8id")
