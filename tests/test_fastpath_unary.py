"""RecordEvent and user metadata payloads on the fast path, against the Python reference.

RecordEvent judges its event as a one-event RecordEvents payload on the C walk (falling back to the Python
path where the walk says None). For the same request, `Engine(policy)` and `Engine(policy, accelerate=False)`
must give equal decisions (records, counts, dropped ids, denials) and requests that serialize to the same bytes.
A PublishInstanceUserMetadata user payload on the walk (`Engine.user_metadata_bytes`) must get the decision the
reference gives the parsed request and bytes that parse to the message it writes; bytes the parser refuses, the
walk never takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from test_fastpath import (
    FAST,
    LICENSED,
    MANAGED,
    SLOW,
    WORKSPACE,
    decided_alike,
    engine_name,
    event,
    field,
    mutate,
    private,
)
from test_properties import SETTINGS, append_unknown, scenarios, unknown_fields, varint

from telemetry_guard.interceptors.guard import CallTally, Guard
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy import Engine, access, load_policy, unknown
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, Outcome
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

Answer = Outcome[Any] | str


def same(fast: Answer, slow: Answer) -> Answer:
    """The two answers agree exactly; returns the fast one."""
    if decided_alike(fast, slow):
        assert not isinstance(fast, str) and not isinstance(slow, str)
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


@SETTINGS
@given(unary_requests(), st.booleans())
def test_record_event_admitted_is_record_event_once_admitted(case: tuple[str, bytes], accelerate: bool) -> None:
    """What the interceptors call once they have admitted the request themselves (the kind and override check_access
    found): the answer record_event gives, on both paths; a request it would refuse before its event is not asked."""
    name, data = case
    engine = (FAST if accelerate else SLOW)[name]
    whole = record_event(engine, data)
    assert not isinstance(whole, str)
    request = pb.RecordEventRequest.FromString(data)
    identifier = request.metadata.identifier if request.HasField("metadata") else None
    found = engine.check_access("RecordEvent", identifier, "Bearer token")
    if access.check_event(request) is not None or not isinstance(found, str):
        assert whole.denial is not None  # refused by record_event too, before its event is judged
        return
    matched = engine.override_for(identifier)
    admitted = engine.record_event_admitted(request, found, override=None if matched is None else matched.name)
    same(admitted, whole)


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


# --- PublishInstanceUserMetadata ---------------------------------------------------------------------------

ACCESS = "access:\n  PublishInstanceUserMetadata: [licensed_instance]\n"
WITHHOLDING = {  # name: (user_fields, organization_fields, unknown_fields)
    "email": ("[id, username, assigned_rbac_roles]", "[id, name, user_ids]", "discard"),
    "numbers": ("[assigned_rbac_roles]", "[user_ids]", "discard"),
    "repeated": ("[id, username]", "[id, name]", "discard"),
    "kept-unknown": ("[id, username, assigned_rbac_roles]", "[user_ids]", "keep"),
}


@pytest.fixture(scope="module")
def publish_engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Engine, Engine]]:
    folder = tmp_path_factory.mktemp("policies")
    engines = {}
    for name, (users, organizations, unknown_rule) in WITHHOLDING.items():
        path = folder / f"{name}.yaml"
        path.write_text(
            f"version: 1\n{ACCESS}user_metadata:\n  enabled: true\n  user_fields: {users}\n"
            f"  organization_fields: {organizations}\ndefaults:\n  unknown_fields: {unknown_rule}\n"
        )
        policy = load_policy(Path(path))
        engines[name] = (Engine(policy), Engine(policy, accelerate=False))
    return engines


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def item_fields() -> st.SearchStrategy[bytes]:
    """One field of a user or an organization as it may come on the wire: set, given its default, twice, with
    another wire type (a number as a length-delimited run of varints, a string as a varint), or unknown."""
    numbers = st.sampled_from([0, 1, 7, 2**40, 2**64 - 1])
    texts = st.sampled_from([b"", b"a", b"user-1", b"x@example.com"])
    return st.one_of(
        numbers.map(lambda v: varint_field(1, v)),  # id
        st.lists(numbers, max_size=3).map(lambda vs: field(1, b"".join(map(varint, vs)))),  # id, wrong wire type
        st.tuples(st.integers(2, 3), texts).map(lambda t: field(*t)),  # username / name, primary_email / display
        st.tuples(st.integers(2, 3), numbers).map(lambda t: varint_field(*t)),  # the same, wrong wire type
        texts.map(lambda t: field(4, t)),  # a role (users)
        st.lists(numbers, max_size=3).map(lambda vs: field(4, b"".join(map(varint, vs)))),  # user_ids packed
        numbers.map(lambda v: varint_field(4, v)),  # user_ids unpacked
        unknown_fields(),
    )


@st.composite
def metadata_payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(WITHHOLDING)))
    items = draw(st.lists(st.lists(item_fields(), max_size=6).map(b"".join), max_size=6))
    number = draw(st.sampled_from([2, 3]))  # user_metadata, organization_metadata
    extra = draw(st.lists(unknown_fields(), max_size=1))
    return name, field(number, b"".join(field(1, item) for item in items) + b"".join(extra))


def walked_and_reference(engines: tuple[Engine, Engine], data: bytes) -> tuple[Outcome[Any] | None, Answer]:
    """(Engine.user_metadata_bytes on the walk, or None where it does not take the bytes; the reference's answer
    for the parsed request, or "DecodeError")."""
    fast, slow = engines
    walked = fast.user_metadata_bytes(data, "licensed_instance")
    try:
        request = pb.PublishInstanceUserMetadataRequest.FromString(data)
    except DecodeError:
        return walked, "DecodeError"
    return walked, slow.publish_instance_user_metadata(request, LICENSED)


def assert_walk_agrees(engines: tuple[Engine, Engine], data: bytes) -> Outcome[Any] | None:
    """What the walk takes, the reference decides the same way and writes the same message; what the parser
    refuses, the walk never takes."""
    walked, reference = walked_and_reference(engines, data)
    if walked is None:
        return None
    assert not isinstance(reference, str), "the walk took bytes the parser refuses"
    assert walked.decision == reference.decision
    assert walked.decision.counts() == reference.decision.counts()
    parsed = pb.PublishInstanceUserMetadataRequest.FromString(walked.request)
    assert parsed.SerializeToString(deterministic=True) == reference.request.SerializeToString(deterministic=True)
    return walked


@SETTINGS
@given(metadata_payloads())
def test_user_metadata_on_the_walk_agrees_with_the_reference(
    publish_engines: dict[str, tuple[Engine, Engine]], case: tuple[str, bytes]
) -> None:
    name, data = case
    assert_walk_agrees(publish_engines[name], data)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> tuple[str, bytes]:
    name, data = draw(metadata_payloads())
    return name, mutate(draw, data)


@SETTINGS
@given(mutated_payloads())
def test_user_metadata_mutated_bytes_on_the_walk_agree_with_the_reference(
    publish_engines: dict[str, tuple[Engine, Engine]], case: tuple[str, bytes]
) -> None:
    name, data = case
    assert_walk_agrees(publish_engines[name], data)


def test_the_walk_serves_user_payloads_and_leaves_the_rest_to_python(
    publish_engines: dict[str, tuple[Engine, Engine]],
) -> None:
    """Users in the form exporters write them take the walk, withheld fields counted once per user; organizations,
    the stream's metadata message and a field given twice go to the reference."""
    users = b"".join(
        field(1, varint_field(1, i) + field(2, b"u") + field(3, b"e@x") + field(4, b"R")) for i in range(1, 4)
    )
    walked = assert_walk_agrees(publish_engines["email"], field(2, users))
    assert walked is not None
    assert walked.decision.counts() == {"user_metadata.user_fields": 3}
    assert b"e@x" not in walked.request
    walked = assert_walk_agrees(publish_engines["numbers"], field(2, users))
    assert walked is not None and walked.decision.counts() == {"user_metadata.user_fields": 9}
    organizations = field(3, field(1, varint_field(1, 1) + field(2, b"org")))
    metadata = field(1, field(1, b"request"))
    twice = field(2, field(1, field(3, b"SHADOWED") + field(3, b"e@x")))
    for data in (organizations, metadata, twice):
        assert publish_engines["email"][0].user_metadata_bytes(data, "licensed_instance") is None


