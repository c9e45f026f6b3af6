"""RecordEvent on the fast path, against the Python reference.

RecordEvent judges its event as a one-event RecordEvents payload on the C walk (falling back to the Python
path where the walk says None). For the same request, `Engine(policy)` and `Engine(policy, accelerate=False)`
must give equal decisions (records, counts, dropped ids, denials) and requests that serialize to the same bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from test_fastpath import FAST, LICENSED, MANAGED, SLOW, WORKSPACE, engine_name, event, field, mutate, private
from test_properties import SETTINGS, append_unknown, scenarios, unknown_fields

from telemetry_guard.policy import Engine, unknown
from telemetry_guard.policy.engine import Outcome
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

Answer = Outcome[Any] | str


def same(fast: Answer, slow: Answer) -> Answer:
    """The two answers agree exactly; returns the fast one."""
    if isinstance(fast, str) or isinstance(slow, str):
        assert fast == slow, (fast, slow)
        return fast
    assert fast.decision.counts() == slow.decision.counts()
    assert fast.decision.dropped_event_ids == slow.decision.dropped_event_ids
    assert fast.decision == slow.decision
    assert fast.denial == slow.denial
    written = [None if o.request is None else o.request.SerializeToString(deterministic=True) for o in (fast, slow)]
    assert written[0] == written[1]
    return fast


# --- RecordEvent -------------------------------------------------------------------------------------------


def record_event(engine: Engine, data: bytes) -> Answer:
    try:
        request = pb.RecordEventRequest.FromString(data)
    except DecodeError:
        return "DecodeError"
    return engine.record_event(request)


def assert_same_event(name: str, data: bytes) -> Answer:
    return same(record_event(FAST[name], data), record_event(SLOW[name], data))


@st.composite
def unary_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A scenario's event (or none) as a RecordEvent request, unknown fields maybe added around it."""
    engine, _kind, ident, payload = draw(scenarios())
    request = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(request_id="r"))
    if ident is not None:
        request.metadata.identifier.CopyFrom(ident)
    events = payload.events.events
    if events:
        request.event.CopyFrom(events[draw(st.integers(0, len(events) - 1))])
    for target in draw(st.lists(st.sampled_from(["request", "metadata", "identifier"]), max_size=2)):
        message = {"request": request, "metadata": request.metadata, "identifier": request.metadata.identifier}
        append_unknown(message[target], draw(unknown_fields()))
    return engine_name(engine), request.SerializeToString()


@SETTINGS
@given(unary_requests())
def test_record_event_fast_and_python_paths_agree(case: tuple[str, bytes]) -> None:
    assert_same_event(*case)


@st.composite
def mutated_unary(draw: st.DrawFn) -> tuple[str, bytes]:
    name, data = draw(unary_requests())
    return name, mutate(draw, data)


@SETTINGS
@given(mutated_unary())
def test_record_event_mutated_bytes_get_the_same_answer_from_both_paths(case: tuple[str, bytes]) -> None:
    assert_same_event(*case)


def unary(ident: pb.Identifier, event_bytes: bytes) -> bytes:
    return field(1, field(2, ident.SerializeToString())) + field(2, event_bytes)


INVALID = event(feature=b"Not A Feature")  # a name the gateway refuses
SECRET = private((b"languageId", field(3, b"go")), (b"prompt", field(3, b"secret")))


@pytest.mark.parametrize(
    ("name", "ident", "data"),
    [
        ("properties", MANAGED, event(field(9, field(1, b"m")), SECRET)),  # marketing and private_metadata dropped
        ("properties", MANAGED, event(SECRET, b"\xa0\x06\x01")),  # an unknown field (100) in the event, discarded
        ("properties", MANAGED, event(feature=b"search.results")),  # filtered out whole: success, nothing sent
        ("invalid_events", MANAGED, INVALID),  # removed as invalid: INTERNAL, as the gateway fails it
        ("default", MANAGED, INVALID),  # forwarded
        ("default", WORKSPACE, event()),  # not served for RecordEvent: UNIMPLEMENTED
        ("default", MANAGED, event(field(3, b"SHADOWED"))),  # feature given twice: the walk leaves it to Python
        ("default", LICENSED, event()),  # not served for RecordEvent: UNIMPLEMENTED
    ],
)
def test_record_event_cases_agree(name: str, ident: pb.Identifier, data: bytes) -> None:
    assert_same_event(name, unary(ident, data))


def test_record_event_is_judged_on_the_c_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the Python filter out of order, a canonical event still gets the reference's answer: the walk gave it."""
    data = unary(MANAGED, event(field(9, field(1, b"m")), SECRET))
    expected = record_event(SLOW["properties"], data)
    assert not isinstance(expected, str) and expected.decision.counts(), "something to remove"

    def broken(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the Python path was taken")

    monkeypatch.setattr(Engine, "_filter_events", broken)
    same(record_event(FAST["properties"], data), expected)


def test_record_event_nested_past_the_payload_limit_is_refused_on_both_paths() -> None:
    """An event as deep as its own request allows is one level too deep as a payload's: INVALID_ARGUMENT (rule
    nesting) from both paths, and the same answers on the way down (each Struct level is three messages deep:
    a bottom of 0, 1 or 2 more messages reaches every depth)."""
    bottoms = (b"", field(1, field(1, b"k")), field(1, field(1, b"k") + field(2, b"")))
    answers = []
    for levels, bottom in ((levels, bottom) for levels in range(25, 40) for bottom in bottoms):
        struct = bottom
        for _ in range(levels):
            struct = field(1, field(1, b"k") + field(2, field(5, struct)))
        got = assert_same_event("default", unary(MANAGED, event(field(6, field(3, struct)))))
        if isinstance(got, str):
            break
        answers.append(got.denial)
    assert answers and answers[0] is None, "shallow enough: judged as usual"
    deepest = answers[-1]
    assert deepest is not None and (deepest.code.name, deepest.rule) == ("INVALID_ARGUMENT", "nesting")


def test_a_record_event_request_holds_structs_only_in_its_event() -> None:
    """What the fast path's upb discard of the rest of the request relies on (Engine._event_filtered)."""
    paths = unknown._paths(pb.RecordEventRequest.DESCRIPTOR)
    assert paths and all(path[0][0] == "event" for path in paths)
