"""Properties of the engine over arbitrary requests (hypothesis).

Events are generated with random names (valid and invalid), random private_metadata
Structs with nested values, marketing tracking, legacy metadata, and unknown fields
appended as raw bytes at random depths; identifiers are arbitrary (some refused). The
expectations are read from the compiled policy, so the properties hold for every kind
of every policy below:

- a kind that drops marketing_tracking lets none leave;
- no private_metadata key leaves that the allowlist does not name for the event's type,
  every value that leaves in allowlist mode is a string, and no removed value leaves;
- no unknown field leaves when the kind discards them;
- filtering twice equals filtering once;
- a decision record never contains a value (private_metadata or marketing).

Every private_metadata string value and marketing URL carries the marker SECRET_..._END;
nothing else generated does (keys are lower-case letters, ids ev-N, names have no `_`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetry_guard.policy import Engine, default_policy, load_policy
from telemetry_guard.policy.kinds import GATEWAY_KINDS
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

POLICIES = Path(__file__).parent / "testdata" / "policies"
KINDS = ("licensed_instance", "unlicensed_instance", "managed_service", "workspace")
ENGINES = {
    "default": Engine(default_policy()),
    **{
        name: Engine(load_policy(POLICIES / f"{name}.yaml"))
        for name in ("properties", "private_metadata", "unknown_fields")
    },
}
MARKER = "SECRET_"
MARKED = r"SECRET_[0-9a-f]+_END"
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies ------------------------------------------------------------------------------------

secrets = st.text(alphabet="abcdef0123456789", min_size=1, max_size=6).map(lambda s: f"{MARKER}{s}_END")
ALLOWLISTED_KEYS = ["model", "languageId", "chatModel", "otherCompletionProviders"]
keys = st.sampled_from(ALLOWLISTED_KEYS) | st.sampled_from(["prompt", "query"]) | st.text(alphabet="abcxyz", max_size=4)
leaves = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False, width=64)
    | st.integers(-(2**40), 2**40)
    | secrets
)
values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=3),
    max_leaves=8,
)
features = (
    st.sampled_from(
        [
            "cody.chat",
            "cody.completion",
            "cody.hoverCommands",
            "cody.chatResponse",
            "cody.command.fix",
            "blob.codeintel",
            "search",
            "searchResults",
            "cody",
            "codyx",
            "blob.view",
        ]
    )
    | st.from_regex(r"[a-z][a-z.\-]{1,12}", fullmatch=True)
    | st.sampled_from(["", "Bad", "x", "a" * 65, "cody chat", "9lives"])
)
actions = st.sampled_from(["submitted", "executed", "visible", "accepted", "opened", "hovered", "*", "", "x"]) | (
    st.from_regex(r"[a-z][a-zA-Z\-]{1,10}", fullmatch=True)
)
# Event types with allowlist entries (builtin:sourcegraph and testdata/allowlists/small.yaml).
ALLOWLISTED = [
    ("cody.completion", "accepted"),
    ("cody.hoverCommands", "visible"),
    ("cody.chatResponse", "shown"),
    ("cody.command.fix", "executed"),
    ("blob.codeintel", "hovered"),
    ("cody.chat", "submitted"),
    ("cody.chat", "opened"),
]
SLOTS = [
    "request",
    "payload",
    "event",
    "timestamp",
    "source",
    "request_client",
    "client",
    "parameters",
    "private_metadata",
    "pm_value",
    "pm_nested",
    "billing",
    "user",
    "feature_flags",
    "marketing",
    "interaction",
    "geolocation",
]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """One field with a number no message of the protocol uses (>= 100), any wire type."""
    number = draw(st.integers(100, 2**20))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    if wire_type == 0:
        payload = varint(draw(st.integers(0, 2**64 - 1)))
    elif wire_type == 1:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif wire_type == 5:
        payload = draw(st.binary(min_size=4, max_size=4))
    else:
        data = draw(st.binary(max_size=12))
        payload = varint(len(data)) + data
    return varint(number << 3 | wire_type) + payload


def append_unknown(message: Message, raw: bytes) -> None:
    message.ParseFromString(message.SerializeToString() + raw)


def _nested_values(value: struct_pb2.Value) -> list[Message]:
    """struct_value / list_value messages inside a Value, depth first."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        inner = value.struct_value
        return [inner, *[m for v in inner.fields.values() for m in _nested_values(v)]]
    if kind == "list_value":
        inner_list = value.list_value
        return [inner_list, *[m for v in inner_list.values for m in _nested_values(v)]]
    return []


