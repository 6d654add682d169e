"""The ``grant-in`` message: what a receiving daemon hands its application with a socket;
``adopt-in``, what the application offers back to a daemon that restarted under it; and the
sending side's ``grant``."""

from __future__ import annotations

from typing import Any

import pytest

from meshd.channel.events import Feedback
from meshd.channel.inbound import InGrant
from meshd.channel.stream import Grant
from meshd.errors import ProtocolError
from meshd.local.handover import (decode_adopt_in, decode_grant, decode_in_grant,
                                  encode_adopt_in, encode_grant, encode_in_grant)


def _grant(messages: int = 9) -> InGrant:
    return InGrant(b"c" * 16, 1, b"s" * 32, b"r" * 32, 1, 2, 5, 3, (1, 2, 3, 4, 5), messages,
                   4096, False, "frames", b"k" * 32)


def test_a_grant_comes_back_as_it_was_sent_with_how_far_the_ipc_socket_went() -> None:
    g = _grant()
    info = decode_in_grant(encode_in_grant(g, "aps", "direct", b"left", (64, 1 << 20), 7))
    assert info.grant == g
    assert (info.sender_name, info.path, info.leftover) == ("aps", "direct", b"left")
    assert info.window == (64, 1 << 20)
    assert info.ipc_until == 7


def test_a_grant_without_the_ipc_mark_waits_for_nothing() -> None:
    """A grant from a daemon that sends no ``iu``: the application waits for no ipc delivery
    (it did, for every message before the link's first, and hung when an earlier receiver
    had taken them)."""
    m = encode_in_grant(_grant(), "aps", "direct", b"", (64, 1 << 20))
    del m["iu"]
    assert decode_in_grant(m).ipc_until == 0


@pytest.mark.parametrize("bad", [-1, 10, True, "3", 2.5, None])
def test_an_ipc_mark_that_is_not_a_count_up_to_the_grants_messages_is_refused(bad: Any) -> None:
    m = encode_in_grant(_grant(messages=9), "aps", "direct", b"", (64, 1 << 20))
    m["iu"] = bad
    with pytest.raises(ProtocolError) as err:
        decode_in_grant(m)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("live", [True, False])
def test_an_adoption_comes_back_as_it_was_sent(live: bool) -> None:
    g = _grant()
    info, ctl_end, got_live = decode_adopt_in(encode_adopt_in(g, 77, "aps", "reversed", live))
    assert info.grant == g and (info.sender_name, info.path) == ("aps", "reversed")
    assert ctl_end == 77 and got_live is live


@pytest.mark.parametrize("field,bad", [("ce", -1), ("ce", True), ("ce", "7"), ("ce", None),
                                       ("live", 1), ("live", None), ("cid", 5), ("rx", [1])])
def test_a_malformed_adoption_is_refused(field: str, bad: Any) -> None:
    m = encode_adopt_in(_grant(), 77, "aps", "direct", True)
    m[field] = bad
    with pytest.raises(ProtocolError) as err:
        decode_adopt_in(m)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("relay", [None, b"v" * 32])
def test_a_sending_grant_comes_back_with_its_relay(relay: bytes | None) -> None:
    """``grant`` (to a sending application) carries the relay, which the application gives a
    daemon that restarted under it, so that revoking the relay still cuts the channel."""
    g = Grant(b"c" * 16, 1, b"s" * 32, b"r" * 32, 1, 2, 5, 3, 64, 1 << 20,
              Feedback(1, 2, 3, False), "relay" if relay else "direct", b"k" * 32, b"left",
              relay)
    assert decode_grant(encode_grant(g)) == g


@pytest.mark.parametrize("bad", [10 ** 11, "v" * 32, [1]])
def test_a_sending_grant_whose_relay_is_not_bytes_is_refused(bad: Any) -> None:
    m = encode_grant(Grant(b"c" * 16, 1, b"s" * 32, b"r" * 32, 1, 2, 5, 3, 64, 1 << 20, None,
                           "relay", b"k" * 32))
    m["relay"] = bad
    with pytest.raises(ProtocolError) as err:
        decode_grant(m)
    assert err.value.reason == "malformed"
