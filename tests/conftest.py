"""Fixtures shared by every test, and the layer markers.

Each test directory is one rung of the testing ladder and carries its marker, so a part of the
suite can be selected: ``unit`` (pure cores, no sockets), ``glue`` (the asyncio glue pumped with
real cores and fake or in-process transports), ``system`` (real ``meshd run`` processes over real
sockets) and ``lab`` (network namespaces and iptables; needs root, fails when the lab cannot be
built).  ``python3 -m pytest -m "unit or glue"`` is the fast part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import settings

from meshd.testing.processes import stop_daemons
from tests.helpers import Site, meshd

LAYERS = ("unit", "glue", "system", "lab")

# Property tests check what holds, never how fast: no per-example deadline, which a loaded
# machine's scheduling would break (hypothesis's default is 200 ms).
settings.register_profile("meshd", deadline=None)
settings.load_profile("meshd")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        layer = Path(str(item.fspath)).parent.name
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


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
    running = [site for site in made if site.proc is not None]
    # All stop at once: each one's leave and goodbyes overlap the others'.
    codes = stop_daemons(site.proc for site in running if site.proc is not None)
    for site, code in zip(running, codes):
        site.proc = None
        assert code == 0, f"{site.name} did not stop cleanly (exit {code}):\n{site.log()}"
