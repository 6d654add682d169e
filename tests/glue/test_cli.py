"""The command line in-process: its parser, its exit codes, ``--json`` and what it asks the
control socket, against a stand-in daemon served on a real unix socket (aiohttp)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import threading
from collections.abc import Iterator
from email.mime.text import MIMEText
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshd.cli.main import duration, main
from meshd.local import api
from meshd.trust import tokens

from tests.unit.test_tokens import RICH


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_init_makes_a_private_site_and_reports_it_as_json(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "aps"
    code, out, _ = run(capsys, "init", "--name", "aps-8id", "--listen", "127.0.0.1:0",
                       "--home", str(home), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "aps-8id" and data["listen"] == "127.0.0.1:0"
    assert data["home"] == str(home) and len(data["fingerprint"]) > 8
    assert stat.S_IMODE(os.stat(home / "site.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700


def test_a_second_init_is_refused_with_one_line_and_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "aps"
    assert run(capsys, "init", "--name", "aps", "--home", str(home))[0] == 0
    key = (home / "site.key").read_bytes()
    code, out, err = run(capsys, "init", "--name", "other", "--home", str(home))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "already exists" in err
    assert (home / "site.key").read_bytes() == key


def test_a_bad_site_name_is_a_clear_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "init", "--name", "no spaces!", "--home", str(tmp_path / "x"),
                         "--json")
    assert code == 1
    assert json.loads(out)["error"]["reason"] == "usage"
    assert "site name" in err and not (tmp_path / "x").exists()


def test_without_a_daemon_the_exit_status_is_3_and_says_how_to_start_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "aps"
    run(capsys, "init", "--name", "aps", "--home", str(home))
    code, _, err = run(capsys, "status", "--home", str(home))
    assert code == 3 and "meshd run" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["invite", "--expires", "soon"])
    assert exc.value.code == 2
    assert "not a duration" in capsys.readouterr().err


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("72h", 259200),
                                          ("3d", 259200), ("1w", 604800), ("15", 15)])
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


class StandIn:
    """A stand-in daemon on ``home/control.sock``: canned answers, every request recorded."""

    def __init__(self, home: Path, answers: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.home = home
        self.answers = answers
        self.requests: list[tuple[str, str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body))
        status, data = self.answers[(request.method, request.path)]
        return web.json_response(data, status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.home / "control.sock")).start()

    def __enter__(self) -> StandIn:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    h = tmp_path / "site"
    h.mkdir(mode=0o700)
    yield h


STATUS = {"name": "aps-8id", "site_id": "abc", "fingerprint": "AAAA-BBBB", "mesh_id": None,
          "mesh_name": None, "role": None, "listen": None, "addrs": [], "members": 0,
          "version": "0.1.0", "pid": 1, "counters": {}}


def test_status_is_a_thin_caller_of_the_control_socket(home: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with StandIn(home, {("GET", api.STATUS): (200, STATUS)}) as daemon:
        code, out, _ = run(capsys, "status", "--home", str(home), "--json")
        assert code == 0 and json.loads(out) == STATUS
        code, out, _ = run(capsys, "status", "--home", str(home))
    assert code == 0 and "aps-8id" in out and "AAAA-BBBB" in out and "dial-out only" in out
    assert daemon.requests == [("GET", api.STATUS, None)] * 2


def test_a_refusal_from_the_daemon_is_one_line_and_exit_1(home: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    refused = api.error_body("not-found", "no member named or identified as 'x'; see meshd peers")
    with StandIn(home, {("POST", api.REVOKE): (400, refused)}) as daemon:
        code, out, err = run(capsys, "revoke", "x", "--reason", "gone", "--home", str(home),
                             "--json")
    assert code == 1
    assert json.loads(out) == refused
    assert err == "meshd: error: no member named or identified as 'x'; see meshd peers\n"
    assert daemon.requests == [("POST", api.REVOKE, {"site": "x", "reason": "gone"})]


def _joined(inviter: str) -> dict[str, Any]:
    return {"id": "j1", "state": "admitted", "inviter": inviter, "inviter_name": "aps-8id",
            "inviter_fingerprint": "CCCC-DDDD", "fingerprint": "AAAA-BBBB", "mesh_id": "m",
            "approve": False, "error": None}


def test_join_reads_a_base64_mail_from_stdin_and_sends_only_the_token(
        home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    msg = MIMEText("Hi \u2014 here it is:\n" + tokens.armor(RICH), "plain", "utf-8")
    msg["Subject"] = "meshd invitation"
    assert msg["Content-Transfer-Encoding"] == "base64"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(bytes(msg)), encoding="ascii"))
    with StandIn(home, {("POST", api.JOINS): (200, _joined("abc"))}) as daemon:
        code, out, err = run(capsys, "join", "--home", str(home))
    assert code == 0, err
    assert "Joined" in out
    assert daemon.requests == [("POST", api.JOINS, {"text": tokens.encode(RICH)})]


def test_join_refuses_an_oversized_file_naming_the_limit_without_asking_the_daemon(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = tmp_path / "huge.eml"
    big.write_bytes(b"x" * (3 * tokens.MAX_INPUT + 5))
    with StandIn(home, {}) as daemon:
        code, out, err = run(capsys, "join", str(big), "--home", str(home))
    assert code == 1 and out == ""
    assert (f"input of {3 * tokens.MAX_INPUT + 5} bytes exceeds the limit of {tokens.MAX_INPUT}"
            " bytes") in err
    assert err.count("\n") == 1 and daemon.requests == []


def test_join_with_a_missing_file_is_one_line_and_exit_1(home: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "join", str(tmp_path / "nope.eml"), "--home", str(home))
    assert code == 1 and out == ""
    assert err == f"meshd: error: cannot read {tmp_path / 'nope.eml'}: No such file or directory\n"


def test_an_interrupt_while_the_command_line_is_imported_exits_130_quietly(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while Python was importing the command line printed a traceback (the installed
    ``meshd`` script imported it before any handler of ours ran)."""
    import importlib.abc
    import sys

    from meshd.cli import run

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name == "meshd.cli.main":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "meshd.cli.main")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    assert run(["--version"]) == 130
    assert capsys.readouterr().err == ""
