"""Overrides by identifier: loading, widening and narrowing, lint, and the engine on both paths.

The end-to-end checks (a real sidecar, the CLI commands) are in test_overrides_cli.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from test_properties import SETTINGS, scenarios

from telemetry_guard.policy import Engine, PolicyError, load_policy
from telemetry_guard.policy.lint import RULES, lint_files
from telemetry_guard.policy.surface import surface
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

DOTCOM_KEY = "test-dotcom-license-key"
DOTCOM = hashlib.sha256(DOTCOM_KEY.encode()).hexdigest()

BASE = """\
version: 1
allowlists: [builtin:sourcegraph]
access:
  RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]
  RecordEvent: [managed_service]
  PublishInstanceUserMetadata: [licensed_instance, unlicensed_instance]
user_metadata: {enabled: true, user_fields: [id]}
defaults:
  marketing_tracking: keep
  private_metadata: {mode: keep}
  drop_fields: [user.anonymous_user_id]
  invalid_events: forward
  legacy_metadata: keep
kinds:
  licensed_instance:
    marketing_tracking: drop
    private_metadata: {mode: allowlist}
    events: {include: ["*"], exclude: ["internal.*"]}
  unlicensed_instance:
    marketing_tracking: drop
    private_metadata: {mode: allowlist}
"""

OVERRIDES = f"""\
overrides:
  dotcom:
    match: {{kind: licensed_instance, license_key_sha256: "{DOTCOM}"}}
    marketing_tracking: keep
    private_metadata: {{mode: keep}}
  quiet:
    match: {{kind: unlicensed_instance, instance_id: quiet-1}}
    events: {{include: [cody, "cody.*"]}}
    access: [RecordEvents]
