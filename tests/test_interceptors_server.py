"""The server interceptors, sync and grpc.aio, on real servers on 127.0.0.1.

For each RPC and identifier kind (the table in grpc_harness.CASES): what the servicer
received, what the client got back, status codes and messages. Then what the table cannot
say: other services untouched, the pitfalls of streams (a servicer that swallows the
guard's error, a proxy that consumes the request iterator on another thread, the aio
read/write API), raw-bytes handlers, requests that do not parse, and INTERNAL when the
policy cannot be evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_harness import (
    BEARER,
    CASES,
    DENIED,
    ECHO_STREAM,
    ECHO_UNARY,
    INVALID,
    OK,
    TIMEOUT,
    UNAUTHENTICATED,
    Call,
    Case,
    Recorder,
    call_aio,
    call_sync,
    check_case,
    event,
    events_request,
    exercise,
    kept_event,
    kept_users,
    load_test_policy,
    metadata_request,
    publish_metadata_request,
    record_event_request,
    sensitive_event,
    serve_aio,
    serve_sync,
    sync_calls,
    users_request,
    with_unknown_field,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from telemetry_guard.interceptors import AsyncGuardServerInterceptor, GuardServerInterceptor
from telemetry_guard.interceptors.guard import GuardedHandlers
from telemetry_guard.policy import Engine, default_policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

STACKS = ("sync", "aio")


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_table(case: Case, stack: str) -> None:
    """A fresh server per case, the guard on it; the case's call checked on both ends."""
    (result,), recorder = exercise(stack, "server", [case.call])
    check_case(case, "server", result, recorder)


@pytest.mark.parametrize("case", [c for c in CASES if c.code == OK], ids=lambda case: case.name)
def test_table_with_aio_client_on_aio_server(case: Case) -> None:
    """The calls that pass, from a grpc.aio client (refusals: see exercise() on grpc/grpc#36066)."""
    (result,), recorder = exercise("aio", "server", [case.call], client="aio")
    check_case(case, "server", result, recorder)


# -- the default policy ---------------------------------------------------------------


NUMBER_MARKER = "ERROR: value of allowlisted key was not a string, got: *structpb.Value_NumberValue"


@pytest.mark.parametrize("stack", STACKS)
def test_default_policy(stack: str) -> None:
    """Seed rules: instances lose marketing and unlisted private keys; managed services keep them;
    RecordEvent only for managed services; user metadata refused until enabled."""
    kept_for_service = sensitive_event("s1")
    calls = [
        Call("RecordEvents", [metadata_request("licensed_instance"), events_request(sensitive_event("i1"))]),
        Call("RecordEvents", [metadata_request("managed_service"), events_request(sensitive_event("s1"))], BEARER),
        Call("RecordEvent", [record_event_request("unlicensed_instance", event("u1"))]),
        Call("PublishInstanceUserMetadata", [publish_metadata_request("licensed_instance"), users_request()]),
    ]
    results, recorder = exercise(stack, "server", calls, policy=default_policy())
    assert [r.code for r in results] == [OK, OK, grpc.StatusCode.UNIMPLEMENTED, DENIED]
    assert results[2].details == "unsupported identifier type"  # the gateway's refusal: it serves services only
    assert "user_metadata.enabled" in results[3].details
    instance, service = recorder.calls
    kept = kept_event("i1")  # the number under an allowlisted key: the string Sourcegraph's redaction writes
    kept.parameters.private_metadata["otherCompletionProviders"] = NUMBER_MARKER
    assert instance.messages[1] == events_request(kept)
    assert service.messages[1] == events_request(kept_for_service)


# -- other services ---------------------------------------------------------------------


def test_other_services_pass_untouched_sync() -> None:
    with (
        serve_sync([GuardServerInterceptor(load_test_policy())]) as served,
        grpc.insecure_channel(served.target) as channel,
    ):
        # Bytes that are no telemetry message at all: the guard must not even parse them.
        assert channel.unary_unary(ECHO_UNARY)(b"\xff\xfe", timeout=TIMEOUT) == b"\xff\xfe"
        chat = channel.stream_stream(ECHO_STREAM)(iter([b"\x00", b"\xff"]), timeout=TIMEOUT)
        assert list(chat) == [b"\x00", b"\xff"]
    assert served.recorder.rpcs() == ["Echo", "Chat"]


