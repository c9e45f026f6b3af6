"""The sidecar's own OpenTelemetry spans (the otel extra), and when the environment turns them on.

In process: a real Sidecar on 127.0.0.1 with a tracer provider exporting to the SDK's in-memory
exporter, in front of the recording upstream; clients over real gRPC send a trace context. Each
call of the telemetry service gets one SERVER span, a child of the client's; the upstream receives
the sidecar's span as the parent, in the same trace; the span's decision counts equal the metrics'
and hold no value of a message. As a process: `OTEL_TRACES_EXPORTER=console` turns spans on, and a
tracing configuration that cannot run is a usage error.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from test_sidecar_support import (
    BEARER,
    POLICY,
    ROOT,
    SECRETS,
    ServedUpstream,
    Sidecar,
    event,
    metadata,
    payload,
    publish_metadata,
    record_event_request,
    record_events,
    sensitive,
    serve_upstream,
    users,
)

from telemetry_guard.sidecar.metrics import Metrics
from telemetry_guard.sidecar.server import Config
from telemetry_guard.sidecar.server import Sidecar as InProcessSidecar
from telemetry_guard.sidecar.spans import configured
from telemetry_guard.sidecar.tracing import Tracing
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACESTATE = "congo=t61rcWkgMzE"


def _context(span_id: int) -> tuple[tuple[str, str], ...]:
    """A client's trace context: TRACE_ID, this span id, sampled; and baggage the sidecar must not pass on."""
    return (
        ("traceparent", f"00-{TRACE_ID}-{span_id:016x}-01"),
        ("tracestate", TRACESTATE),
        ("baggage", "user=secret@example.com"),
    )


Scenario = Callable[[pb_grpc.TelemeteryGatewayServiceStub, grpc.aio.Channel], Awaitable[None]]