"""


# Line numbers in a policy of BASE and an overrides section: the first override's name is on FIRST.
FIRST = BASE.count("\n") + 2


def at(line: int) -> str:
    return f"policy.yaml:{line}:"


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def policy_with(tmp_path: Path, overrides: str = OVERRIDES) -> Any:
    return load_policy(write(tmp_path, BASE + overrides))


def licensed(key: str, **fields: str) -> pb.Identifier:
    return pb.Identifier(licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key=key, **fields))


def unlicensed(instance_id: str) -> pb.Identifier:
    return pb.Identifier(unlicensed_instance=pb.Identifier.UnlicensedInstanceIdentifier(instance_id=instance_id))


def batch(*features: str) -> bytes:
    request = pb.RecordEventsRequest()
    for i, feature in enumerate(features):
        ev = request.events.events.add(id=f"e{i}", feature=feature, action="accepted")
        ev.timestamp.seconds = 1_700_000_000
        ev.marketing_tracking.url = "https://example.com/page"
        ev.parameters.private_metadata.update({"languageId": "go", "prompt": "PRIVATE"})
        ev.user.anonymous_user_id = "anon"
    return request.SerializeToString()


def events(data: bytes | None) -> list[pb.Event]:
    assert data is not None
    return list(pb.RecordEventsRequest.FromString(data).events.events)


# -- loading -----------------------------------------------------------------------------------------


def problems(tmp_path: Path, overrides: str) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, BASE + "overrides:\n" + overrides))
    return str(caught.value)


def test_a_value_that_is_not_a_fingerprint_is_refused_without_being_echoed(tmp_path: Path) -> None:
    text = problems(tmp_path, "  a:\n    match: {kind: licensed_instance, license_key_sha256: CLEAR-LICENSE-KEY}\n")
    assert at(FIRST + 1) in text and "overrides.a.match.license_key_sha256" in text
    assert "SHA-256 fingerprint" in text
    assert "CLEAR-LICENSE-KEY" not in text


def test_the_fingerprint_of_an_empty_key_is_refused(tmp_path: Path) -> None:
    empty = hashlib.sha256(b"").hexdigest()
    text = problems(tmp_path, f"  a:\n    match: {{kind: licensed_instance, license_key_sha256: '{empty}'}}\n")
    assert at(FIRST + 1) in text and "the fingerprint of an empty license key" in text


def test_the_license_key_itself_is_not_a_match_field(tmp_path: Path) -> None:
    text = problems(tmp_path, "  a:\n    match: {kind: licensed_instance, license_key: CLEAR-KEY}\n")
    assert "overrides.a.match.license_key: unknown key 'license_key'" in text
    assert "CLEAR-KEY" not in text


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ("{kind: unlicensed_instance, license_key_sha256: '" + DOTCOM + "'}", "unlicensed_instance identifiers have"),
        ("{kind: managed_service, instance_id: x}", "managed_service identifiers have no field 'instance_id'"),
        ("{kind: workspace}", "match needs the kind and at least one identifier field"),
        ("{instance_id: x}", "kind is missing"),
    ],
)
def test_match_fields_must_belong_to_the_kind(tmp_path: Path, match: str, message: str) -> None:
    text = problems(tmp_path, f"  a:\n    match: {match}\n")
    assert at(FIRST + 1) in text and message in text


def test_override_names_and_keys_are_checked(tmp_path: Path) -> None:
    text = problems(
        tmp_path,
        "  Bad_Name:\n    match: {kind: workspace, workspace_id: w}\n"
        "  b:\n    match: {kind: workspace, workspace_id: v}\n    drop_fields: [user.nope]\n    credentials: x\n",
    )
    assert "'Bad_Name' is not allowed" in text
    assert at(FIRST + 5) in text and "overrides.b.credentials: unknown key 'credentials'" in text


def test_a_drop_fields_path_not_in_the_proto_is_refused_with_its_line(tmp_path: Path) -> None:
    text = problems(tmp_path, "  b:\n    match: {kind: workspace, workspace_id: v}\n    drop_fields: [user.nope]\n")
    assert at(FIRST + 2) in text and "overrides.b.drop_fields[0]: 'user.nope'" in text


def test_two_overrides_that_could_match_one_identifier_are_refused(tmp_path: Path) -> None:
    text = problems(
        tmp_path,
        f"  a:\n    match: {{kind: licensed_instance, license_key_sha256: '{DOTCOM}'}}\n"
        "  b:\n    match: {kind: licensed_instance, instance_id: i-1}\n"
        "  c:\n    match: {kind: licensed_instance, instance_id: i-2, external_url: 'https://x'}\n",
    )
    assert f"{at(FIRST + 3)}5: overrides.b.match: can match the same identifier as overrides.a (line {FIRST})" in text
    assert "overrides.c.match: can match the same identifier as overrides.a" in text
    assert "overrides.c.match: can match the same identifier as overrides.b" not in text  # i-1 != i-2


def test_an_override_replaces_only_the_keys_it_sets(tmp_path: Path) -> None:
    policy = policy_with(tmp_path)
    dotcom, quiet = policy.overrides
    assert (dotcom.kind, dotcom.verified, quiet.verified) == ("licensed_instance", True, False)
    assert dotcom.rules.marketing_tracking.rule == "overrides.dotcom.marketing_tracking"
    assert dotcom.rules.private_metadata.mode == "keep"
    assert dotcom.rules.events == policy.kinds["licensed_instance"].events  # not set: the kind's
    assert dotcom.rules.drop_fields.rule == "defaults.drop_fields"
    assert quiet.access is not None and quiet.access.value == {"RecordEvents"}


# -- widening and narrowing ----------------------------------------------------------------------------

WIDENING = {
    "marketing kept where the kind drops it": "marketing_tracking: keep",
    "private_metadata keep where the kind allowlists": "private_metadata: {mode: keep}",
    "non-string values replaced where the kind drops them": (
        "private_metadata: {mode: allowlist, non_string: replace, replacement: x}"
    ),
    "a wider event filter": 'events: {include: ["*"]}',
    "fewer drop_fields": "drop_fields: []",
    "unknown fields kept": "unknown_fields: keep",
    "invalid events forwarded": "invalid_events: forward",
}
NARROWING = {
    # The gateway serves RecordEvent to managed services only: opening it to an instance widens nothing.
    "an RPC the gateway does not serve the kind": "access: [RecordEvents, RecordEvent]",
    "private_metadata dropped": "private_metadata: {mode: drop}",
    "cody only": "events: {include: [cody, cody.*]}",
    "more drop_fields": "drop_fields: [user.anonymous_user_id, interaction.geolocation]",
    "fewer RPCs": "access: [RecordEvents]",
    "the kind's own values": "marketing_tracking: drop\n    drop_fields: [user.anonymous_user_id]",
    "legacy_metadata merged (a change of form, neither)": "legacy_metadata: merge",
}


def classify(tmp_path: Path, setting: str) -> Any:
    text = BASE.replace("  invalid_events: forward\n", "  invalid_events: drop\n")
    text += f"overrides:\n  one:\n    match: {{kind: licensed_instance, instance_id: i-1}}\n    {setting}\n"
    (found,) = surface(load_policy(write(tmp_path, text))).overrides
    return found


@pytest.mark.parametrize("setting", WIDENING.values(), ids=WIDENING.keys())
def test_widening_settings(tmp_path: Path, setting: str) -> None:
    found = classify(tmp_path, setting)
    assert found.widening, found.changes
    assert all(c.override == "one" and c.kind == "licensed_instance" for c in found.changes)


@pytest.mark.parametrize("setting", NARROWING.values(), ids=NARROWING.keys())
def test_settings_that_do_not_widen(tmp_path: Path, setting: str) -> None:
    found = classify(tmp_path, setting)
    assert not found.widening, found.widening


# -- lint ----------------------------------------------------------------------------------------------


def lint_rules(tmp_path: Path, overrides: str, acknowledged: str = "") -> list[tuple[str, str, int, bool]]:
    path = write(tmp_path, BASE + overrides + acknowledged)
    report = lint_files([path])
    return [(f.rule, f.severity, f.line, f.acknowledged) for f in report.findings if "override" in f.rule]


def test_a_widening_override_on_self_reported_fields_is_an_error_that_cannot_be_acknowledged(tmp_path: Path) -> None:
    overrides = (
        "overrides:\n  spoofable:\n    match: {kind: licensed_instance, external_url: 'https://sourcegraph.com'}\n"
    )
    overrides += "    marketing_tracking: keep\n"
    assert lint_rules(tmp_path, overrides) == [("override-widening-unverified", "error", FIRST + 1, False)]
    acknowledged = "acknowledged: [override-widening-unverified]\n"
    found = lint_rules(tmp_path, overrides, acknowledged)
    assert ("override-widening-unverified", "error", FIRST + 1, False) in found
    assert RULES["override-widening-unverified"].acknowledgeable is False
    assert lint_files([tmp_path / "policy.yaml"]).exit_code() == 1


def test_a_widening_override_on_the_fingerprint_is_a_note_and_a_narrowing_one_nothing(tmp_path: Path) -> None:
    assert lint_rules(tmp_path, OVERRIDES) == [("override-widening", "note", FIRST + 1, False)]
    assert lint_files([tmp_path / "policy.yaml"]).exit_code() == 0


# -- the engine, on both paths ---------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["fast", "python"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine(policy_with(tmp_path), accelerate=request.param)


def test_the_fingerprinted_license_gets_its_override_and_no_one_else_does(engine: Engine) -> None:
    data = batch("cody.completion", "internal.x")
    dotcom = engine.record_events_bytes(data, licensed(DOTCOM_KEY))
    assert dotcom.decision.override == "dotcom"
    (first,) = events(dotcom.request)
    assert first.marketing_tracking.url == "https://example.com/page"
    assert dict(first.parameters.private_metadata) == {"languageId": "go", "prompt": "PRIVATE"}
    assert not first.user.anonymous_user_id  # drop_fields: not set by the override, the default's
    assert dotcom.decision.dropped_event_ids == ["e1"]  # events: not set by the override, the kind's filter
    claimed = engine.record_events_bytes(data, licensed("another-key", external_url="https://sourcegraph.com"))
    assert claimed.decision.override is None
    (only,) = events(claimed.request)
    assert not only.HasField("marketing_tracking")
    assert dict(only.parameters.private_metadata) == {"languageId": "go"}
    assert claimed.decision.dropped_event_ids == ["e1"]


def test_a_narrowing_override_matches_on_instance_id(engine: Engine) -> None:
    out = engine.record_events_bytes(batch("cody.chat", "search"), unlicensed("quiet-1"))
    assert out.decision.override == "quiet"
    assert [e.feature for e in events(out.request)] == ["cody.chat"]
    assert out.decision.counts()["overrides.quiet.events.include"] == 1
    other = engine.record_events_bytes(batch("cody.chat", "search"), unlicensed("quiet-2"))
    assert other.decision.override is None and len(events(other.request)) == 2


def test_an_override_access_list_replaces_the_kinds(engine: Engine) -> None:
    denial = engine.check_access("PublishInstanceUserMetadata", unlicensed("quiet-1"))
    assert not isinstance(denial, str)
    assert (denial.code, denial.rule) == (grpc.StatusCode.PERMISSION_DENIED, "overrides.quiet.access")
    assert "quiet-1" not in denial.message
    assert engine.check_access("PublishInstanceUserMetadata", unlicensed("other")) == "unlicensed_instance"
    assert engine.check_access("RecordEvents", unlicensed("quiet-1")) == "unlicensed_instance"
    request = pb.PublishInstanceUserMetadataRequest()
    request.metadata.identifier.CopyFrom(unlicensed("quiet-1"))
    refused = engine.publish_instance_user_metadata(request)
    assert refused.denial is not None and refused.denial.rule == "overrides.quiet.access"


def test_a_stream_admitted_once_is_filtered_under_its_override(engine: Engine) -> None:
    data = batch("cody.chat", "search")
    out = engine.record_events_admitted(data, "unlicensed_instance", override="quiet")
    assert out.decision.override == "quiet"
    assert out.request == engine.record_events_bytes(data, unlicensed("quiet-1")).request
    with pytest.raises(ValueError, match="is for unlicensed_instance, not licensed_instance"):
        engine.record_events_admitted(data, "licensed_instance", override="quiet")


def test_a_pinned_engine_treats_every_identifier_of_the_kind_as_matched(engine: Engine) -> None:
    pinned = engine.pinned("dotcom")
    out = pinned.record_events_bytes(batch("cody.completion"), licensed("not-the-key"))
    assert out.decision.override == "dotcom"
    assert events(out.request)[0].HasField("marketing_tracking")
    assert engine.record_events_bytes(batch("cody.completion"), licensed("not-the-key")).decision.override is None
    with pytest.raises(ValueError, match="no override 'nope'"):
        engine.pinned("nope")


def test_record_event_uses_the_override_too(tmp_path: Path) -> None:
    text = BASE + (
        "overrides:\n  svc:\n    match: {kind: managed_service, service_id: noisy}\n"
        "    drop_fields: [user.anonymous_user_id, interaction]\n"
    )
    engine = Engine(load_policy(write(tmp_path, text)))
    request = pb.RecordEventRequest(event=pb.Event(id="u1", feature="cody.chat", action="submitted"))
    request.event.interaction.trace_id = "trace"
    request.metadata.identifier.managed_service.service_id = "noisy"
    data = request.SerializeToString()
    out = engine.record_event(request)
    assert out.decision.override == "svc" and not out.request.event.HasField("interaction")  # type: ignore[union-attr]
    # The interceptors' entry, the request admitted by check_access: the same answer, under the same override.
    admitted = engine.record_event_admitted(pb.RecordEventRequest.FromString(data), "managed_service", override="svc")
    assert admitted.decision == out.decision and admitted.request == out.request


OVERRIDE_ENGINES = {}


@SETTINGS
@given(scenarios())
def test_both_paths_agree_under_override_rules(tmp_path_factory: pytest.TempPathFactory, scenario: Any) -> None:
    """Generated payloads under the rules of each override (pinned), fast path against the reference."""
    if not OVERRIDE_ENGINES:
        policy = policy_with(tmp_path_factory.mktemp("agree"))
        for name in ("dotcom", "quiet"):
            OVERRIDE_ENGINES[name] = (Engine(policy).pinned(name), Engine(policy, accelerate=False).pinned(name))
    _engine, _kind, _ident, request = scenario
    data = request.SerializeToString()
    for name, ident in (("dotcom", licensed("k")), ("quiet", unlicensed("i"))):
        fast, slow = OVERRIDE_ENGINES[name]
        assert fast._plans[f"overrides.{name}"].fast is not None
        a, b = fast.record_events_bytes(data, ident), slow.record_events_bytes(data, ident)
        assert a.decision == b.decision
        assert a.request == b.request or pb.RecordEventsRequest.FromString(a.request or b"") == (
            pb.RecordEventsRequest.FromString(b.request or b"")
        )