@pytest.mark.parametrize("stack", STACKS)
def test_health_service_beside_the_guard(stack: str) -> None:
    """grpc.health.v1 registered on the same guarded server answers as usual."""
    request = health_pb2.HealthCheckRequest(service="")
    if stack == "sync":
        server = grpc.server(_executor(), interceptors=[GuardServerInterceptor(load_test_policy())])
        servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT)
        finally:
            server.stop(None)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return

    async def run() -> Any:
        server = grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(load_test_policy())])
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT)
        finally:
            await server.stop(None)

    assert asyncio.run(run()).status == health_pb2.HealthCheckResponse.SERVING


def test_other_services_pass_untouched_aio() -> None:
    async def run() -> None:
        async with (
            serve_aio([AsyncGuardServerInterceptor(load_test_policy())]) as served,
            grpc.aio.insecure_channel(served.target) as channel,
        ):
            assert await channel.unary_unary(ECHO_UNARY)(b"\xff\xfe", timeout=TIMEOUT) == b"\xff\xfe"
            chat = channel.stream_stream(ECHO_STREAM)(iter([b"\x00", b"\xff"]), timeout=TIMEOUT)
            assert [r async for r in chat] == [b"\x00", b"\xff"]

    asyncio.run(run())


def _executor() -> Any:
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=4)


# -- what reaches the servicer is what the policy let through -------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_unknown_fields_are_discarded_before_the_servicer(stack: str) -> None:
    """Field numbers this proto does not know never reach the servicer (raw-bytes client)."""
    payload = with_unknown_field(events_request(event("k1")))
    metadata = with_unknown_field(metadata_request("licensed_instance"))

    def check(recorder: Recorder, responses: list[bytes]) -> None:
        (received,) = recorder.calls
        assert [m.SerializeToString() for m in received.messages] == [
            metadata_request("licensed_instance").SerializeToString(),
            events_request(event("k1")).SerializeToString(),
        ]
        assert [pb.RecordEventsResponse.FromString(r).succeeded_events for r in responses] == [["k1"]]

    if stack == "sync":
        with serve_sync([GuardServerInterceptor(load_test_policy())]) as served:
            with grpc.insecure_channel(served.target) as channel:
                method = channel.stream_stream("/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents")
                responses = list(method(iter([metadata, payload]), timeout=TIMEOUT))
            check(served.recorder, responses)
        return

    async def run() -> None:
        async with serve_aio([AsyncGuardServerInterceptor(load_test_policy())]) as served:
            async with grpc.aio.insecure_channel(served.target) as channel:
                method = channel.stream_stream("/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents")
                responses = [r async for r in method(iter([metadata, payload]), timeout=TIMEOUT)]
            check(served.recorder, responses)

    asyncio.run(run())


