"""Non-string values of allowlisted keys, as Sourcegraph's own redaction writes them.

Sourcegraph's redact.go replaces such a value with
fmt.Sprintf("ERROR: value of allowlisted key was not a string, got: %T", value.Kind); the default
policy (non_string: sourcegraph-marker) writes the same string for instances, on the C fast path
and on the Python path alike, and through a real server interceptor and a real sidecar. The expected strings are
written out here by hand, from Sourcegraph's source and Go's %T names, not derived from the code.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_harness import events_request, metadata_request, serve_sync
from test_sidecar_support import Sidecar, record_events, serve_upstream
from test_sidecar_support import metadata as sidecar_metadata
from test_sidecar_support import payload as sidecar_payload

from telemetry_guard.interceptors import GuardServerInterceptor
from telemetry_guard.policy import Engine, PolicyError, default_policy, load_policy
from telemetry_guard.policy.surface import diff, explain, surface
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

PREFIX = "ERROR: value of allowlisted key was not a string, got: "
# google.protobuf.Value kind -> (a value of that kind, what Sourcegraph writes instead of it)
MARKERS: dict[str, tuple[struct_pb2.Value, str]] = {
    "null": (struct_pb2.Value(null_value=struct_pb2.NULL_VALUE), PREFIX + "*structpb.Value_NullValue"),
    "number": (struct_pb2.Value(number_value=987654321), PREFIX + "*structpb.Value_NumberValue"),
    "bool": (struct_pb2.Value(bool_value=True), PREFIX + "*structpb.Value_BoolValue"),
    "struct": (
        struct_pb2.Value(struct_value=struct_pb2.Struct(fields={"secret": struct_pb2.Value(string_value="s3cret")})),
        PREFIX + "*structpb.Value_StructValue",
    ),
    "list": (
        struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value="s3cret")])),
        PREFIX + "*structpb.Value_ListValue",
    ),
    "unset": (struct_pb2.Value(), PREFIX + "<nil>"),  # Go's %T of a nil interface
}
LICENSED = pb.Identifier(licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key="k"))
POLICY = default_policy()
PATHS = {"fast-path": Engine(POLICY), "python-path": Engine(POLICY, accelerate=False)}


def _event(event_id: str, value: struct_pb2.Value) -> pb.Event:
    """cody.completion (allowlisted: languageId, ...) with one non-string and one string value."""
    ev = pb.Event(id=event_id, feature="cody.completion", action="accepted")
    ev.timestamp.seconds = 1_700_000_000
    ev.parameters.private_metadata.fields["languageId"].CopyFrom(value)
    ev.parameters.private_metadata.fields["providerModel"].string_value = "claude"
    return ev


def _payload(*events: pb.Event) -> bytes:
    return pb.RecordEventsRequest(events=pb.RecordEventsRequest.EventsPayload(events=events)).SerializeToString()


def _took_fast_path(engine: Engine, data: bytes) -> bool:
    plan = engine._plans["licensed_instance"]
    return plan.fast is not None and plan.fast.filter(data, engine._resolvers["licensed_instance"]) is not None


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("kind", sorted(MARKERS))
def test_each_value_kind_becomes_sourcegraphs_marker(kind: str, path: str) -> None:
    value, marker = MARKERS[kind]
    data = _payload(_event("e1", value))
    engine = PATHS[path]
    assert _took_fast_path(engine, data) == (path == "fast-path")
    out = engine.record_events_bytes(data, LICENSED)
    assert out.request is not None
    private = pb.RecordEventsRequest.FromString(out.request).events.events[0].parameters.private_metadata
    assert dict(private) == {"languageId": marker, "providerModel": "claude"}
    # the entry on the wire is Value{string_value: marker} and nothing of the value is left
    assert struct_pb2.Struct(fields={"languageId": struct_pb2.Value(string_value=marker)}).SerializeToString() in (
        out.request
    )
    assert b"s3cret" not in out.request
    removal = out.decision.events[0].removals[-1]
    rule = "kinds.licensed_instance.private_metadata.non_string"
    assert (removal.rule, removal.keys, removal.action) == (rule, ("languageId",), "replaced")


def test_both_paths_write_the_same_bytes_for_every_kind_in_one_payload() -> None:
    data = _payload(*(_event(kind, value) for kind, (value, _) in sorted(MARKERS.items())))
    fast, slow = (PATHS[p].record_events_bytes(data, LICENSED) for p in ("fast-path", "python-path"))
    assert _took_fast_path(PATHS["fast-path"], data)
    assert fast.request is not None and slow.request is not None
    parse = pb.RecordEventsRequest.FromString
    assert parse(fast.request) == parse(slow.request) and fast.decision == slow.decision
    got = {e.id: e.parameters.private_metadata["languageId"] for e in parse(fast.request).events.events}
    assert got == {kind: marker for kind, (_, marker) in MARKERS.items()}


def test_a_value_holding_only_an_unknown_field_has_no_kind_on_either_path() -> None:
    """Go parses it as a Value with a nil kind: <nil>. The unknown field's bytes do not pass."""
    unknown = b"\xb8\x01\x07"  # field 23 (no Value field has it), varint 7
    ev = _event("e1", struct_pb2.Value())
    ev.parameters.private_metadata.fields["languageId"].MergeFromString(unknown)
    data = _payload(ev)
    assert unknown in data and _took_fast_path(PATHS["fast-path"], data)
    outs = [PATHS[p].record_events_bytes(data, LICENSED) for p in ("fast-path", "python-path")]
    for out in outs:
        assert out.request is not None and unknown not in out.request
        event = pb.RecordEventsRequest.FromString(out.request).events.events[0]
        assert event.parameters.private_metadata["languageId"] == PREFIX + "<nil>"
    assert outs[0].decision == outs[1].decision


