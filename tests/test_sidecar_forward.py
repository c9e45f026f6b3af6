"""The sidecar end to end: client -> `telemetry-guard serve` (subprocess) -> recording upstream, over loopback.

One sidecar process serves the whole module (the test policy of test_sidecar_support); each test
resets the upstream's recording and behaviour. Covered: every filter and denial path, the
acknowledgement merge, upstream errors mid-stream, client cancellation, deadlines and metadata
passing through, the message size limit, health, reflection and metrics; and that no removed
value reaches the upstream, an error message or a log line.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_sidecar_support import (
    BEARER,
    FORWARD_TAG,
    POLICY,
    SECRETS,
    SERVICE,
    TIMEOUT,
    UNKNOWN_FIELD,
    Lockstep,
    ServedUpstream,
    Sidecar,
    dropped,
    event,
    free_port,
    invalid,
    metadata,
    module_upstream,  # noqa: F401 (the module's `upstream` fixture)
    organizations,
    payload,
    publish_metadata,
    record_event_request,
    record_events,
    sensitive,
    unary,
    users,
    wait_for,
)

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

METHOD = f"/{SERVICE}/RecordEvents"
MAX = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def sidecar(upstream: ServedUpstream, metrics_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("sidecar")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    args = ["--upstream", upstream.target, "--policy", str(policy), "--log-level", "debug", *FORWARD_TAG]
    args += ["--metrics-listen", f"127.0.0.1:{metrics_port}", "--reload-interval", "0"]
    process = Sidecar(args, tmp)
    yield process
    process.kill()


@pytest.fixture(autouse=True)
def fresh(upstream: ServedUpstream, request: pytest.FixtureRequest) -> None:
    upstream.servicer.reset(tag=request.node.name)


def _no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


# -- filtering and acknowledgements -------------------------------------------------------------


def test_events_are_filtered_before_they_reach_the_upstream(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    out = record_events(sidecar.stub(), [metadata("licensed_instance", "r-filter"), payload(sensitive("e1"))])
    assert out.code == grpc.StatusCode.OK, out.details
    assert out.acked == {"e1"}
    (call,) = upstream.servicer.received("RecordEvents")
    assert call.messages[0].metadata.request_id == "r-filter"
    (forwarded,) = call.events()
    assert not forwarded.HasField("marketing_tracking")
    assert dict(forwarded.parameters.private_metadata) == {"languageId": "go"}  # allowlisted string kept
    assert UNKNOWN_FIELD not in forwarded.SerializeToString()
    assert (forwarded.user.user_id, forwarded.user.anonymous_user_id) == (7, "")  # drop_fields
    assert dict(forwarded.parameters.metadata) == {"count": 1.0, "legacyCount": 3.0}  # legacy merged
    assert not forwarded.parameters.legacy_metadata
    _no_secret(str(call.messages), forwarded.SerializeToString().decode("utf-8", "replace"))


def test_events_removed_whole_are_acknowledged_but_never_forwarded(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    requests = [metadata("unlicensed_instance"), payload(event("keep1"), dropped("drop1"), invalid("bad1"))]
    out = record_events(sidecar.stub(), requests)
    assert out.code == grpc.StatusCode.OK, out.details
    assert [list(r.succeeded_events) for r in out.responses] == [["keep1", "drop1", "bad1"]]
    assert [e.id for e in upstream.servicer.events()] == ["keep1"]


def test_a_payload_removed_entirely_is_still_answered(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    requests = [metadata("licensed_instance"), payload(dropped("d1")), payload(event("k2"))]
    out = record_events(sidecar.stub(), requests)
    assert out.code == grpc.StatusCode.OK, out.details
    assert [list(r.succeeded_events) for r in out.responses] == [["d1"], ["k2"]]  # one answer per payload, in order
    (call,) = upstream.servicer.received("RecordEvents")
    assert [len(m.events.events) for m in call.messages[1:]] == [0, 1]


def test_events_the_upstream_did_not_acknowledge_are_not_acknowledged(
    sidecar: Sidecar, upstream: ServedUpstream
) -> None:
    upstream.servicer.fail_ids = {"f1", "dup"}
    # "dup" is both removed (dropped) and forwarded (kept) in one payload: the upstream's word counts.
    requests = [metadata("licensed_instance"), payload(event("ok1"), event("f1"), dropped("dup"), event("dup"))]
    out = record_events(sidecar.stub(), requests)
    assert out.code == grpc.StatusCode.OK, out.details
    assert out.acked == {"ok1"}


def test_many_payloads_on_one_stream_keep_their_order(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    requests = [metadata("workspace")] + [payload(event(f"p{i}a"), event(f"p{i}b")) for i in range(150)]
    out = record_events(sidecar.stub(), requests, metadata=BEARER)
    assert out.code == grpc.StatusCode.OK, out.details
    assert [list(r.succeeded_events) for r in out.responses] == [[f"p{i}a", f"p{i}b"] for i in range(150)]


def test_empty_messages_are_skipped(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    requests = [pb.RecordEventsRequest(), metadata("licensed_instance", "req-empty")]
    requests += [pb.RecordEventsRequest(), payload(event("e"))]
    out = record_events(sidecar.stub(), requests)
    assert out.code == grpc.StatusCode.OK, out.details
    (call,) = upstream.servicer.received("RecordEvents")
    assert [m.WhichOneof("payload") for m in call.messages] == ["metadata", "events"]
    # Audit records number the messages as the client sent them, empty ones included.
    records = wait_for(lambda: sidecar.logs(audit="decision", request_id="req-empty") or None, what="audit records")
    assert sorted(r["message"] for r in records) == [1, 3]


def test_record_event_is_filtered_and_forwarded(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    out = unary(sidecar.stub().RecordEvent, record_event_request("managed_service", sensitive("u1")), BEARER)
    assert out.code == grpc.StatusCode.OK, out.details
    (call,) = upstream.servicer.received("RecordEvent")
    (forwarded,) = call.events()
    assert forwarded.id == "u1" and not forwarded.HasField("marketing_tracking")
    assert call.metadata["authorization"] == f"Bearer {BEARER[0][1].split()[1]}"


def test_record_event_removed_whole_succeeds_without_reaching_the_upstream(
    sidecar: Sidecar, upstream: ServedUpstream
) -> None:
    out = unary(sidecar.stub().RecordEvent, record_event_request("managed_service", dropped("u2")), BEARER)
    assert out.code == grpc.StatusCode.OK, out.details
    assert upstream.servicer.received() == []


def test_user_metadata_keeps_only_the_policy_fields(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    stub = sidecar.stub()
    requests = [publish_metadata("licensed_instance"), users(), organizations()]
    stub.PublishInstanceUserMetadata(iter(requests), timeout=TIMEOUT)
    (call,) = upstream.servicer.received("PublishInstanceUserMetadata")
    (user,) = call.messages[1].user_metadata.users
    assert (user.id, user.username, user.primary_email) == (1, "alice", "")
    (org,) = call.messages[2].organization_metadata.organizations
    assert (org.id, org.name, org.display_name) == (5, "acme", "")


# -- denials ------------------------------------------------------------------------------------

Case = tuple[str, list[Any], tuple[tuple[str, str], ...], grpc.StatusCode, str]
UNSUPPORTED = "unsupported identifier type"  # the gateway's message for UNIMPLEMENTED

STREAM_DENIALS: list[Case] = [
    ("no identifier", [metadata("none"), payload(event("x"))], (), grpc.StatusCode.UNIMPLEMENTED, UNSUPPORTED),
    ("incomplete identifier", [metadata("incomplete")], (), grpc.StatusCode.INVALID_ARGUMENT, "instance_id"),
    ("no bearer token", [metadata("managed_service")], (), grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    (
        "not a bearer token",
        [metadata("workspace")],
        (("authorization", "Basic abc"),),
        grpc.StatusCode.UNAUTHENTICATED,
        "credentials.required_for",
    ),
    ("events first", [payload(event("x"))], (), grpc.StatusCode.INVALID_ARGUMENT, "metadata not yet received"),
    ("empty stream", [], (), grpc.StatusCode.INVALID_ARGUMENT, "before its metadata"),
]


@pytest.mark.parametrize(("name", "requests", "md", "code", "says"), STREAM_DENIALS, ids=[c[0] for c in STREAM_DENIALS])
def test_record_events_denials_forward_nothing(
    sidecar: Sidecar,
    upstream: ServedUpstream,
    name: str,
    requests: list[Any],
    md: tuple[tuple[str, str], ...],
    code: grpc.StatusCode,
    says: str,
) -> None:
    out = record_events(sidecar.stub(), requests, metadata=md)
    assert (out.code, name) == (code, name), out.details
    if says == UNSUPPORTED:  # the gateway's own words, nothing more
        assert out.details == UNSUPPORTED
    else:
        assert says in out.details and "RecordEvents" in out.details
    assert upstream.servicer.received() == []


def test_metadata_twice_ends_the_stream_and_cancels_upstream(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    upstream.servicer.linger = 0.5
    stream = Lockstep(sidecar.stub())
    stream.send(metadata("licensed_instance"))
    stream.send(payload(event("a")))
    assert list(stream.next_response().succeeded_events) == ["a"]
    stream.send(metadata("licensed_instance"))
    out = stream.rest()
    stream.close()
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "received metadata more than once" in out.details
    (call,) = upstream.servicer.received()
    assert call.ended.wait(TIMEOUT) and not call.completed
    assert [m.WhichOneof("payload") for m in call.messages] == ["metadata", "events"]  # not the second metadata


def test_bytes_that_do_not_parse_are_refused(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    raw: grpc.StreamStreamMultiCallable[bytes, bytes] = sidecar.channel().stream_stream(METHOD)
    first = metadata("licensed_instance").SerializeToString()
    for requests in ([b"\xff\xff\xff"], [first, b"\x12\x05\x0a\x09broken"]):
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(iter(requests), timeout=TIMEOUT))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rule wire" in (caught.value.details() or "")
    assert all(not c.events() for c in upstream.servicer.received())


UNARY_DENIALS = [
    ("kind not served", record_event_request("licensed_instance", event("x")), (), grpc.StatusCode.UNIMPLEMENTED),
    ("no identifier", record_event_request("none", event("x")), BEARER, grpc.StatusCode.UNIMPLEMENTED),
    ("no token", record_event_request("managed_service", event("x")), (), grpc.StatusCode.UNAUTHENTICATED),
    ("no event", record_event_request("managed_service", None), BEARER, grpc.StatusCode.INVALID_ARGUMENT),
]
GATEWAY_WORDS = {grpc.StatusCode.UNIMPLEMENTED: UNSUPPORTED, grpc.StatusCode.INVALID_ARGUMENT: "event is required"}


@pytest.mark.parametrize(("name", "request_", "md", "code"), UNARY_DENIALS, ids=[c[0] for c in UNARY_DENIALS])
def test_record_event_denials_forward_nothing(
    sidecar: Sidecar,
    upstream: ServedUpstream,
    name: str,
    request_: pb.RecordEventRequest,
    md: tuple[tuple[str, str], ...],
    code: grpc.StatusCode,
) -> None:
    out = unary(sidecar.stub().RecordEvent, request_, md)
    assert out.code == code, out.details
    assert out.details == GATEWAY_WORDS[code] if code in GATEWAY_WORDS else "RecordEvent" in out.details
    assert upstream.servicer.received() == []


def test_user_metadata_from_a_kind_not_served_is_refused(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        sidecar.stub().PublishInstanceUserMetadata(
            iter([publish_metadata("managed_service"), users()]), metadata=BEARER, timeout=TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == UNSUPPORTED
    assert upstream.servicer.received() == []


# -- upstream behaviour, cancellation, deadlines, metadata --------------------------------------------


def test_upstream_error_mid_stream_reaches_the_client_with_its_status(
    sidecar: Sidecar, upstream: ServedUpstream
) -> None:
    upstream.servicer.abort_after = 2
    requests = [metadata("licensed_instance")] + [payload(event(f"m{i}")) for i in range(5)]
    out = record_events(sidecar.stub(), requests)
    assert out.code == grpc.StatusCode.DATA_LOSS
    assert out.details == "upstream broke on purpose"
    assert out.acked == {"m0", "m1"}  # only what the upstream acknowledged before failing


def test_client_cancelling_cancels_the_upstream_stream(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    upstream.servicer.linger = 0.5
    stream = Lockstep(sidecar.stub())
    stream.send(metadata("licensed_instance"))
    stream.send(payload(event("c1")))
    assert list(stream.next_response().succeeded_events) == ["c1"]
    stream.call.cancel()
    (call,) = upstream.servicer.received("RecordEvents")
    assert call.ended.wait(TIMEOUT), "the upstream stream outlived the client's"
    assert not call.completed


def test_deadline_and_authorization_pass_through_other_metadata_does_not(
    sidecar: Sidecar, upstream: ServedUpstream
) -> None:
    md = (*BEARER, ("x-private-header", "do-not-forward"))
    out = record_events(sidecar.stub(), [metadata("managed_service"), payload(event("d1"))], metadata=md, timeout=7)
    assert out.code == grpc.StatusCode.OK, out.details
    (call,) = upstream.servicer.received()
    assert call.metadata["authorization"] == BEARER[0][1]
    assert "x-private-header" not in call.metadata
    assert call.time_remaining is not None and 5 < call.time_remaining <= 7.1  # (grpc-timeout rounds up)


TRACE_CONTEXT = (
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
)
# gRPC's binary trace context (OpenCensus format). grpcio's core takes it out of the metadata it hands
# to a Python handler (at the sidecar as at this upstream), so it is sent here but cannot be seen.
TRACE_BIN = ("grpc-trace-bin", bytes.fromhex("00004bf92f3577b34da6a3ce929d0e0e47360100f067aa0ba902b7020001"))


def test_trace_context_passes_through_on_all_three_rpcs(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    """W3C trace context reaches the gateway unchanged on every RPC, without --forward-metadata naming it."""
    md = (*BEARER, *TRACE_CONTEXT, TRACE_BIN)
    stub = sidecar.stub()
    streamed = record_events(stub, [metadata("managed_service"), payload(event("t1"))], metadata=md)
    assert streamed.code == grpc.StatusCode.OK, streamed.details
    single = unary(stub.RecordEvent, record_event_request("managed_service", event("t2")), md)
    assert single.code == grpc.StatusCode.OK, single.details
    published = iter([publish_metadata("licensed_instance"), users()])
    stub.PublishInstanceUserMetadata(published, metadata=md, timeout=TIMEOUT)
    calls = upstream.servicer.received()
    assert sorted(call.rpc for call in calls) == ["PublishInstanceUserMetadata", "RecordEvent", "RecordEvents"]
    for call in calls:
        assert {key: call.metadata.get(key) for key, _ in TRACE_CONTEXT} == dict(TRACE_CONTEXT), call.rpc


def test_client_deadline_ends_the_upstream_call(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    upstream.servicer.delay = 1.5
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("slow"))], timeout=0.5)
    assert out.code == grpc.StatusCode.DEADLINE_EXCEEDED
    (call,) = upstream.servicer.received()
    assert call.ended.wait(TIMEOUT)


# -- message size -------------------------------------------------------------------------------


def _sized(target: int) -> pb.RecordEventsRequest:
    """An events payload of exactly `target` serialized bytes."""
    request = payload(event("big", pad=target - 100))
    for _ in range(5):
        request.events.events[0].interaction.trace_id += "x" * (target - request.ByteSize())
    assert request.ByteSize() == target
    return request


def test_the_largest_message_the_gateway_accepts_is_accepted_and_a_larger_one_is_not(
    sidecar: Sidecar, upstream: ServedUpstream
) -> None:
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), _sized(MAX)])
    assert out.code == grpc.StatusCode.OK, out.details
    assert [e.id for e in upstream.servicer.events()] == ["big"]
    upstream.servicer.reset(tag="larger")
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), _sized(MAX + 1)])
    assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upstream.servicer.events() == []


# -- health, reflection, metrics, logs --------------------------------------------------------------


def test_health_service_answers(sidecar: Sidecar) -> None:
    stub: Any = health_pb2_grpc.HealthStub(sidecar.channel())  # the stubs type it for aio only
    for service in ("", SERVICE):
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(sidecar: Sidecar) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_serves_the_counters(sidecar: Sidecar, upstream: ServedUpstream, metrics_port: int) -> None:
    record_events(sidecar.stub(), [metadata("licensed_instance"), payload(sensitive("mx1"), dropped("mx2"))])
    record_events(sidecar.stub(), [metadata("managed_service")])  # UNAUTHENTICATED
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert lines['telemetry_guard_events_received_total{kind="licensed_instance",rpc="RecordEvents"}'] >= 2
    assert lines['telemetry_guard_events_forwarded_total{kind="licensed_instance",rpc="RecordEvents"}'] >= 1
    assert lines['telemetry_guard_requests_forwarded_total{kind="licensed_instance",rpc="RecordEvents"}'] >= 2
    rule = "defaults.events.exclude"
    assert lines[f'telemetry_guard_removals_total{{kind="licensed_instance",rpc="RecordEvents",rule="{rule}"}}'] >= 1
    key = 'telemetry_guard_denials_total{code="UNAUTHENTICATED",rpc="RecordEvents",rule="credentials.required_for"}'
    assert lines[key] >= 1
    assert any(k.startswith("telemetry_guard_upstream_latency_seconds_count") for k in lines)
    assert any(k.startswith("telemetry_guard_policy_info{") and v == 1 for k, v in lines.items())
    _no_secret(text)
    (serving,) = sidecar.logs(message="serving")
    assert serving["metrics"] == f"http://127.0.0.1:{metrics_port}/metrics"


def test_no_removed_value_in_any_log_line(sidecar: Sidecar) -> None:
    record_events(sidecar.stub(), [metadata("licensed_instance"), payload(sensitive("lg1"), dropped("lg2"))])
    wait_for(lambda: sidecar.logs(audit="removed_keys"), what="a debug audit record")
    text = sidecar.log_text()
    assert '"prompt"' in text  # debug level names removed keys ...
    _no_secret(text)  # ... never their values


def test_no_secret_reached_the_upstream_over_the_whole_module(
    sidecar: Sidecar, upstream: ServedUpstream, tmp_path: Path
) -> None:
    record_events(sidecar.stub(), [metadata("licensed_instance"), payload(sensitive("s1"), dropped("s2"))])
    for call in upstream.servicer.received():
        _no_secret(*(m.SerializeToString().decode("utf-8", "replace") for m in call.messages))