def slot_message(draw: st.DrawFn, request: pb.RecordEventsRequest, ev: pb.Event, slot: str) -> Message | None:
    params = ev.parameters
    pm = params.private_metadata.fields
    if slot == "request":
        return request
    if slot == "payload":
        return request.events
    if slot in ("pm_value", "pm_nested"):
        if not pm:
            return None
        value = pm[draw(st.sampled_from(sorted(pm)))]
        if slot == "pm_value":
            return value
        nested = _nested_values(value)
        return draw(st.sampled_from(nested)) if nested else None
    return {
        "event": ev,
        "timestamp": ev.timestamp,
        "source": ev.source,
        "request_client": ev.source.server.request_client,
        "client": ev.source.client,
        "parameters": params,
        "private_metadata": params.private_metadata,
        "billing": params.billing_metadata,
        "user": ev.user,
        "feature_flags": ev.feature_flags,
        "marketing": ev.marketing_tracking,
        "interaction": ev.interaction,
        "geolocation": ev.interaction.geolocation,
    }[slot]


@st.composite
def events(draw: st.DrawFn, index: int) -> pb.Event:
    feature, action = draw(st.sampled_from(ALLOWLISTED)) if draw(st.integers(0, 2)) else (draw(features), draw(actions))
    ev = pb.Event(id=draw(st.sampled_from([f"ev-{index}", f"ev-{index}", ""])), feature=feature, action=action)
    if draw(st.integers(0, 9)):
        ev.timestamp.FromSeconds(draw(st.integers(0, 2**33)))
    private = draw(st.dictionaries(keys, secrets | values, max_size=5)) if draw(st.integers(0, 2)) else None
    if private is not None:
        ev.parameters.private_metadata.update(private)
    legacy = draw(st.dictionaries(keys, st.integers(-(2**40), 2**40), max_size=3))
    ev.parameters.legacy_metadata.update(legacy)
    ev.parameters.metadata.update(draw(st.dictionaries(keys, st.floats(allow_nan=False, width=64), max_size=3)))
    if draw(st.booleans()):
        tracking = ev.marketing_tracking
        tracking.url = f"https://mkt.example/{draw(secrets)}"
        if draw(st.booleans()):
            tracking.referrer = f"https://mkt.example/{draw(secrets)}"
        if draw(st.booleans()):
            tracking.utm_source = draw(secrets)
    if draw(st.booleans()):
        ev.user.anonymous_user_id = "anon"
        ev.user.user_id = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        ev.interaction.geolocation.country_code = "NL"
        ev.interaction.trace_id = "trace"
    if draw(st.booleans()):
        ev.feature_flags.flags["flag"] = "true"
    if draw(st.booleans()):
        ev.source.server.request_client.user_agent = "agent"
        ev.source.client.name = "client"
    return ev


def identifiers(kind: str) -> st.SearchStrategy[pb.Identifier | None]:
    """Mostly valid identifiers of kind; sometimes none, an empty oneof or an empty required field."""
    builders = {
        "licensed_instance": lambda v: pb.Identifier(
            licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key=v)
        ),
        "unlicensed_instance": lambda v: pb.Identifier(
            unlicensed_instance=pb.Identifier.UnlicensedInstanceIdentifier(instance_id=v)
        ),
        "managed_service": lambda v: pb.Identifier(
            managed_service=pb.Identifier.ManagedServiceIdentifier(service_id=v)
        ),
        "workspace": lambda v: pb.Identifier(workspace=pb.Identifier.WorkspaceIdentifier(workspace_id=v)),
    }
    valid = st.text(alphabet="abc-123", min_size=1, max_size=6).map(builders[kind])
    refused = st.sampled_from([None, pb.Identifier(), builders[kind]("")])
    return st.integers(0, 9).flatmap(lambda n: refused if n == 0 else valid)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Engine, str, pb.Identifier | None, pb.RecordEventsRequest]:
    policy = draw(st.sampled_from(sorted(ENGINES)))
    kind = draw(st.sampled_from(KINDS))
    ident = draw(identifiers(kind))
    count = draw(st.integers(0, 4))
    request = pb.RecordEventsRequest(
        events=pb.RecordEventsRequest.EventsPayload(events=[draw(events(i)) for i in range(count)])
    )
    for _ in range(draw(st.integers(0, 5))):
        slot = draw(st.sampled_from(SLOTS))
        if slot not in ("request", "payload") and not count:
            continue
        ev = request.events.events[draw(st.integers(0, count - 1))] if count else pb.Event()
        target = slot_message(draw, request, ev, slot)
        if target is not None:
            append_unknown(target, draw(unknown_fields()))
    return ENGINES[policy], kind, ident, request


