"""What must hold for every fuzz case: the two engine paths agree, outputs keep the privacy invariants,
and refusals are clean.

(a) RecordEvents: Engine(policy) (C fast path where it applies) and Engine(policy, accelerate=False)
    (the Python reference) both refuse the bytes with DecodeError, or return equal decisions and
    outputs that parse to equal messages; record_events_admitted answers as record_events_bytes; a
    bytearray or memoryview gets the answer of bytes. RecordEvent answers as a one-event RecordEvents
    payload, and both engines give it equal decisions and write the same request; a user metadata
    payload the C walk takes (Engine.user_metadata_bytes) gets the reference's decision and message,
    and the walk takes nothing the parser refuses. The sidecar's
    payload sniff (policy/wire.py) never calls EVENTS or METADATA what
    protobuf reads otherwise, and its ids of the forwarded events are the parser's.
(b) On every output, parsed by protobuf: no marketing_tracking where the kind drops it; no
    private_metadata key outside the allowlist entry, no non-string value in allowlist mode, none at
    all in drop mode; no field the kind drops; no event the filter or the validity rule removes; no
    legacy_metadata the kind merges; no unknown field at any depth where the kind discards them;
    PublishInstanceUserMetadata: only the policy's fields. No decision record holds a value.
(c) A refusal is a DecodeError or a denial with a gRPC status; any other exception escapes.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from bench.fuzz.inputs import MARKER, PUBLISH, RECORD_EVENT, RECORD_EVENTS, Case
from telemetry_guard.policy import Engine, default_policy, fieldpaths, load_policy, validity, wire
from telemetry_guard.policy.engine import Outcome
from telemetry_guard.policy.model import Policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

POLICY_DIR = Path(__file__).parent / "policies"


class Finding(AssertionError):
    """A disagreement between the paths, or a broken invariant."""


@cache
def policies() -> dict[str, Policy]:
    """The policies fuzzed: the default one and one per rule family (bench/fuzz/policies)."""
    return {"default": default_policy(), **{p.stem: load_policy(p) for p in sorted(POLICY_DIR.glob("*.yaml"))}}


@cache
def engines(name: str) -> tuple[Engine, Engine]:
    """(fast, reference) engines of a policy."""
    return Engine(policies()[name]), Engine(policies()[name], accelerate=False)


def check(case: Case) -> str:
    """Run one case; returns what happened (for the tally); raises Finding."""
    if case.rpc == RECORD_EVENTS:
        return record_events(case)
    if case.rpc == RECORD_EVENT:
        return record_event(case)
    if case.rpc == PUBLISH:
        return publish(case)
    raise ValueError(f"unknown rpc {case.rpc}")


def expect(condition: bool, what: str, case: Case) -> None:
    if not condition:
        raise Finding(f"{what}\n{case}")


# --- RecordEvents -------------------------------------------------------------------------------------


def buffered(data: bytes, how: str) -> bytes | bytearray | memoryview:
    if how == "bytearray":
        return bytearray(data)
    return memoryview(data) if how == "memoryview" else data


def attempt(call: Any, *args: Any) -> Outcome[bytes] | str:
    """The outcome, or "DecodeError" (a clean refusal); every other exception escapes."""
    try:
        outcome: Outcome[bytes] = call(*args)
    except DecodeError:
        return "DecodeError"
    if outcome.request is None:
        assert outcome.denial is not None, "no output and no denial"
        assert outcome.denial.code is not None and outcome.denial.rule
    return outcome


def same(a: Outcome[bytes] | str, b: Outcome[bytes] | str, what: str, case: Case) -> None:
    if isinstance(a, str) or isinstance(b, str):
        expect(a == b, f"{what}: {short(a)} != {short(b)}", case)
        return
    # What the fast path knows before its records are built (all the sidecar reads at info), then the records.
    expect(a.decision.counts() == b.decision.counts(), f"{what}: counts differ", case)
    expect(a.decision.dropped_event_ids == b.decision.dropped_event_ids, f"{what}: removed ids differ", case)
    expect(a.decision == b.decision, f"{what}: decisions differ:\n{a.decision}\n{b.decision}", case)
    expect(parsed(a.request, case) == parsed(b.request, case), f"{what}: outputs differ", case)


def same_message(a: Outcome[Any], b: Outcome[Any], what: str, case: Case) -> None:
    """same(), for the RPCs whose outcome holds a message: equal decisions, the same bytes written."""
    expect(a.decision.counts() == b.decision.counts(), f"{what}: counts differ", case)
    expect(a.decision == b.decision, f"{what}: decisions differ:\n{a.decision}\n{b.decision}", case)
    written = [None if o.request is None else o.request.SerializeToString(deterministic=True) for o in (a, b)]
    expect(written[0] == written[1], f"{what}: outputs differ", case)


def _walked_users(fast: Engine, case: Case) -> Outcome[bytes] | None:
    """Engine.user_metadata_bytes for the case's bytes, as a stream admitted as its identifier would call it
    (None: the walk does not take them, or no stream would be admitted)."""
    identifier = case.identifier
    kind = None if identifier is None else identifier.WhichOneof("identifier")
    if identifier is None or kind is None or not isinstance(fast.check_access(PUBLISH, identifier, "Bearer x"), str):
        return None
    override = fast.override_for(identifier)
    return fast.user_metadata_bytes(case.data, kind, override=None if override is None else override.name)


def short(outcome: Outcome[bytes] | str) -> str:
    return outcome if isinstance(outcome, str) else f"output of {len(outcome.request or b'')} bytes"


def parsed(data: bytes | None, case: Case, kind: type[Message] = pb.RecordEventsRequest) -> Message | None:
    """An output as protobuf reads it: it must read it (maps compare as maps)."""
    if data is None:
        return None
    try:
        return kind.FromString(data)
    except DecodeError:
        raise Finding(f"an output protobuf cannot parse: {data.hex()}\n{case}") from None


def record_events(case: Case) -> str:
    fast, slow = engines(case.policy)
    got = attempt(fast.record_events_bytes, buffered(case.data, case.buffer), case.identifier)
    reference = attempt(slow.record_events_bytes, case.data, case.identifier)
    same(got, reference, "fast path vs reference", case)
    expect(sniff_agrees(case.data), "the sidecar's sniff disagrees with protobuf", case)
    if isinstance(reference, str):
        return "refused: DecodeError"
    if reference.decision.denial is not None:
        return "refused: denial"
    if case.identifier is not None and reference.decision.kind is not None:  # the sidecar's per-payload call
        for engine in (fast, slow):
            admitted = attempt(engine.record_events_admitted, case.data, reference.decision.kind)
            same(admitted, reference, "record_events_admitted vs record_events_bytes", case)
    output = parsed(reference.request, case)
    kind = reference.decision.kind
    assert isinstance(output, pb.RecordEventsRequest) and kind is not None
    invariants(case, kind, list(output.events.events), output)
    if output.WhichOneof("payload") == "events":
        ids = [e.id for e in wire.events_by_id(reference.request or b"")]
        expect(ids == [e.id for e in output.events.events], "the sidecar's forwarded ids differ", case)
    no_values_in(reference, case)
    took = fast._plans[kind].fast if kind in fast._plans else None
    if took is not None and took.filter(case.data, fast._resolvers[kind]) is not None:
        return "passed: fast path"
    return "passed: Python path"


@cache
def _shallow() -> type[Message]:
    """RecordEventsRequest as far as the sidecar's sniff reads it: its payload oneof, members unparsed."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="fuzz/shallow.proto", package="fuzz", syntax="proto3")
    message = proto.message_type.add(name="Shallow")
    message.oneof_decl.add(name="payload")
    for name, number in (("metadata", wire.METADATA), ("events", wire.EVENTS)):
        message.field.add(name=name, number=number, type=field.TYPE_BYTES, label=field.LABEL_OPTIONAL, oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fuzz.Shallow"))


def sniff_agrees(data: bytes) -> bool:
    """wire.payload against protobuf reading the top level only: IRREGULAR (the full parser judges) is
    always allowed; any other answer must be protobuf's (what lies inside a payload is the engine's)."""
    sniffed = wire.payload(data)
    if sniffed == wire.IRREGULAR:
        return True
    try:
        top: Any = _shallow().FromString(data)
    except DecodeError:
        return False  # the top level itself is broken: the sniff must say so
    member = top.WhichOneof("payload")
    expected = {None: wire.NONE, "metadata": wire.METADATA, "events": wire.EVENTS}[member]
    return sniffed == expected


# --- invariants -----------------------------------------------------------------------------------------


def invariants(case: Case, kind: str, events: list[pb.Event], message: Message) -> None:
    rules = policies()[case.policy].kinds[kind]
    allowlist = policies()[case.policy].allowlist
    pm = rules.private_metadata
    removers = [fieldpaths.remover(_resolved(path)) for path in rules.drop_fields.value]
    for ev in events:
        if rules.marketing_tracking.value == "drop":
            expect(not ev.HasField("marketing_tracking"), "marketing_tracking left a kind that drops it", case)
        struct = ev.parameters.private_metadata
        if pm.mode == "drop":
            expect(not ev.parameters.HasField("private_metadata"), "private_metadata left in drop mode", case)
        elif pm.mode == "allowlist" and ev.parameters.HasField("private_metadata"):
            entry = allowlist.lookup(ev.feature, ev.action)
            expect(entry is not None, "private_metadata left for an event type without an allowlist entry", case)
            assert entry is not None
            expect(set(struct.fields) <= entry.keys, f"keys outside the allowlist: {set(struct.fields)}", case)
            kinds = {v.WhichOneof("kind") for v in struct.fields.values()}
            expect(kinds <= {"string_value"}, f"a non-string value kept: {kinds}", case)
        probe = pb.Event()
        probe.CopyFrom(ev)
        expect(not any(remove(probe) for remove in removers), "a field drop_fields removes was kept", case)
        expect(rules.events.rejects(ev.feature) is None, "an event the filter removes was kept", case)
        if rules.invalid_events.value == "drop":
            valid = validity.event_problem(ev) is None
            expect(valid, f"an invalid event was kept: {validity.event_problem(ev)}", case)
        if rules.legacy_metadata.value == "merge":
            expect(not ev.parameters.legacy_metadata, "legacy_metadata was kept by a kind that merges it", case)
    if rules.unknown_fields.value == "discard":
        expect(unknowns(message) == [], f"unknown fields left: {unknowns(message)}", case)


@cache
def _resolved(path: str) -> Any:
    return fieldpaths.resolve(path)


def unknowns(message: Message) -> list[int]:
    """The numbers of the unknown fields anywhere in a message tree, however deep."""
    found = [f.field_number for f in UnknownFieldSet(message)]  # type: ignore[attr-defined]
    for fd, item in message.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            items = item.values() if fd.message_type.fields_by_name["value"].message_type is not None else []
        else:
            items = item if fd.is_repeated else [item]
        for sub in items:
            found += unknowns(sub)
    return found


def no_values_in(outcome: Outcome[Any], case: Case) -> None:
    """No value in a decision record; with_keys adds the names of removed private_metadata keys and nothing else.

    A key name is what the caller wrote as a key, and may itself spell anything (mutated bytes can put a
    value's bytes inside a key), so it is not searched for values: the record with keys must be the record
    without them, plus `keys` lists.
    """
    plain = outcome.decision.to_dict(with_keys=False)
    text = json.dumps(_without(plain, _NAMES), ensure_ascii=False)
    expect(MARKER not in text and "mkt.example" not in text, "a value in a decision record", case)
    with_keys = outcome.decision.to_dict(with_keys=True)
    expect(_without(with_keys, {"keys"}) == plain, "with_keys adds more than keys", case)


# What a record names as the caller wrote it, not a removed value: the request's and events' ids, and
# feature and action (mutated bytes can move a value into one of them; they leave with their event).
_NAMES = frozenset({"request_id", "dropped_event_ids", "id", "feature", "action"})


def _without(record: Any, names: frozenset[str] | set[str]) -> Any:
    if isinstance(record, dict):
        return {k: _without(v, names) for k, v in record.items() if k not in names or isinstance(v, dict)}
    if isinstance(record, list):
        return [_without(v, names) for v in record]
    return record


# --- RecordEvent and PublishInstanceUserMetadata: one path each ------------------------------------------


def record_event(case: Case) -> str:
    fast, slow = engines(case.policy)
    try:
        request = pb.RecordEventRequest.FromString(case.data)
    except DecodeError:
        return "refused: DecodeError"
    event = request.event.SerializeToString() if request.HasField("event") else None
    copy = pb.RecordEventRequest()
    copy.CopyFrom(request)
    outcome = slow.record_event(request)
    # The fast path (the event on the C walk where it applies): the same decision, the same request.
    same_message(fast.record_event(copy), outcome, "RecordEvent", case)
    if outcome.request is None:
        expect(outcome.denial is not None and bool(outcome.denial.rule), "no output and no denial", case)
        return "refused: denial"
    output = parsed(outcome.request.SerializeToString(), case, pb.RecordEventRequest)
    assert isinstance(output, pb.RecordEventRequest) and outcome.decision.kind is not None
    invariants(case, outcome.decision.kind, [output.event] if output.HasField("event") else [], output)
    no_values_in(outcome, case)
    # The same event as a one-event RecordEvents payload, through the fast path: the same answer.
    payload = pb.RecordEventsRequest()
    payload.events.events.add().MergeFromString(event or b"")
    as_batch = fast.record_events_admitted(payload.SerializeToString(), outcome.decision.kind)
    if as_batch.denial is None:
        expect(as_batch.decision.events == outcome.decision.events, "RecordEvent records differ from a batch's", case)
        left = parsed(as_batch.request, case)
        assert isinstance(left, pb.RecordEventsRequest)
        unary = [output.event] if output.HasField("event") else []
        expect(unary == list(left.events.events), "RecordEvent output differs from a batch's", case)
    return "passed: both paths"


def publish(case: Case) -> str:
    fast, slow = engines(case.policy)
    walked = _walked_users(fast, case)
    try:
        request = pb.PublishInstanceUserMetadataRequest.FromString(case.data)
    except DecodeError:
        expect(walked is None, "the walk took user metadata the parser refuses", case)
        return "refused: DecodeError"
    given = pb.PublishInstanceUserMetadataRequest()
    given.CopyFrom(request)
    outcome = slow.publish_instance_user_metadata(request, case.identifier)
    if outcome.request is None:
        expect(outcome.denial is not None and bool(outcome.denial.rule), "no output and no denial", case)
        return "refused: denial"
    output = parsed(outcome.request.SerializeToString(), case, pb.PublishInstanceUserMetadataRequest)
    if walked is not None:  # the C walk (a stream admitted as this identifier): the same decision and message
        expect(walked.decision == outcome.decision, f"user metadata: decisions differ: {walked.decision}", case)
        on_walk = parsed(walked.request, case, pb.PublishInstanceUserMetadataRequest)
        expect(on_walk == output, "user metadata: the walk's output differs", case)
    assert isinstance(output, pb.PublishInstanceUserMetadataRequest) and outcome.decision.kind is not None
    keep = policies()[case.policy].user_metadata
    users = (given.user_metadata.users, output.user_metadata.users, frozenset(keep.user_fields))
    organizations = given.organization_metadata.organizations, output.organization_metadata.organizations
    pairs: list[tuple[Any, Any, frozenset[str]]] = [users, (*organizations, frozenset(keep.organization_fields))]
    for before, after, allowed in pairs:
        expect(len(before) == len(after), "items added or removed", case)
        for old, new in zip(before, after, strict=True):
            for fd, item in new.ListFields():
                expect(fd.name in allowed, f"{fd.name} left, which the policy withholds", case)
                expect(item == getattr(old, fd.name), f"{fd.name} changed", case)
            for name in allowed:
                expect(getattr(new, name) == getattr(old, name), f"{name} was withheld", case)
    if policies()[case.policy].kinds[outcome.decision.kind].unknown_fields.value == "discard":
        expect(unknowns(output) == [], "unknown fields left", case)
    no_values_in(outcome, case)
    return "passed: Python path" if walked is None else "passed: both paths"