def _traced(tmp_path: Path, upstream: ServedUpstream, scenario: Scenario) -> tuple[list[ReadableSpan], Metrics]:
    """Run the scenario against an in-process sidecar whose spans go to an in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    config = Config(listen="127.0.0.1:0", upstream=upstream.target, policy=str(policy), reload_interval=0)

    async def run() -> Metrics:
        sidecar = InProcessSidecar(config, tracing=Tracing(provider))
        port = await sidecar.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(pb_grpc.TelemeteryGatewayServiceStub(channel), channel)
        finally:
            await sidecar.stop(0)
        return sidecar.metrics

    metrics = asyncio.run(run())
    provider.shutdown()
    return list(exporter.get_finished_spans()), metrics


def _metric(metrics: Metrics, name: str, **labels: str) -> dict[str, float]:
    """rule (or code) -> value of the samples of `name` with these labels."""
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                key = sample.labels.get("rule") or sample.labels.get("code") or ""
                found[key] = found.get(key, 0) + sample.value
    return found


def test_each_call_has_a_span_in_the_clients_trace_and_the_upstream_joins_it(tmp_path: Path) -> None:
    upstream = serve_upstream()

    async def scenario(stub: Any, channel: grpc.aio.Channel) -> None:
        requests = [metadata("licensed_instance"), payload(sensitive("s1"), event("s2"))]
        async for _ in stub.RecordEvents(iter(requests), metadata=(*BEARER, *_context(1))):
            pass
        request = record_event_request("managed_service", sensitive("u1"))
        await stub.RecordEvent(request, metadata=(*BEARER, *_context(2)))
        published = [publish_metadata("licensed_instance"), users()]
        await stub.PublishInstanceUserMetadata(iter(published), metadata=(*BEARER, *_context(3)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # RecordEvent is not for licensed instances
            await stub.RecordEvent(record_event_request("licensed_instance", event("r1")), metadata=_context(4))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest(), metadata=_context(5))

    try:
        spans, metrics = _traced(tmp_path, upstream, scenario)
        received = {call.rpc: call.metadata for call in upstream.servicer.received()}
    finally:
        upstream.stop()

    by_parent = {span.parent.span_id: span for span in spans if span.parent is not None}
    assert len(spans) == len(by_parent) == 4  # one per telemetry call; none for the health check
    for parent, rpc in enumerate(["RecordEvents", "RecordEvent", "PublishInstanceUserMetadata", "RecordEvent"], 1):
        span = by_parent[parent]
        assert span.kind == SpanKind.SERVER and span.name.endswith(f"/{rpc}")
        assert span.context is not None and f"{span.context.trace_id:032x}" == TRACE_ID
        if parent <= 3:  # forwarded: the gateway's parent is the sidecar's span, the trace state kept
            sent = received[rpc]
            assert sent["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01", rpc
            assert sent["tracestate"] == TRACESTATE
            assert "baggage" not in sent
    assert set(received) == {"RecordEvents", "RecordEvent", "PublishInstanceUserMetadata"}  # not the refused call

    # The decisions, as counts equal to the metrics' (each RPC was judged in exactly one call here).
    streamed = by_parent[1].attributes or {}
    assert streamed["telemetry_guard.messages"] == 2
    assert streamed["telemetry_guard.events_received"] == 2
    removals = {k.removeprefix("telemetry_guard.removals."): v for k, v in streamed.items() if ".removals." in k}
    assert removals and removals == _metric(metrics, "telemetry_guard_removals_total", rpc="RecordEvents")
    assert streamed["telemetry_guard.removals"] == sum(removals.values())
    forwarded = _metric(metrics, "telemetry_guard_events_forwarded_total", rpc="RecordEvents")
    assert streamed["telemetry_guard.events_forwarded"] == sum(forwarded.values())
    single = by_parent[2].attributes or {}
    single_removals = _metric(metrics, "telemetry_guard_removals_total", rpc="RecordEvent")
    assert single_removals and {k for k in single if ".removals." in k} == {
        f"telemetry_guard.removals.{rule}" for rule in single_removals
    }
    refusal = by_parent[4]
    # (a refusal is the client's fault: by OpenTelemetry's conventions not an error of the server span)
    assert (refusal.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    denials = _metric(metrics, "telemetry_guard_denials_total", rpc="RecordEvent", code="UNIMPLEMENTED")
    assert (refusal.attributes or {})["telemetry_guard.refusal.rule"] in {
        sample.labels["rule"]
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "telemetry_guard_denials_total"
    }
    assert (refusal.attributes or {})["telemetry_guard.refusal.code"] == "UNIMPLEMENTED" and denials
    # Never a value: no removed value, nor the baggage, in any attribute of any span.
    values = json.dumps([dict(span.attributes or {}) for span in spans])
    for secret in SECRETS:
        assert secret not in values


def test_configured_only_by_the_standard_variables() -> None:
    assert not configured({})
    assert not configured({"OTEL_SERVICE_NAME": "guard", "OTEL_TRACES_SAMPLER": "always_on"})
    assert configured({"OTEL_TRACES_EXPORTER": "otlp"})
    assert configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert not configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not configured({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})


def _printed_spans(text: str) -> list[dict[str, Any]]:
    """The console exporter's output: JSON objects one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        span, at = decoder.raw_decode(text, at)
        spans.append(span)
    return spans


def test_the_environment_turns_spans_on_in_the_real_process(tmp_path: Path) -> None:
    upstream = serve_upstream()
    env = {"OTEL_TRACES_EXPORTER": "console", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}
    sidecar = Sidecar(["--upstream", upstream.target], tmp_path, env=env)
    try:
        (served,) = sidecar.logs(message="serving")
        assert served["tracing"] is True
        out = record_events(
            sidecar.stub(), [metadata("managed_service"), payload(event("e1"))], (*BEARER, *_context(7))
        )
        assert out.code == grpc.StatusCode.OK, out.details
        sidecar.signal(signal.SIGTERM)
        assert sidecar.wait() == 0  # the provider is shut down on the way out: its spans are printed
        (span,) = _printed_spans(sidecar.out_path.read_text())
        (call,) = upstream.servicer.received()
    finally:
        sidecar.kill()
        upstream.stop()
    assert span["parent_id"] == f"0x{7:016x}" and span["context"]["trace_id"] == f"0x{TRACE_ID}"
    assert call.metadata["traceparent"] == f"00-{TRACE_ID}-{span['context']['span_id'][2:]}-01"
    assert span["resource"]["attributes"]["service.name"] == "telemetry-guard"
    assert span["resource"]["attributes"]["deployment.environment"] == "test"
    assert span["attributes"]["telemetry_guard.events_received"] == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin_json"}, "no installed span exporter is called 'zipkin_json'"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, "'carrier-pigeon'"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "(ValueError)"),
    ],
)
def test_tracing_that_cannot_run_is_a_usage_error(env: dict[str, str], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "telemetry_guard", "serve", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**_clean_environ(), **env},
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def _clean_environ() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