# --- helpers -----------------------------------------------------------------------------------------


def unknowns(message: Message, path: str = "") -> set[tuple[str, int]]:
    """(path, number) of every unknown field in a message tree."""
    found = {(path, f.field_number) for f in UnknownFieldSet(message)}
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    found |= unknowns(item, f"{name}[{key}]")
        elif fd.is_repeated:
            for i, item in enumerate(value):
                found |= unknowns(item, f"{name}[{i}]")
        else:
            found |= unknowns(value, name)
    return found


def strings_in(value: Any) -> set[str]:
    """Every marked string in a Struct Value (or plain data) tree."""
    if isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            return {value.string_value} if MARKER in value.string_value else set()
        if kind == "struct_value":
            return set().union(*(strings_in(v) for v in value.struct_value.fields.values()))
        if kind == "list_value":
            return set().union(*(strings_in(v) for v in value.list_value.values))
    return set()


def run(engine: Engine, ident: pb.Identifier | None, request: pb.RecordEventsRequest, *, detailed: bool = False) -> Any:
    original = pb.RecordEventsRequest()
    original.CopyFrom(request)
    outcome = engine.record_events(request, ident, detailed=detailed)
    if outcome.request is None:
        assert outcome.denial is not None
    return original, outcome


def pairs(original: pb.RecordEventsRequest, outcome: Any) -> list[tuple[pb.Event, pb.Event]]:
    """(input event, output event) for every event that left, matched by position."""
    dropped = {r.index for r in outcome.decision.events if r.dropped_by is not None}
    kept = [ev for i, ev in enumerate(original.events.events) if i not in dropped]
    out = list(outcome.request.events.events)
    assert len(out) == len(kept)
    for before, after in zip(kept, out, strict=True):
        assert (after.id, after.feature, after.action) == (before.id, before.feature, before.action)
    return list(zip(kept, out, strict=True))


# --- properties ----------------------------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_marketing_tracking_never_leaves_a_kind_that_drops_it(scenario: Any) -> None:
    engine, kind, ident, request = scenario
    original, outcome = run(engine, ident, request)
    if outcome.request is None or engine.policy.kinds[kind].marketing_tracking.value != "drop":
        return
    for _before, after in pairs(original, outcome):
        assert not after.HasField("marketing_tracking")
    assert b"mkt.example" not in outcome.request.SerializeToString()


@SETTINGS
@given(scenarios())
def test_private_metadata_leaves_only_as_the_policy_allows(scenario: Any) -> None:
    engine, kind, ident, request = scenario
    original, outcome = run(engine, ident, request)
    if outcome.request is None:
        return
    rule = engine.policy.kinds[kind].private_metadata
    discard = engine.policy.kinds[kind].unknown_fields.value == "discard"
    output = outcome.request.SerializeToString()
    # Marked strings that rightly leave elsewhere (kept private_metadata values, kept marketing):
    # a removed value equal to one of them is no leak.
    visible = " ".join(
        [v.string_value for ev in outcome.request.events.events for v in ev.parameters.private_metadata.fields.values()]
        + [value for ev in outcome.request.events.events for _fd, value in ev.marketing_tracking.ListFields()]
    )
    kept = set(re.findall(MARKED, visible))
    for before, after in pairs(original, outcome):
        given_fields = before.parameters.private_metadata.fields
        left = after.parameters.private_metadata.fields
        removed = set().union(set(), *(strings_in(v) for v in given_fields.values()))
        if rule.mode == "drop":
            assert not after.parameters.HasField("private_metadata")
        elif rule.mode == "keep":
            expected = struct_pb2.Struct()
            expected.CopyFrom(before.parameters.private_metadata)
            if discard:
                expected.DiscardUnknownFields()
            assert after.parameters.private_metadata == expected
            assert after.parameters.HasField("private_metadata") == before.parameters.HasField("private_metadata")
            removed = set()
        else:
            entry = engine.policy.allowlist.lookup(before.feature, before.action)
            if entry is None:
                assert not after.parameters.HasField("private_metadata")
            else:
                assert set(left) <= entry.keys
                assert all(v.WhichOneof("kind") == "string_value" for v in left.values())
                expected_keys = {
                    k
                    for k, v in given_fields.items()
                    if k in entry.keys and (v.WhichOneof("kind") == "string_value" or rule.non_string != "drop")
                }
                assert set(left) == expected_keys
                for key, value in left.items():
                    original_value = given_fields[key]
                    if original_value.WhichOneof("kind") == "string_value":
                        assert value.string_value == original_value.string_value
                    else:
                        assert value.string_value == rule.replacement_for(original_value.WhichOneof("kind"))
                removed -= {v.string_value for v in left.values()}
        for secret in removed - kept:
            assert secret.encode() not in output, secret