def test_a_real_server_interceptor_hands_the_gateway_the_markers() -> None:
    events = [_event(kind, value) for kind, (value, _) in sorted(MARKERS.items())]
    with serve_sync([GuardServerInterceptor(POLICY)]) as served, grpc.insecure_channel(served.target) as channel:
        stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
        requests = [metadata_request("licensed_instance"), events_request(*events)]
        answers = list(stub.RecordEvents(iter(requests), timeout=10))
    assert [sorted(a.succeeded_events) for a in answers] == [sorted(MARKERS)]
    (call,) = served.recorder.calls
    got = {e.id: dict(e.parameters.private_metadata) for e in call.messages[1].events.events}
    assert got == {kind: {"languageId": marker, "providerModel": "claude"} for kind, (_, marker) in MARKERS.items()}


def _policy(tmp_path: Path, private: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nallowlists: [builtin:sourcegraph]\naccess: {RecordEvents: [licensed_instance]}\n"
        f"kinds:\n  licensed_instance:\n    private_metadata: {private}\n"
    )
    return path


@pytest.mark.parametrize("accelerate", [True, False])
def test_non_string_drop_stays_available(tmp_path: Path, accelerate: bool) -> None:
    engine = Engine(load_policy(_policy(tmp_path, "{mode: allowlist, non_string: drop}")), accelerate=accelerate)
    out = engine.record_events_bytes(_payload(_event("e1", MARKERS["bool"][0])), LICENSED)
    assert out.request is not None and PREFIX.encode() not in out.request
    private = pb.RecordEventsRequest.FromString(out.request).events.events[0].parameters.private_metadata
    assert dict(private) == {"providerModel": "claude"}


def test_a_replacement_string_beside_the_marker_is_a_load_error(tmp_path: Path) -> None:
    path = _policy(tmp_path, '{mode: allowlist, non_string: sourcegraph-marker, replacement: "x"}')
    with pytest.raises(PolicyError) as refused:
        load_policy(path)
    (problem,) = refused.value.problems
    assert (problem.line, problem.key) == (6, "kinds.licensed_instance.private_metadata.replacement")
    assert "replacement applies only to non_string: replace, not sourcegraph-marker" in problem.message


def test_explain_and_diff_tell_reviewers_about_the_marker(tmp_path: Path) -> None:
    steps = explain(POLICY, "licensed_instance", "cody.completion", "accepted").steps
    private = next(step for step in steps if step.topic == "private_metadata")
    assert private.detail.endswith("a non-string value is replaced by Sourcegraph's marker naming its kind")
    dropping = load_policy(_policy(tmp_path, "{mode: allowlist, non_string: drop}"))
    changes = diff(surface(dropping), surface(POLICY))
    marker = [c for c in changes.widening if c.kind == "licensed_instance" and c.subject.startswith("non-string")]
    assert [(c.old, c.new) for c in marker] == [("drop", "sourcegraph-marker")]


def test_a_real_sidecar_forwards_the_markers_upstream(tmp_path: Path) -> None:
    upstream = serve_upstream()
    sidecar = Sidecar(["--upstream", upstream.target], tmp_path)  # no --policy: the default policy
    try:
        events = [_event(kind, value) for kind, (value, _) in sorted(MARKERS.items())]
        sent = record_events(sidecar.stub(), [sidecar_metadata("licensed_instance"), sidecar_payload(*events)])
        assert sent.code == grpc.StatusCode.OK and sent.acked == set(MARKERS)
        got = {e.id: dict(e.parameters.private_metadata) for e in upstream.servicer.events()}
    finally:
        sidecar.kill()
        upstream.stop()
    assert got == {kind: {"languageId": marker, "providerModel": "claude"} for kind, (_, marker) in MARKERS.items()}
    assert "s3cret" not in sidecar.log_text()
