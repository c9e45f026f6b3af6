"""policy/wire.py: the payload sniff and the ids reader the per-message path relies on, against protobuf.

- events_by_id reads the ids a full parse reads, and refuses what the full parser refuses;
- wire.payload's shortcut for the usual payload answers as the field-by-field walk does, and calls
  IRREGULAR (left to the full parser) what protobuf refuses.
"""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from test_properties import SETTINGS
from test_sidecar_support import event, metadata, payload, sensitive

from telemetry_guard.policy import wire
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

PAYLOADS = {
    "plain": payload(event("a"), event("b")),
    "empty": payload(),
    "unknown fields": payload(event("u1", unknown=True), sensitive("u2")),
    "duplicates and unicode": payload(event("d"), event("d"), event("ü-ñ-\u6f22"), event("")),
    "metadata message": metadata("licensed_instance"),
    "no payload": pb.RecordEventsRequest(),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_events_by_id_reads_the_ids_a_full_parse_reads(name: str) -> None:
    data = PAYLOADS[name].SerializeToString()
    full = pb.RecordEventsRequest.FromString(data)
    expected = [e.id for e in full.events.events] if full.WhichOneof("payload") == "events" else []
    assert [e.id for e in wire.events_by_id(data)] == expected


def test_events_by_id_refuses_what_does_not_parse() -> None:
    with pytest.raises(DecodeError):
        wire.events_by_id(b"\x12\x05\x0a")  # events payload longer than the bytes


# -- wire.payload ------------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@st.composite
def shaped(draw: st.DrawFn) -> bytes:
    """Bytes that start as an events payload does, their length right, wrong, padded or too long."""
    body = draw(st.binary(max_size=40))
    length = _varint(len(body) + draw(st.sampled_from([0, 0, 0, -1, 1, 200])) if body else 0)
    if draw(st.booleans()):
        length = bytes(b | 0x80 for b in length) + b"\x80" * draw(st.integers(0, 10)) + b"\x00"  # padded varint
    return b"\x12" + length + body + draw(st.sampled_from([b"", b"", b"\x0a\x00", b"\x12\x00", b"\x08"]))


@SETTINGS
@given(
    shaped()
    | st.binary(max_size=12)
    | st.builds(lambda r: r.SerializeToString(), st.sampled_from(list(PAYLOADS.values())))
)
def test_payload_shortcut_answers_as_the_walk(data: bytes) -> None:
    assert wire.payload(data) == wire._walk(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\x92\x80\x80\x80\x80\x00\x00",  # events, its tag in 6 bytes
        b"\x8a\x80\x80\x80\x80\x80\x80\x80\x00\x00",  # metadata, its tag in 9 bytes
        b"\x12\x80\x80\x80\x80\x80\x00",  # events, its length in 6 bytes
        b"\x12\x00\x8a\xa2\xd4\xe4\x1a\x00",  # a tag past 32 bits (field 898497297) after the payload
    ],
)
def test_payload_sniff_refuses_what_protobuf_refuses(data: bytes) -> None:
    """Tags and lengths in more than 5 bytes, and tags past 32 bits, are DecodeErrors to protobuf (upb)."""
    with pytest.raises(DecodeError):
        pb.RecordEventsRequest.FromString(data)
    assert wire.payload(data) == wire._walk(data) == wire.IRREGULAR
