"""The owner's bound on target connections follows the open-file limit the daemon runs with.

Found in review: the bound was computed when the daemon was built, before ``meshd run`` raises
its soft limit, so on a host whose soft limit is 1024 every tunnel stream past 256 was reset
``busy`` whatever the raised limit."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from meshd.daemon.counters import Counters
from meshd.daemon.tasks import TaskSet
from meshd.daemon.tunnels.owner import Owning
from meshd.peer.limits import FD_RESERVE


@pytest.fixture
def limit() -> Iterator[tuple[int, int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_total_is_read_from_the_limit_when_it_is_needed(limit: tuple[int, int]) -> None:
    soft, hard = limit
    low = 1024
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.fail(f"this test needs a hard open-file limit of at least 4096 (it is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    owning = Owning(exposed={}, name_of=lambda key: "x", is_member=lambda key: True,
                    counters=Counters(), tasks=TaskSet("test"))
    assert owning.total == (low - FD_RESERVE) // 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # what `meshd run` does later
    assert owning.total == (4096 - FD_RESERVE) // 2


def test_a_given_total_is_kept() -> None:
    owning = Owning(exposed={}, name_of=lambda key: "x", is_member=lambda key: True,
                    counters=Counters(), tasks=TaskSet("test"), total=7)
    assert owning.total == 7