@pytest.mark.parametrize("stack", STACKS)
def test_request_that_does_not_parse_is_refused(stack: str) -> None:
    path = "/telemetrygateway.v1.TelemeteryGatewayService/RecordEvent"
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length far beyond the message
    if stack == "sync":
        with serve_sync([GuardServerInterceptor(load_test_policy())]) as served:
            with grpc.insecure_channel(served.target) as channel, pytest.raises(grpc.RpcError) as raised:
                channel.unary_unary(path)(garbage, timeout=TIMEOUT)
            assert served.recorder.calls == []
        code, details = raised.value.code(), raised.value.details()
    else:

        async def run() -> tuple[grpc.StatusCode, str]:
            async with (
                serve_aio([AsyncGuardServerInterceptor(load_test_policy())]) as served,
                grpc.aio.insecure_channel(served.target) as channel,
            ):
                try:
                    await channel.unary_unary(path)(garbage, timeout=TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    assert served.recorder.calls == []
                    return exc.code(), exc.details() or ""
            raise AssertionError("not refused")

        code, details = asyncio.run(run())
    assert code == INVALID
    assert "RecordEvent" in details and "rule wire" in details


# -- streams: the guard's status even when the servicer does not cooperate ---------------------


class SwallowingServicer(pb_grpc.TelemeteryGatewayServiceServicer):
    """Catches every error of the request iterator and ends normally."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def RecordEvents(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        try:
            for request in request_iterator:
                self.seen.append(request)
                if request.WhichOneof("payload") == "events":
                    yield pb.RecordEventsResponse(succeeded_events=[e.id for e in request.events.events])
        except Exception:
            return

    def PublishInstanceUserMetadata(self, request_iterator: Iterator[Any], context: Any) -> Any:
        with contextlib.suppress(Exception):
            self.seen.extend(request_iterator)
        return pb.PublishInstanceUserMetadataResponse()


def test_servicer_that_swallows_the_error_still_refuses() -> None:
    servicer = SwallowingServicer()
    calls = [
        Call("RecordEvents", [metadata_request("licensed_instance"), events_request(event("e1")), events_request()]),
        Call("RecordEvents", [metadata_request("licensed_instance"), metadata_request("licensed_instance")]),
        Call(
            "PublishInstanceUserMetadata",
            [publish_metadata_request("licensed_instance"), publish_metadata_request("licensed_instance")],
        ),
    ]
    guard = GuardServerInterceptor(load_test_policy())
    with serve_sync([guard], servicer=servicer) as served, grpc.insecure_channel(served.target) as channel:
        results = [call_sync(channel, c.rpc, c.requests) for c in calls]
    assert [r.code for r in results] == [OK, INVALID, INVALID]
    assert all("metadata more than once" in r.details for r in results[1:])


class ProxyServicer(pb_grpc.TelemeteryGatewayServiceServicer):
    """Forwards to an upstream server: grpc's own thread consumes the request iterator."""

    def __init__(self, upstream: grpc.Channel) -> None:
        self.stub = pb_grpc.TelemeteryGatewayServiceStub(upstream)

    def RecordEvents(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        yield from self.stub.RecordEvents(request_iterator, timeout=TIMEOUT)

    def PublishInstanceUserMetadata(self, request_iterator: Iterator[Any], context: Any) -> Any:
        return self.stub.PublishInstanceUserMetadata(request_iterator, timeout=TIMEOUT)


def test_proxy_servicer_gets_the_guards_status_not_unknown() -> None:
    """The pitfall: an abort inside an iterator consumed by another call would surface as UNKNOWN."""
    calls = [
        Call("RecordEvents", [metadata_request("licensed_instance"), events_request(sensitive_event("x1"))]),
        Call(
            "RecordEvents",
            [metadata_request("licensed_instance"), events_request(event("x2")), metadata_request("licensed_instance")],
        ),
        Call("PublishInstanceUserMetadata", [publish_metadata_request("licensed_instance"), users_request()]),
    ]
    with serve_sync() as upstream, grpc.insecure_channel(upstream.target) as upstream_channel:
        guard = GuardServerInterceptor(load_test_policy())
        with (
            serve_sync([guard], servicer=ProxyServicer(upstream_channel)) as front,
            grpc.insecure_channel(front.target) as channel,
        ):
            results = [call_sync(channel, c.rpc, c.requests) for c in calls]
    assert [r.code for r in results] == [OK, INVALID, OK]
    assert results[0].acked == [["x1"]]
    assert "RecordEvents" in results[1].details and "metadata more than once" in results[1].details
    first, second, third = upstream.recorder.calls
    assert first.messages[1] == events_request(kept_event("x1"))
    assert second.messages[:2] == [metadata_request("licensed_instance"), events_request(event("x2"))]
    assert len(second.messages) <= 2
    assert third.messages == [publish_metadata_request("licensed_instance"), kept_users()]


def test_aio_proxy_servicer_gets_the_guards_status() -> None:
    class AsyncProxy(pb_grpc.TelemeteryGatewayServiceServicer):
        def __init__(self, channel: grpc.aio.Channel) -> None:
            self.stub = pb_grpc.TelemeteryGatewayServiceStub(channel)

        async def RecordEvents(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:  # type: ignore[override]
            async for response in self.stub.RecordEvents(request_iterator, timeout=TIMEOUT):
                yield response

    calls = [
        Call("RecordEvents", [metadata_request("unlicensed_instance"), events_request(event("y1"))]),
        Call("RecordEvents", [metadata_request("unlicensed_instance"), metadata_request("unlicensed_instance")]),
    ]

    async def run() -> list[Any]:
        async with serve_aio() as upstream, grpc.aio.insecure_channel(upstream.target) as upstream_channel:
            guard = AsyncGuardServerInterceptor(load_test_policy())
            async with serve_aio([guard], servicer=AsyncProxy(upstream_channel)) as front:
                return await asyncio.to_thread(sync_calls, front.target, calls)

    ok, twice = asyncio.run(run())
    assert ok.code == OK and ok.acked == [["y1"]]
    assert twice.code == INVALID and "metadata more than once" in twice.details


@pytest.mark.parametrize("rpc", ["RecordEvents", "PublishInstanceUserMetadata"])
def test_aio_reader_writer_servicer_is_guarded_too(rpc: str) -> None:
    """A servicer using context.read()/write() gets the filtered stream and merged acks."""
    if rpc == "RecordEvents":
        requests = [metadata_request("licensed_instance"), events_request(sensitive_event("r1"), event("fail-me"))]
        expected = [metadata_request("licensed_instance"), events_request(kept_event("r1"), event("fail-me"))]
    else:
        requests = [publish_metadata_request("licensed_instance"), users_request()]
        expected = [publish_metadata_request("licensed_instance"), kept_users()]
    twice = [requests[0], requests[0]]

    async def run() -> tuple[Any, Any, Recorder]:
        guard = AsyncGuardServerInterceptor(load_test_policy())
        async with serve_aio([guard], reader_writer=True, fail_ids=["fail-me"]) as served:
            ok, refused = await asyncio.to_thread(sync_calls, served.target, [Call(rpc, requests), Call(rpc, twice)])
        return ok, refused, served.recorder

    ok, refused, recorder = asyncio.run(run())
    assert ok.code == OK
    assert recorder.calls[0].messages == expected
    if rpc == "RecordEvents":
        assert ok.acked == [["r1"]]
    assert refused.code == INVALID and "metadata more than once" in refused.details


# -- raw-bytes handlers (a forwarding proxy's shape) ------------------------------------------


def _raw_handler(received: list[bytes], aio: bool) -> grpc.GenericRpcHandler:
    def record_events(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for raw in requests:
            received.append(raw)
            request = pb.RecordEventsRequest.FromString(raw)
            if request.WhichOneof("payload") == "events":
                yield pb.RecordEventsResponse(
                    succeeded_events=[e.id for e in request.events.events]
                ).SerializeToString()

    async def arecord_events(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            received.append(raw)
            request = pb.RecordEventsRequest.FromString(raw)
            if request.WhichOneof("payload") == "events":
                yield pb.RecordEventsResponse(
                    succeeded_events=[e.id for e in request.events.events]
                ).SerializeToString()

    handler = grpc.stream_stream_rpc_method_handler(arecord_events if aio else record_events)
    return grpc.method_handlers_generic_handler(
        "telemetrygateway.v1.TelemeteryGatewayService", {"RecordEvents": handler}
    )


@pytest.mark.parametrize("stack", STACKS)
def test_raw_bytes_handler_gets_filtered_bytes_and_acks_are_merged(stack: str) -> None:
    received: list[bytes] = []
    requests = [
        metadata_request("licensed_instance"),
        events_request(sensitive_event("b1"), event("b2", feature="internal.x", action="y")),
    ]
    if stack == "sync":
        server = grpc.server(_executor(), interceptors=[GuardServerInterceptor(load_test_policy())])
        server.add_generic_rpc_handlers((_raw_handler(received, aio=False),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                result = call_sync(channel, "RecordEvents", requests)
        finally:
            server.stop(None)
    else:

        async def run() -> Any:
            server = grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(load_test_policy())])
            server.add_generic_rpc_handlers((_raw_handler(received, aio=True),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    return await call_aio(channel, "RecordEvents", requests)
            finally:
                await server.stop(None)

        result = asyncio.run(run())
    assert result.code == OK
    assert result.acked == [["b1", "b2"]]
    assert [pb.RecordEventsRequest.FromString(r) for r in received] == [
        metadata_request("licensed_instance"),
        events_request(kept_event("b1")),
    ]


# -- INTERNAL: the policy could not be evaluated ------------------------------------------------


class BrokenEngine(Engine):
    """Fails while filtering, with a message quoting data (which must not reach anyone)."""

    def record_events(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SECRET-PRIVATE-VALUE in a broken engine")

    def record_event(self, *args: Any, **kwargs: Any) -> Any:
        raise KeyError("SECRET-PRIVATE-VALUE")

    record_event_admitted = record_event  # what the interceptors call, once they have admitted the request

    def publish_instance_user_metadata(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("SECRET-PRIVATE-VALUE")


INTERNAL_CALLS = [
    Call("RecordEvents", [metadata_request("licensed_instance"), events_request(event("z1"))]),
    Call("RecordEvent", [record_event_request("managed_service", event("z2"))], BEARER),
    Call("PublishInstanceUserMetadata", [publish_metadata_request("licensed_instance"), users_request()]),
]


@pytest.mark.parametrize("stack", STACKS)
def test_internal_when_the_policy_cannot_be_evaluated(stack: str) -> None:
    results, recorder = exercise(stack, "server", INTERNAL_CALLS, policy=BrokenEngine(load_test_policy()))
    assert recorder.calls == []
    for call, result in zip(INTERNAL_CALLS, results, strict=True):
        assert result.code == grpc.StatusCode.INTERNAL, result
        assert call.rpc in result.details and "could not be evaluated" in result.details
        assert "SECRET" not in result.details


def test_internal_while_merging_acknowledgements() -> None:
    """A response the guard cannot merge into ends the call with INTERNAL, never unmerged."""

    class OddServicer(pb_grpc.TelemeteryGatewayServiceServicer):
        def RecordEvents(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
            for request in request_iterator:
                if request.WhichOneof("payload") == "events":
                    yield pb.RecordEventResponse()  # the wrong type: cannot carry the acks

    requests = [metadata_request("licensed_instance"), events_request(event("o1", feature="internal.q"))]
    guard = GuardServerInterceptor(load_test_policy())
    with serve_sync([guard], servicer=OddServicer()) as served, grpc.insecure_channel(served.target) as channel:
        result = call_sync(channel, "RecordEvents", requests)
    assert result.code == grpc.StatusCode.INTERNAL and "RecordEvents" in result.details


def test_wrong_handler_shape_is_refused_with_internal() -> None:
    """A service that registers RecordEvent as a stream never gets an unguarded call."""
    seen = threading.Event()

    def behavior(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        seen.set()
        yield b""

    handler = grpc.method_handlers_generic_handler(
        "telemetrygateway.v1.TelemeteryGatewayService", {"RecordEvent": grpc.stream_stream_rpc_method_handler(behavior)}
    )
    server = grpc.server(_executor(), interceptors=[GuardServerInterceptor(load_test_policy())])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.stream_stream("/telemetrygateway.v1.TelemeteryGatewayService/RecordEvent")
            with pytest.raises(grpc.RpcError) as raised:
                list(
                    method(
                        iter([record_event_request("managed_service", event("q")).SerializeToString()]), timeout=TIMEOUT
                    )
                )
    finally:
        server.stop(None)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert not seen.is_set()


@pytest.mark.parametrize("stack", STACKS)
def test_each_call_is_judged_by_its_own_credentials(stack: str) -> None:
    """The guarded handler is made once per servicer handler, not per call: the token it judges is the call's own.
    With and without a bearer token, in turn, on one server: every call without one refused, every call with one
    passed on, whichever came first."""
    record_event = record_event_request("managed_service", event("c1"))
    stream = [metadata_request("managed_service"), events_request(event("c2"))]
    calls = [
        call
        for metadata in (BEARER, (), BEARER, ())
        for call in (Call("RecordEvent", [record_event], metadata), Call("RecordEvents", stream, metadata))
    ]
    results, recorder = exercise(stack, "server", calls)
    assert [result.code for result in results] == [OK, OK, UNAUTHENTICATED, UNAUTHENTICATED] * 2
    assert len(recorder.calls) == 4


def test_guarded_handlers_are_made_once_per_handler_and_kept_within_a_bound() -> None:
    made: list[tuple[str, object]] = []

    def wrap(rpc: str, handler: object) -> object:
        made.append((rpc, handler))
        return ("guarded", rpc, handler)

    handlers: GuardedHandlers[object] = GuardedHandlers(wrap)
    servicers = [object(), object()]
    for _ in range(3):
        assert [handlers.get("RecordEvent", h) for h in servicers] == [("guarded", "RecordEvent", h) for h in servicers]
    assert made == [("RecordEvent", h) for h in servicers]
    assert handlers.get("RecordEvents", servicers[0]) == ("guarded", "RecordEvents", servicers[0])  # another RPC
    for _ in range(3 * GuardedHandlers.LIMIT):  # a servicer making a new handler for every call
        fresh = object()
        assert handlers.get("RecordEvent", fresh) == ("guarded", "RecordEvent", fresh)
        assert len(handlers._made) <= GuardedHandlers.LIMIT
