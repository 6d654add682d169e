"""The codec of the ``chan`` control messages: byte-identical round trips and rejections."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.channel import control
from meshd.channel.control import DialRequest, ReachReport, ReachRequest, RelayNotice
from meshd.channel.reach import Outcome
from meshd.errors import ProtocolError

CID = bytes(range(16))
KEY = bytes(range(32))


def packb(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize("msg, op, body", [
    (DialRequest(CID), "dial", {"cid": CID}),
    (DialRequest(CID, b"hello"), "dial", {"cid": CID, "hello": b"hello"}),
    (RelayNotice(CID, KEY), "relay", {"cid": CID, "from": KEY}),
    (ReachRequest(), "reach?", {}),
    (ReachReport((("10.0.0.1:7000", True, 0.25), ("10.0.0.2:7000", False, 0.0))), "reach",
     {"results": [["10.0.0.1:7000", True, 0.25], ["10.0.0.2:7000", False, 0.0]]}),
])
def test_the_wire_format_is_the_msgpack_map_and_round_trips(msg: control.ControlMessage, op: str,
                                                            body: dict[str, object]) -> None:
    assert control.encode(msg) == (op, packb(body))
    assert control.decode(op, packb(body)) == msg
    assert control.peer_message(msg) == {"t": "chan", "id": 0, "op": op, "b": packb(body)}


@pytest.mark.parametrize("op, body", [
    ("dial", b"\xc1"),                                  # not msgpack
    ("dial", packb([CID])),                             # not a map
    ("dial", packb({"cid": CID[:15]})),                 # short id
    ("dial", packb({"cid": "x" * 16})),                 # not bytes
    ("dial", packb({"cid": CID, "hello": "text"})),     # hello not bytes
    ("dial", packb({"cid": CID, "hello": b"h" * 5000})),  # oversized field
    ("relay", packb({"cid": CID})),                     # from missing
    ("relay", packb({"cid": CID, "from": KEY[:31]})),
    ("reach", packb({})),                               # results missing
    ("reach", packb({"results": "no"})),
    ("reach", packb({"results": list(range(100))})),     # too long an array
    ("teleport", packb({})),                            # unknown op
])
def test_malformed_bodies_are_protocol_errors(op: str, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        control.decode(op, body)


def test_a_reach_report_keeps_malformed_entries_as_failures() -> None:
    report = control.decode("reach", packb({"results": [["a", True, "slow"], 5, ["b", True, 1]]}))
    assert report == ReachReport((("a", False, 0.0), ("?", False, 0.0), ("b", True, 1.0)))
    assert report.outcome is Outcome.OK and report.rtt == 1.0
    assert control.decode("reach", packb({"results": [[1, 2, 3]]})).outcome is Outcome.FAILED
    assert control.decode("reach", packb({"results": []})).outcome is Outcome.UNKNOWN


@given(cid=st.binary(min_size=16, max_size=16), hello=st.none() | st.binary(max_size=300),
       sender=st.binary(min_size=32, max_size=32))
def test_round_trips(cid: bytes, hello: bytes | None, sender: bytes) -> None:
    for msg in (DialRequest(cid, hello), RelayNotice(cid, sender)):
        assert control.decode(*control.encode(msg)) == msg


@given(op=st.sampled_from(control.OPS), body=st.binary(max_size=200))
def test_garbage_is_a_protocol_error_or_a_message(op: str, body: bytes) -> None:
    try:
        msg = control.decode(op, body)
    except ProtocolError:
        return
    assert isinstance(msg, (DialRequest, RelayNotice, ReachRequest, ReachReport))
