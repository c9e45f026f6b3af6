"""OpenTelemetry spans of the sidecar itself (`pip install 'telemetry-guard[otel]'`), when configured.

sidecar.spans.from_environment() builds this only when the standard OTEL_ variables ask for it
(an exporter in OTEL_TRACES_EXPORTER, or an OTLP endpoint); the rest is read as the SDK reads it:
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (service.name defaults to telemetry-guard),
OTEL_TRACES_SAMPLER, OTEL_PROPAGATORS, OTEL_BSP_*, OTEL_EXPORTER_OTLP_* (endpoint, headers,
certificate, protocol). Exporters are found by name as the SDK finds them (the
opentelemetry_traces_exporter entry points): otlp (gRPC by default), console, any installed one.

Each call of the telemetry service gets a SERVER span (opentelemetry-instrumentation-grpc's aio
server interceptor, a child of the trace context the exporter sent; health checks and reflection
get none), with the policy's decisions as attributes (sidecar.spans.CallCounts). The upstream call
carries the sidecar's span as its parent: the propagator's headers replace the exporter's among
the keys the sidecar forwards, so the gateway's span is the sidecar's child, in the same trace.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from importlib.metadata import entry_points
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import service_name
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from telemetry_guard.policy.kinds import SERVICE
from telemetry_guard.sidecar.spans import CALL, EXPORTER_ENV, INSTALL, CallCounts, TracingError

Metadata = tuple[tuple[str, str | bytes], ...]

DEFAULT_SERVICE_NAME = "telemetry-guard"
EXPORTER_GROUP = "opentelemetry_traces_exporter"
OTLP_PROTOCOLS = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


class Tracing:
    """The sidecar's tracer provider, its server interceptors and the trace context of upstream calls."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Tracing:
        provider = TracerProvider(resource=_resource())
        for exporter in exporter_classes(environ):
            provider.add_span_processor(BatchSpanProcessor(_started(exporter)))
        return cls(provider)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The OpenTelemetry span first, then the decision counts inside it."""
        spans: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=service_name(SERVICE)
        )
        return [spans, _DecisionCounts()]

    def outgoing(self, metadata: Metadata, forward: Collection[str]) -> Metadata:
        """The upstream call's metadata: the current span's trace context in place of the exporter's.

        Of the propagator's headers only those the sidecar forwards are set (not baggage, by default).
        """
        carrier: dict[str, str] = {}
        inject(carrier)
        if not carrier:
            return metadata
        kept = tuple(item for item in metadata if item[0].lower() not in carrier)
        return kept + tuple((key, value) for key, value in carrier.items() if key in forward)

    def shutdown(self) -> None:
        """Export what is buffered, stop the exporters."""
        self.provider.shutdown()


def _resource() -> Resource:
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES as the SDK reads them; service.name telemetry-guard otherwise."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        detected = detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def exporter_classes(environ: Mapping[str, str]) -> list[type[SpanExporter]]:
    """The span exporters OTEL_TRACES_EXPORTER names (otlp if none), found as the SDK finds them; nothing started."""
    names = [name.strip().lower() for name in environ.get(EXPORTER_ENV, "").split(",") if name.strip()]
    classes: list[type[SpanExporter]] = []
    for named in [name for name in names if name != "none"] or ["otlp"]:
        name = _otlp_exporter(environ) if named == "otlp" else named
        found = list(entry_points(group=EXPORTER_GROUP, name=name))
        if not found:
            known = ", ".join(sorted(point.name for point in entry_points(group=EXPORTER_GROUP)))
            raise TracingError(f"{EXPORTER_ENV}: no installed span exporter is called {name!r} ({known}; {INSTALL})")
        classes.append(found[0].load())
    return classes


def _otlp_exporter(environ: Mapping[str, str]) -> str:
    """The entry point otlp stands for: by its protocol, gRPC unless told otherwise (as the SDK does)."""
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol.strip() not in OTLP_PROTOCOLS:
        raise TracingError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: one of {', '.join(OTLP_PROTOCOLS)}")
    return OTLP_PROTOCOLS[protocol.strip()]


def _started(exporter: type[SpanExporter]) -> SpanExporter:
    """The exporter, configured by its own OTEL_ variables."""
    try:
        return exporter()
    except Exception as exc:  # its message may quote a header value: the type only
        raise TracingError(
            f"the span exporter {exporter.__name__} cannot start ({type(exc).__name__}): check its OTEL_ variables"
        ) from None


Behavior = Callable[[Any, Any], Any]


class _DecisionCounts(grpc.aio.ServerInterceptor):
    """A CallCounts for each call of the telemetry service, written onto the call's span when it ends."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "")
        if handler is None or not method.startswith(f"/{SERVICE}/"):
            return handler  # type: ignore[no-any-return]
        # The sidecar's handlers (grpc's RpcMethodHandler, a named tuple): one of the three kinds below.
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_counted_stream(handler.stream_stream))  # type: ignore[no-any-return]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_counted(handler.unary_unary))  # type: ignore[no-any-return]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_counted(handler.stream_unary))  # type: ignore[no-any-return]
        return handler  # type: ignore[no-any-return]


def _annotate(counts: CallCounts) -> None:
    trace.get_current_span().set_attributes(counts.attributes())


def _counted(behavior: Behavior) -> Behavior:
    async def counted(request: Any, context: Any) -> Any:
        counts = CallCounts()
        CALL.set(counts)  # this call's task (and the tasks it starts) only
        try:
            return await behavior(request, context)
        finally:
            _annotate(counts)

    return counted


def _counted_stream(behavior: Behavior) -> Behavior:
    async def counted(request: Any, context: Any) -> AsyncIterator[Any]:
        counts = CallCounts()
        CALL.set(counts)
        try:
            async for response in behavior(request, context):
                yield response
        finally:
            _annotate(counts)

    return counted