class _Counted(CallTally):
    """A call's tally that keeps the removals per rule of every decision it is given."""

    def __init__(self) -> None:
        self.counts: list[dict[str, int]] = []

    def judged(self, kind: str | None, events_in: int, events_out: int, counts: dict[str, int]) -> None:
        self.counts.append(counts)


def _publish_stream(engine: Engine, first: Any) -> tuple[StreamGuard, _Counted]:
    """An admitted PublishInstanceUserMetadata stream (as a channel guards it: the caller's messages copied)."""
    tally = _Counted()
    guard = Guard(engine, side="client", copy_requests=True, tally=lambda rpc: tally)
    stream = StreamGuard(guard, PUBLISH_USER_METADATA, None)
    assert stream.accept(first) is not None
    stream.verify()
    return stream, tally


@pytest.mark.parametrize("form", ["bytes", "bytearray", "memoryview", "message"])
@pytest.mark.parametrize("payload", ["users", "field twice"])
def test_a_publish_stream_judges_user_payloads_on_their_bytes_in_every_form(
    publish_engines: dict[str, tuple[Engine, Engine]], form: str, payload: str
) -> None:
    """A user payload of an admitted stream takes the walk whatever form it comes in (a server's bytes, a proxy's
    buffer, an exporter's message) and leaves as the walk's bytes; bytes the walk does not take (a field given
    twice) are parsed whole. Either way the message and the counts are the reference's."""
    users = b"".join(field(1, varint_field(1, i) + field(2, b"u") + field(3, b"e@x")) for i in range(1, 4))
    twice = field(1, field(3, b"SHADOWED") + field(3, b"e@x"))
    data = field(2, users if payload == "users" else twice)
    metadata = pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(request_id="r", identifier=LICENSED)
    ).SerializeToString()

    def given(wire: bytes) -> Any:
        forms = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}
        return forms[form](wire) if form in forms else pb.PublishInstanceUserMetadataRequest.FromString(wire)

    passed = []
    for engine in publish_engines["email"]:  # the walk, then the reference
        stream, tally = _publish_stream(engine, given(metadata))
        passed.append((stream.accept(given(data)), tally.counts))
    (walked, walked_counts), (reference, reference_counts) = passed
    assert isinstance(reference, pb.PublishInstanceUserMetadataRequest)
    assert isinstance(walked, bytes) == (payload == "users" or form == "message")  # a message holds a field once
    if isinstance(walked, bytes):
        walked = pb.PublishInstanceUserMetadataRequest.FromString(walked)
    assert walked == reference
    assert b"e@x" not in reference.SerializeToString()
    removed = 3 if payload == "users" else 1
    assert walked_counts == reference_counts == [{}, {"user_metadata.user_fields": removed}]