@SETTINGS
@given(scenarios())
def test_no_unknown_field_leaves_when_discarding(scenario: Any) -> None:
    engine, kind, ident, request = scenario
    original, outcome = run(engine, ident, request)
    if outcome.request is None:
        return
    if engine.policy.kinds[kind].unknown_fields.value == "discard":
        assert unknowns(outcome.request) == set()
        reparsed = pb.RecordEventsRequest.FromString(outcome.request.SerializeToString())
        assert unknowns(reparsed) == set()
        stripped = pb.RecordEventsRequest()
        stripped.CopyFrom(reparsed)
        stripped.DiscardUnknownFields()
        assert stripped == reparsed
    else:
        # kept: the unknown fields of the request and of each event that left are all still there
        assert {f.field_number for f in UnknownFieldSet(outcome.request)} == {
            f.field_number for f in UnknownFieldSet(original)
        }
        for before, after in pairs(original, outcome):
            assert sorted(f.field_number for f in UnknownFieldSet(after)) == sorted(
                f.field_number for f in UnknownFieldSet(before)
            )


@SETTINGS
@given(scenarios())
def test_filtering_twice_equals_filtering_once(scenario: Any) -> None:
    engine, _kind, ident, request = scenario
    _original, first = run(engine, ident, request)
    if first.request is None:
        return
    once = first.request.SerializeToString(deterministic=True)
    again = pb.RecordEventsRequest.FromString(once)
    second = engine.record_events(again, ident)
    assert second.request is not None
    assert second.request.SerializeToString(deterministic=True) == once
    assert second.decision.events == []  # nothing left to remove


@SETTINGS
@given(scenarios(), st.booleans())
def test_decision_record_never_contains_a_value(scenario: Any, detailed: bool) -> None:
    engine, _kind, ident, request = scenario
    _original, outcome = run(engine, ident, request, detailed=detailed)
    for with_keys in (False, True):
        text = json.dumps(outcome.decision.to_dict(with_keys=with_keys), ensure_ascii=False)
        assert MARKER not in text
        assert "mkt.example" not in text


@SETTINGS
@given(scenarios())
def test_record_event_filters_like_a_one_event_batch(scenario: Any) -> None:
    engine, kind, ident, request = scenario
    if not request.events.events or ident is None or kind not in engine.policy.access["RecordEvent"]:
        return
    if kind not in GATEWAY_KINDS["RecordEvent"]:  # the gateway's refusal, whatever the policy allows
        return
    single = pb.RecordEventsRequest()
    single.events.events.add().CopyFrom(request.events.events[0])
    unary = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(identifier=ident))
    unary.event.CopyFrom(request.events.events[0])
    batch_outcome = engine.record_events(single, ident)
    unary_outcome = engine.record_event(unary)
    invalid_rule = engine.policy.kinds[kind].invalid_events.rule
    if batch_outcome.denial is None and any(e.dropped_by == invalid_rule for e in batch_outcome.decision.events):
        # The gateway fails a service's invalid event: its RecordEvent is refused, never answered as a success.
        assert unary_outcome.denial is not None and unary_outcome.denial.code == grpc.StatusCode.INTERNAL
        return
    assert (batch_outcome.denial is None) == (unary_outcome.denial is None)
    if batch_outcome.request is None or unary_outcome.request is None:
        return
    assert unary_outcome.decision.events == batch_outcome.decision.events
    if batch_outcome.request.events.events:
        assert unary_outcome.request.event == batch_outcome.request.events.events[0]
    else:
        assert not unary_outcome.request.HasField("event")
