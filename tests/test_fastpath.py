"""The C fast path (policy/_wirefilter.c) against the Python engine, the reference.

For the same bytes and identifier, `Engine(policy)` (fast path where it applies) and
`Engine(policy, accelerate=False)` (Python only) must agree exactly: both refuse the
bytes, or both return the same decision record and requests that parse to the same
message. Inputs: the arbitrary requests of test_properties (random names, Structs,
marketing, legacy metadata, unknown fields at every depth) under every test policy,
those requests' bytes mutated at random, and hand-built encodings the fast path must
leave to the reference (duplicates, shadowed values, groups, invalid UTF-8, ...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from test_properties import ENGINES, SETTINGS, scenarios, varint

from bench.fuzz.checks import unknowns
from telemetry_guard.policy import Engine, default_policy, fastpath, load_policy
from telemetry_guard.policy.engine import Outcome
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

POLICIES = Path(__file__).parent / "testdata" / "policies"
EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"
NAMED = {
    "default": default_policy(),
    **{p.stem: load_policy(p) for p in sorted(POLICIES.glob("*.yaml"))},
    **{f"example-{p.stem}": load_policy(p) for p in sorted(EXAMPLES.glob("*.yaml"))},
    **{name: engine.policy for name, engine in ENGINES.items()},  # the same objects as the scenarios'
}
FAST = {name: Engine(policy) for name, policy in NAMED.items()}
SLOW = {name: Engine(policy, accelerate=False) for name, policy in NAMED.items()}
LICENSED = pb.Identifier(licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key="k"))
MANAGED = pb.Identifier(managed_service=pb.Identifier.ManagedServiceIdentifier(service_id="s"))
WORKSPACE = pb.Identifier(workspace=pb.Identifier.WorkspaceIdentifier(workspace_id="w"))


def engine_name(engine: Engine) -> str:
    return next(name for name, e in FAST.items() if e.policy is engine.policy)


def outcome(engine: Engine, data: bytes, ident: pb.Identifier | None) -> Outcome[bytes] | str:
    try:
        return engine.record_events_bytes(data, ident)
    except DecodeError:
        return "DecodeError"


def canonical(data: bytes | None) -> bytes | None:
    """The bytes as a parser sees them: the same for any two encodings of one message."""
    return None if data is None else pb.RecordEventsRequest.FromString(data).SerializeToString(deterministic=True)


def decided_alike(fast: Outcome[Any] | str, slow: Outcome[Any] | str) -> bool:
    """The two answers are the same refusal (False: nothing more to compare) or the same decision (True)."""
    if isinstance(slow, str) or isinstance(fast, str):
        assert fast == slow, (fast, slow)
        return False
    # What the fast path knows before its per-event records are built (all the sidecar reads at info)...
    assert fast.decision.counts() == slow.decision.counts()
    assert fast.decision.dropped_event_ids == slow.decision.dropped_event_ids
    # ...and the records themselves, once built.
    assert fast.decision == slow.decision
    return True


def assert_same(name: str, data: bytes, ident: pb.Identifier | None) -> Outcome[bytes] | str:
    fast, slow = outcome(FAST[name], data, ident), outcome(SLOW[name], data, ident)
    if decided_alike(fast, slow):
        assert not isinstance(fast, str) and not isinstance(slow, str)
        assert canonical(fast.request) == canonical(slow.request)
    return fast


def took_fast_path(name: str, kind: str, data: bytes) -> bool:
    engine = FAST[name]
    plan = engine._plans[kind]
    assert plan.fast is not None
    return plan.fast.filter(data, engine._resolvers[kind]) is not None


# --- the extension is there and used -------------------------------------------------------------


def test_the_extension_is_built() -> None:
    assert fastpath.AVAILABLE, (
        "telemetry_guard.policy._wirefilter is missing: `pip install -e .` builds it where gcc is present"
    )


@pytest.mark.parametrize("name", sorted(NAMED))
def test_every_kind_of_every_policy_here_has_a_fast_plan(name: str) -> None:
    assert all(plan.fast is not None for plan in FAST[name]._plans.values())
    assert all(plan.fast is None for plan in SLOW[name]._plans.values())


@SETTINGS
@given(scenarios())
def test_canonical_encodings_take_the_fast_path(scenario: Any) -> None:
    """Whatever protobuf itself serializes is taken, except legacy metadata a kind merges (on an event kept)."""
    engine, kind, _ident, request = scenario
    data = request.SerializeToString()
    rules = engine.policy.kinds[kind]

    def removed_whole(ev: pb.Event) -> bool:
        etype = engine.event_type(kind, ev.feature, ev.action)
        invalid = etype.invalid is not None or not ev.id or not ev.HasField("timestamp")
        return etype.dropped_by is not None or (rules.invalid_events.value == "drop" and invalid)

    merges = rules.legacy_metadata.value == "merge"
    legacy = any(ev.parameters.legacy_metadata and not removed_whole(ev) for ev in request.events.events)
    assert took_fast_path(engine_name(engine), kind, data) == (not (merges and legacy))


# --- agreement --------------------------------------------------------------------------------------


@SETTINGS
@given(scenarios())
def test_fast_and_python_paths_agree(scenario: Any) -> None:
    engine, _kind, ident, request = scenario
    assert_same(engine_name(engine), request.SerializeToString(), ident)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, pb.Identifier | None, bytes]:
    engine, _kind, ident, request = draw(scenarios())
    return engine_name(engine), ident, mutate(draw, request.SerializeToString())


def mutate(draw: st.DrawFn, given: bytes) -> bytes:
    """The bytes with one to three random flips, cuts, insertions or repeated runs."""
    data = bytearray(given)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        if how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "repeat":
            end = draw(st.integers(at, len(data)))
            data[end:end] = data[at:end]
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_bytes_get_the_same_answer_from_both_paths(case: tuple[str, pb.Identifier | None, bytes]) -> None:
    """Never more lenient than the reference: what it refuses, the fast path refuses too."""
    name, ident, data = case
    assert_same(name, data, ident)


# --- encodings left to the reference ----------------------------------------------------------------


def field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def payload(*events: bytes) -> bytes:
    return field(2, b"".join(field(1, e) for e in events))


def event(*extra: bytes, feature: bytes = b"cody.completion", action: bytes = b"accepted") -> bytes:
    stamp = field(2, b"\x08\x01")
    return field(1, b"ev-1") + stamp + field(3, feature) + field(4, action) + b"".join(extra)


def private(*entries: tuple[bytes, bytes]) -> bytes:
    """EventParameters with private_metadata of (key, Value bytes) entries, as they are given."""
    struct = b"".join(field(1, field(1, k) + field(2, v)) for k, v in entries)
    return field(6, field(3, struct))


STRING = field(3, b"go")
NUMBER = b"\x11" + b"\x00" * 8  # number_value = 0.0

SHADOWED = {
    "feature given twice": field(3, b"SHADOWED") + event(),  # the last one counts
    "marketing given twice": event(field(9, field(1, b"SHADOWED")), field(9, field(3, b"c"))),
    "private_metadata key given twice": event(private((b"languageId", field(3, b"SHADOWED")), (b"languageId", STRING))),
    "a Value with two kinds": event(private((b"languageId", field(3, b"SHADOWED") + NUMBER))),
    "a map key given twice": event(field(6, field(5, field(1, b"k") + b"\x11" + b"\x01" * 8) * 2)),
    "a string given twice in a sub-message": event(field(5, field(1, field(1, b"SHADOWED") + field(1, b"6.0")))),
    "an entry whose key is given twice": event(
        field(6, field(3, field(1, field(1, b"SHADOWED") + field(1, b"languageId") + field(2, STRING))))
    ),
    "a known field with another wire type": event(b"\x50\x01"),  # interaction (10) as a varint
    "a group": event(b"\xab\x06" + b"\xac\x06"),  # field 101 as a group
    "a metadata message": b"",
}


@pytest.mark.parametrize("case", sorted(SHADOWED))
def test_non_canonical_encodings_go_to_the_reference(case: str) -> None:
    data = (
        field(1, field(1, b"r") + field(2, field(1, field(1, b"k"))))
        if case == "a metadata message"
        else payload(SHADOWED[case])
    )
    assert not took_fast_path("default", "licensed_instance", data)
    got = assert_same("default", data, LICENSED)
    if not isinstance(got, str) and got.request is not None:
        assert b"SHADOWED" not in got.request  # the value a parser would overwrite does not leave


@pytest.mark.parametrize(
    "data",
    [
        payload(event(feature=b"cody.\xff")),  # invalid UTF-8 in a name
        payload(event(private((b"lang\xc0\xafuageId", STRING)))),  # an overlong encoding in a key
        payload(event(private((b"languageId", field(3, b"\xed\xa0\x80"))))),  # a surrogate in a value
        payload(event(field(7, field(2, b"\xf4\x90\x80\x80")))),  # beyond U+10FFFF
        payload(event(b"\x0a\x05ab")),  # a length past the end
        payload(event(b"\x08" + b"\xff" * 10 + b"\x01")),  # a varint of 11 bytes
        payload(event(b"\x07")),  # wire type 7
        payload(event(b"\x00\x01")),  # field number 0
    ],
)
def test_broken_bytes_are_refused_by_both_paths(data: bytes) -> None:
    assert not took_fast_path("default", "licensed_instance", data)
    assert assert_same("default", data, LICENSED) == "DecodeError"


def test_allowlisted_private_metadata_is_filtered_byte_for_byte() -> None:
    """Kept entries are the bytes that came in; a replaced value is Value{string_value: replacement}."""
    entries = ((b"languageId", STRING), (b"prompt", field(3, b"secret")), (b"otherCompletionProviders", NUMBER))
    data = payload(event(private(*entries), feature=b"cody.completion", action=b"accepted"))
    assert took_fast_path("properties", "licensed_instance", data)
    got = assert_same("properties", data, LICENSED)
    assert not isinstance(got, str) and got.request is not None
    out = pb.RecordEventsRequest.FromString(got.request).events.events[0].parameters.private_metadata
    rules = NAMED["properties"].kinds["licensed_instance"].private_metadata
    entry = NAMED["properties"].allowlist.lookup("cody.completion", "accepted")
    assert entry is not None and entry.keys >= {"languageId", "otherCompletionProviders"} and "prompt" not in entry.keys
    assert dict(out) == {"languageId": "go", "otherCompletionProviders": rules.replacement}
    assert b"secret" not in got.request
    removals = {(r.rule, r.keys, r.action) for r in got.decision.events[0].removals}
    assert removals == {
        (rules.rule, ("prompt",), "removed"),
        (f"{rules.rule}.non_string", ("otherCompletionProviders",), "replaced"),
    }


@pytest.mark.parametrize("pad", range(100, 140))
def test_lengths_that_change_size_across_a_varint_boundary(pad: int) -> None:
    """Events, parameters and Structs near 128 bytes, grown by a replaced value or shrunk by a removal."""
    entries = ((b"languageId", field(3, b"x" * (pad - 100))), (b"otherCompletionProviders", NUMBER))
    grown = event(private(*entries), feature=b"cody.completion", action=b"accepted")
    shrunk = event(field(9, field(1, b"m" * (pad - 90))), feature=b"cody.completion", action=b"accepted")
    data = payload(grown, shrunk, grown)
    assert took_fast_path("properties", "licensed_instance", data)
    got = assert_same("properties", data, LICENSED)
    assert not isinstance(got, str) and got.request is not None
    out = pb.RecordEventsRequest.FromString(got.request).events.events
    assert [e.HasField("marketing_tracking") for e in out] == [False, False, False]
    assert out[0].parameters.private_metadata["otherCompletionProviders"] == "(not a string)"


@pytest.mark.parametrize(
    "entry",
    [
        b"\x12\x04true" + field(1, b"flag"),  # value before key
        field(1, b"f" * 200) + field(2, b"true"),  # a key of 200 bytes (a two-byte length)
        field(1, b"flag"),  # no value: the default
        field(2, b"true"),  # no key: the empty key
    ],
)
def test_map_entries_in_other_forms_are_walked_not_refused(entry: bytes) -> None:
    data = payload(event(field(8, field(1, entry))))  # feature_flags.flags
    assert took_fast_path("default", "licensed_instance", data)
    got = assert_same("default", data, LICENSED)
    assert not isinstance(got, str) and got.request is not None


def test_more_event_types_in_one_payload_than_the_walk_remembers() -> None:
    """Past 64 distinct types a payload's types are looked up anew; the answers stay the same."""
    names = [f"cody.f{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(90)]
    events = [event(private((b"languageId", STRING)), feature=n.encode()) for n in names]
    events += [event(private((b"languageId", NUMBER)), feature=b"cody.completion") for _ in range(3)]
    data = payload(*events, *events[:10])
    assert took_fast_path("properties", "licensed_instance", data)
    got = assert_same("properties", data, LICENSED)
    assert not isinstance(got, str) and got.decision.events_in == len(events) + 10


def test_allowlisted_keys_are_matched_exactly_however_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 16 keys an entry's keys are compared in C, more are asked of its set: the same answers,
    including keys that agree in length and in their first and last eight bytes (one fingerprint)."""
    few = [f"settings.{c}.languageId" for c in "ab"]  # equal length, first and last 8 bytes
    many = [f"key{i:02d}" for i in range(20)]
    (tmp_path / "keys.yaml").write_text(
        "version: 1\nowner: tests\nentries:\n"
        f"  - {{feature: cody.few, action: used, keys: [{', '.join(few)}], reason: r}}\n"
        f"  - {{feature: cody.many, action: used, keys: [{', '.join(many)}], reason: r}}\n"
    )
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nallowlists: [keys.yaml]\naccess: {RecordEvents: [licensed_instance]}\n"
        "defaults: {private_metadata: {mode: allowlist, non_string: drop}}\n"
    )
    policy = load_policy(tmp_path / "policy.yaml")
    monkeypatch.setitem(FAST, "keys", Engine(policy))
    monkeypatch.setitem(SLOW, "keys", Engine(policy, accelerate=False))
    sent = {
        b"cody.few": [*few, "settings.c.languageId", "settings.a.languageI"],
        b"cody.many": [*many[::3], "key20", "key0", "key19x"],
    }
    events = [
        event(private(*((k.encode(), field(3, b"v")) for k in keys)), feature=feature, action=b"used")
        for feature, keys in sent.items()
    ]
    data = payload(*events)
    assert took_fast_path("keys", "licensed_instance", data)
    got = assert_same("keys", data, LICENSED)
    assert not isinstance(got, str) and got.request is not None
    out = pb.RecordEventsRequest.FromString(got.request).events.events
    assert [sorted(e.parameters.private_metadata) for e in out] == [sorted(few), sorted(many[::3])]


# --- the review's reproducers (issue 11) ------------------------------------------------------------


def padded(n: int, width: int) -> bytes:
    """n as a varint of exactly `width` bytes (overlong when wider than needed)."""
    encoded = bytearray(varint(n))
    while len(encoded) < width:
        encoded[-1] |= 0x80
        encoded.append(0)
    return bytes(encoded)


def test_the_reviews_overlong_event_id_tag_is_refused_by_both_paths() -> None:
    data = bytes.fromhex("122a0a288a8080808000026531120208011a0f636f64792e636f6d706c6574696f6e22086163636570746564")
    assert assert_same("default", data, LICENSED) == "DecodeError"


@pytest.mark.parametrize("width", range(1, 11))
@pytest.mark.parametrize("where", ["payload tag", "event tag", "id length", "private_metadata length", "struct key"])
def test_tags_and_lengths_are_taken_in_five_bytes_at_most(where: str, width: int) -> None:
    """protobuf (upb) refuses a tag or a length prefix written in 6 to 10 bytes; 1 to 5 bytes parse.
    The fast path takes the same encodings or leaves them to the reference, never more."""
    tag = padded(1 << 3 | 2, width)
    ev_id = b"ev-1"
    struct_entry = field(1, field(1, b"languageId") + field(2, STRING))
    if where == "payload tag":
        data = padded(2 << 3 | 2, width) + varint(len(inner := field(1, event()))) + inner
    elif where == "event tag":
        data = field(2, tag + varint(len(ev := event())) + ev)
    elif where == "id length":
        data = payload(b"\x0a" + padded(len(ev_id), width) + ev_id + event()[len(field(1, ev_id)) :])
    elif where == "private_metadata length":
        data = payload(event(field(6, b"\x1a" + padded(len(struct_entry), width) + struct_entry)))
    else:
        entry = b"\x0a" + padded(len(b"languageId"), width) + b"languageId" + field(2, STRING)
        data = payload(event(field(6, field(3, field(1, entry)))))
    for name, ident in (("default", LICENSED), ("default", MANAGED), ("properties", LICENSED)):
        got = assert_same(name, data, ident)
        assert (got == "DecodeError") == (width > 5), (name, where, width)


def nested_structs(levels: int, bottom: bytes) -> bytes:
    """A Struct holding {k: Value{struct_value: ...}} `levels` times, `bottom` in the innermost Struct."""
    struct = bottom
    for _ in range(levels):
        struct = field(1, field(1, b"k") + field(2, field(5, struct)))
    return struct


@pytest.mark.parametrize("levels", [1, 10, 28, 29, 30, 31, 32, 33, 34])
@pytest.mark.parametrize("ident", [MANAGED, WORKSPACE], ids=["managed_service", "workspace"])
def test_unknown_fields_are_discarded_at_every_depth_the_parser_accepts(ident: pb.Identifier, levels: int) -> None:
    """Kinds that keep private_metadata: an unknown field at the bottom of nested Structs never leaves."""
    unknown = varint(100 << 3) + b"\x01"
    data = payload(event(field(6, field(3, nested_structs(levels, unknown)))))
    got = assert_same("default", data, ident)
    if isinstance(got, str):  # deeper than protobuf's parser goes: refused by both
        assert levels > 30
        return
    assert got.request is not None and got.decision.unknown_fields == "discarded"
    out = pb.RecordEventsRequest.FromString(got.request)
    assert unknowns(out) == []
    assert out.events.events[0].parameters.HasField("private_metadata")


def test_record_event_nested_to_the_parsers_limit_is_refused_not_raised() -> None:
    """An event nested as deep as its own RecordEventRequest allows is one level too deep as a RecordEvents
    payload's event, the path RecordEvent is judged on: INVALID_ARGUMENT (rule nesting), never an exception.
    (Found by bench.fuzz under the sanitizers.)"""
    identifier = field(1, field(2, field(3, field(1, b"svc"))))  # metadata.identifier.managed_service
    # Each Struct level is three messages deep (Struct, map entry, Value): a bottom of 0, 1 or 2 more
    # messages (a map entry; a map entry and its Value) reaches every depth.
    bottoms = (b"", field(1, field(1, b"k")), field(1, field(1, b"k") + field(2, b"")))
    parses_alone = []
    for levels, bottom in ((levels, bottom) for levels in range(25, 40) for bottom in bottoms):
        data = identifier + field(2, event(field(6, field(3, nested_structs(levels, bottom)))))
        try:
            request = pb.RecordEventRequest.FromString(data)
        except DecodeError:
            break
        outcome = SLOW["default"].record_event(request)
        parses_alone.append(outcome.denial)
    assert parses_alone and parses_alone[0] is None, "shallow enough: judged as usual"
    deepest = parses_alone[-1]
    assert deepest is not None and (deepest.code.name, deepest.rule) == ("INVALID_ARGUMENT", "nesting")


@pytest.mark.parametrize("wrap", [bytearray, memoryview, lambda b: memoryview(bytearray(b))])
@pytest.mark.parametrize("name", ["default", "properties"])
def test_bytes_like_input_gets_the_answer_of_bytes_on_both_paths(name: str, wrap: Any) -> None:
    data = payload(event(private((b"languageId", STRING), (b"prompt", field(3, b"secret"))), field(9, field(1, b"m"))))
    for engine in (FAST[name], SLOW[name]):
        for ident in (LICENSED, MANAGED):
            expected = engine.record_events_bytes(data, ident)
            assert engine.record_events_bytes(wrap(data), ident) == expected
            kind = ident.WhichOneof("identifier")
            assert engine.record_events_admitted(wrap(data), kind) == engine.record_events_admitted(data, kind)


def test_bytes_like_garbage_is_a_decode_error_on_both_paths() -> None:
    for engine in (FAST["default"], SLOW["default"]):
        with pytest.raises(DecodeError):
            engine.record_events_bytes(bytearray(b"\x12\x05\x0a"), LICENSED)


@pytest.mark.parametrize("version", [0, 1, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**64 - 1])
def test_dropping_an_int32_records_what_a_parser_reads(tmp_path: Path, version: int) -> None:
    """parameters.version is an int32: a varint of 2**32 is 0 to a parser, so nothing is removed."""
    (tmp_path / "policy.yaml").write_text(
        "version: 1\naccess: {RecordEvents: [managed_service]}\n"
        "defaults: {drop_fields: [parameters.version, user.user_id]}\n"
    )
    policy = load_policy(tmp_path / "policy.yaml")
    fast, slow = Engine(policy), Engine(policy, accelerate=False)
    data = payload(event(field(6, b"\x08" + varint(version)), field(7, b"\x08" + varint(version))))
    assert fast._plans["managed_service"].fast is not None
    a, b = fast.record_events_bytes(data, MANAGED), slow.record_events_bytes(data, MANAGED)
    assert a.decision == b.decision
    assert canonical(a.request) == canonical(b.request)
    assert {r.path for r in a.decision.events[0].removals} == (
        {"parameters.version", "user.user_id"} if version % 2**32 else {"user.user_id"}
    )


def test_every_prefix_of_a_payload_gets_the_same_answer_from_both_paths() -> None:
    """A payload cut at every byte: each field in turn ends the buffer, cut short (under ASan, a read past
    a payload's last byte is an error report)."""
    struct = field(1, field(1, b"languageId") + field(2, STRING)) + field(1, field(1, b"model") + field(2, NUMBER))
    metadata = field(5, field(1, b"k") + b"\x11" + b"\x01" * 8)  # map<string, double>
    marketing, user = field(9, field(1, b"https://m.example")), field(7, b"\x08" + varint(2**40))
    data = payload(event(field(6, field(3, struct) + metadata), marketing, user))
    data += b"\x9d\x06" + b"\x02" * 4 + b"\x99\x06" + b"\x03" * 8  # unknown fixed32 and fixed64 fields, last
    assert took_fast_path("default", "licensed_instance", data)
    for cut in range(len(data) + 1):  # properties: licensed_instance keeps unknown fields (copies them)
        for name, ident in (("properties", LICENSED), ("default", LICENSED), ("default", MANAGED)):
            assert_same(name, data[:cut], ident)


def test_the_readme_states_the_limits_of_the_code() -> None:
    """The nesting limits and the widths README.md gives are the code's and protobuf's."""
    from telemetry_guard.policy import _wirefilter, unknown, wire

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    levels = re.search(
        r"That is (\d+) message levels: a private_metadata value can hold Structs nested (\d+) deep"
        r" or lists nested (\d+) deep",
        readme,
    )
    assert levels is not None
    parser_depth, structs, lists = map(int, levels.groups())
    assert parser_depth == unknown.PARSER_DEPTH
    fast = re.search(
        r"So does nesting deeper than (\d+) message levels. A tag or a length prefix takes at most (\d+) bytes", readme
    )
    assert fast is not None
    assert int(fast.group(1)) == _wirefilter.MAX_DEPTH
    assert int(fast.group(2)) == _wirefilter.TAG_WIDTH == wire.TAG_WIDTH

    def as_lists(n: int) -> bytes:
        value = STRING
        for _ in range(n):
            value = field(6, field(1, value))
        return field(1, field(1, b"k") + field(2, value))

    for build, deepest in ((lambda n: nested_structs(n, b""), structs), (as_lists, lists)):
        pb.RecordEventsRequest.FromString(payload(event(field(6, field(3, build(deepest))))))
        with pytest.raises(DecodeError):
            pb.RecordEventsRequest.FromString(payload(event(field(6, field(3, build(deepest + 1))))))


def test_upbs_own_discard_stops_where_policy_unknown_says_and_discard_unknown_goes_on() -> None:
    from google.protobuf import struct_pb2

    from telemetry_guard.policy import unknown

    unknown_field = varint(100 << 3) + b"\x01"
    for levels, survives_upb in ((unknown.REACH // 2 - 1, False), (unknown.REACH // 2, True)):
        struct = struct_pb2.Struct.FromString(nested_structs(levels, unknown_field))  # the field at 2 * levels
        plain = struct_pb2.Struct()
        plain.CopyFrom(struct)
        plain.DiscardUnknownFields()
        assert (unknowns(plain) != []) == survives_upb
        unknown.discard_unknown(struct)
        assert unknowns(struct) == []
