"""The exporter side: wrap_channel (sync) and aio_client_interceptors (grpc.aio).

The server here has no guard, so what its recording servicer gets is exactly what left the
exporter's process: a refused call must leave no trace at all (not even a started call).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
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
    UNIMPLEMENTED,
    Call,
    Case,
    call_aio,
    call_sync,
    check_case,
    dropped_event,
    event,
    events_request,
    exercise,
    kept_event,
    load_test_policy,
    metadata_request,
    publish_metadata_request,
    record_event_request,
    sensitive_event,
    serve_aio,
    serve_sync,
    users_request,
    with_unknown_field,
)

from telemetry_guard.interceptors import (
    AsyncGuardStreamStreamInterceptor,
    AsyncGuardStreamUnaryInterceptor,
    AsyncGuardUnaryStreamInterceptor,
    AsyncGuardUnaryUnaryInterceptor,
    BearerPresent,
    Guard,
    GuardClientInterceptor,
    GuardError,
    GuardServerInterceptor,
    aio_client_interceptors,
    wrap_channel,
)
from telemetry_guard.policy import Engine
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

STACKS = ("sync", "aio")
RECORD_EVENTS_PATH = "/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents"


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_table(case: Case, stack: str) -> None:
    """The same cases as on the server side: same codes and messages, filtered before leaving."""
    (result,), recorder = exercise(stack, "client", [case.call])
    check_case(case, "client", result, recorder)
    if case.received is None:
        assert recorder.calls == [], "a refused call must send nothing"


# -- the caller's objects, raw-bytes methods, lazily fed iterators -----------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_callers_messages_are_not_changed(stack: str) -> None:
    requests = [metadata_request("licensed_instance"), events_request(sensitive_event("c1"), dropped_event("c2"))]
    before = [r.SerializeToString() for r in requests]
    (result,), recorder = exercise(stack, "client", [Call("RecordEvents", requests)])
    assert result.code == OK and result.acked == [["c1", "c2"]]
    assert recorder.calls[0].messages[1] == events_request(kept_event("c1"))
    assert [r.SerializeToString() for r in requests] == before


class _SyncSpy(grpc.StreamStreamClientInterceptor):
    """An interceptor placed after the guard: records what the guard hands on."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        def passing() -> Any:
            for request in request_iterator:
                self.seen.append(request)
                yield request

        return continuation(details, passing())


class _AioSpy(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        async def passing() -> Any:
            async for request in request_iterator:
                self.seen.append(request)
                yield request

        return await continuation(details, passing())


@pytest.mark.parametrize("stack", STACKS)
def test_events_payload_leaves_as_the_filtered_bytes(stack: str) -> None:
    """An events payload is not parsed back: grpc's serializer writes the engine's filtered bytes as they are."""
    policy = load_test_policy()
    requests = [metadata_request("licensed_instance"), events_request(sensitive_event("w1"), dropped_event("w2"))]
    expected = Engine(policy).record_events_admitted(requests[1].SerializeToString(), "licensed_instance").request
    if stack == "sync":
        spy: Any = _SyncSpy()
        with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
            result = call_sync(wrap_channel(grpc.intercept_channel(raw, spy), policy), "RecordEvents", requests)
    else:
        spy = _AioSpy()

        async def run() -> Any:
            async with serve_aio() as served:
                interceptors = [*aio_client_interceptors(policy), spy]
                async with grpc.aio.insecure_channel(served.target, interceptors=interceptors) as channel:
                    return await call_aio(channel, "RecordEvents", requests), served

        result, served = asyncio.run(run())
    assert result.code == OK and result.acked == [["w1", "w2"]]
    assert served.recorder.calls[0].messages == [requests[0], events_request(kept_event("w1"))]
    payload = spy.seen[1]
    assert not isinstance(payload, pb.RecordEventsRequest), "the filtered bytes were parsed back"
    assert pb.RecordEventsRequest.SerializeToString(payload) == expected


def test_raw_bytes_method_is_filtered_sync() -> None:
    """A channel method without serializers (bytes in, bytes out) is guarded all the same."""
    requests = [
        with_unknown_field(metadata_request("licensed_instance")),
        events_request(sensitive_event("r1"), dropped_event("r2")).SerializeToString(),
    ]
    with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
        channel = wrap_channel(raw, load_test_policy())
        responses = list(channel.stream_stream(RECORD_EVENTS_PATH)(iter(requests), timeout=TIMEOUT))
    assert [pb.RecordEventsResponse.FromString(r).succeeded_events for r in responses] == [["r1", "r2"]]
    (received,) = served.recorder.calls
    assert received.messages == [metadata_request("licensed_instance"), events_request(kept_event("r1"))]
    assert received.messages[0].SerializeToString() == metadata_request("licensed_instance").SerializeToString()


def test_raw_bytes_method_is_filtered_aio() -> None:
    requests = [
        with_unknown_field(metadata_request("licensed_instance")),
        events_request(sensitive_event("r1"), dropped_event("r2")).SerializeToString(),
    ]

    async def run() -> tuple[list[bytes], list[Any]]:
        async with serve_aio() as served:
            interceptors = aio_client_interceptors(load_test_policy())
            async with grpc.aio.insecure_channel(served.target, interceptors=interceptors) as channel:
                call = channel.stream_stream(RECORD_EVENTS_PATH)(iter(requests), timeout=TIMEOUT)
                responses = [r async for r in call]
        return responses, served.recorder.calls[0].messages

    responses, received = asyncio.run(run())
    assert [pb.RecordEventsResponse.FromString(r).succeeded_events for r in responses] == [["r1", "r2"]]
    assert [m.SerializeToString() for m in received] == [
        metadata_request("licensed_instance").SerializeToString(),
        events_request(kept_event("r1")).SerializeToString(),
    ]


def test_request_iterator_fed_after_the_call_is_made_sync() -> None:
    """The first message is read when the responses are first asked for, not when the call is made."""
    feed: queue.Queue[Any] = queue.Queue()
    with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
        stub = pb_grpc.TelemeteryGatewayServiceStub(wrap_channel(raw, load_test_policy()))
        call = stub.RecordEvents(iter(lambda: feed.get(timeout=TIMEOUT), None), timeout=TIMEOUT)
        feed.put(metadata_request("unlicensed_instance"))
        feed.put(events_request(event("f1"), dropped_event("f2")))
        first = next(call)
        feed.put(None)
        rest = list(call)
        assert call.code() == OK
    assert [list(first.succeeded_events), rest] == [["f1", "f2"], []]


def test_refused_lazy_call_reports_the_guards_status_sync() -> None:
    with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
        stub = pb_grpc.TelemeteryGatewayServiceStub(wrap_channel(raw, load_test_policy()))
        call = stub.RecordEvents(iter([metadata_request("managed_service")]), timeout=TIMEOUT)
        assert call.code() == UNAUTHENTICATED
        assert "credentials.required_for" in call.details()
        with pytest.raises(grpc.RpcError) as raised:
            next(call)
        assert raised.value.code() == UNAUTHENTICATED
        cancelled = stub.RecordEvents(iter([metadata_request("licensed_instance")]), timeout=TIMEOUT)
        assert cancelled.cancel()
        with pytest.raises(grpc.RpcError) as stopped:
            next(cancelled)
        assert stopped.value.code() == grpc.StatusCode.CANCELLED
    assert served.recorder.calls == []


def test_write_api_aio() -> None:
    """grpc.aio's write() reaches the interceptor's deferred start; a refusal is reported by code()."""

    async def run() -> tuple[list[Any], grpc.StatusCode, str, list[Any]]:
        async with serve_aio() as served:
            interceptors = aio_client_interceptors(load_test_policy())
            async with grpc.aio.insecure_channel(served.target, interceptors=interceptors) as channel:
                stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
                call = stub.RecordEvents(timeout=TIMEOUT)
                await call.write(metadata_request("licensed_instance"))
                await call.write(events_request(sensitive_event("w1"), dropped_event("w2")))
                first = await call.read()
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == OK
                refused = stub.RecordEvents(timeout=TIMEOUT, metadata=grpc.aio.Metadata())
                # The write is judged at once; grpc.aio may report the call finished to the write.
                with contextlib.suppress(asyncio.InvalidStateError):
                    await refused.write(metadata_request("workspace"))
                code, details = await refused.code(), await refused.details()
                with pytest.raises(grpc.aio.AioRpcError):
                    await refused.read()
        return [list(first.succeeded_events)], code, details, served.recorder.calls

    acked, code, details, calls = asyncio.run(run())
    assert acked == [["w1", "w2"]]
    assert code == UNAUTHENTICATED and "RecordEvents" in details
    assert len(calls) == 1 and calls[0].messages[1] == events_request(kept_event("w1"))


# -- guard on both sides: applying the policy twice changes nothing ------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c.code == OK], ids=lambda case: case.name)
def test_guard_on_both_sides_is_idempotent(case: Case) -> None:
    policy = load_test_policy()
    with serve_sync([GuardServerInterceptor(policy)], fail_ids=["fail-me"]) as served:
        with grpc.insecure_channel(served.target) as raw:
            result = call_sync(wrap_channel(raw, policy), case.call.rpc, case.call.requests, case.call.metadata)
        check_case(case, "client", result, served.recorder)


# -- one aio interceptor object per kind, each doing its own kind's work -------------------------


def test_aio_interceptors_one_object_per_kind() -> None:
    kinds = (
        grpc.aio.UnaryUnaryClientInterceptor,
        grpc.aio.UnaryStreamClientInterceptor,
        grpc.aio.StreamUnaryClientInterceptor,
        grpc.aio.StreamStreamClientInterceptor,
    )
    objects = aio_client_interceptors(load_test_policy())
    for obj in objects:
        assert sum(isinstance(obj, kind) for kind in kinds) == 1, type(obj).__name__
    assert len({type(obj) for obj in objects}) == len(kinds)
    assert len({id(obj.guard) for obj in objects}) == 1  # type: ignore[attr-defined]


REFUSED_BY_KIND = {
    AsyncGuardUnaryUnaryInterceptor: Call("RecordEvent", [record_event_request("licensed_instance", event("k1"))]),
    AsyncGuardStreamUnaryInterceptor: Call(
        "PublishInstanceUserMetadata", [publish_metadata_request("managed_service"), users_request()], BEARER
    ),
    AsyncGuardStreamStreamInterceptor: Call(
        "RecordEvents", [metadata_request("managed_service"), events_request(event("k2"))]
    ),
}


@pytest.mark.parametrize("kind", list(REFUSED_BY_KIND), ids=lambda kind: kind.__name__)
def test_each_aio_interceptor_alone_guards_its_rpc(kind: type) -> None:
    """Registered alone, each object refuses its RPC locally (so grpc.aio did register it)."""
    refused = REFUSED_BY_KIND[kind]
    others = [call for k, call in REFUSED_BY_KIND.items() if k is not kind]

    async def run() -> tuple[list[Any], list[Any]]:
        async with serve_aio() as served:
            interceptor = kind(load_test_policy())
            async with grpc.aio.insecure_channel(served.target, interceptors=[interceptor]) as channel:
                results = [await call_aio(channel, c.rpc, c.requests, c.metadata) for c in [refused, *others]]
        return results, served.recorder.calls

    results, calls = asyncio.run(run())
    assert results[0].code in (DENIED, UNAUTHENTICATED, UNIMPLEMENTED)
    assert refused.rpc in results[0].details or results[0].details == "unsupported identifier type"
    assert [c.rpc for c in calls] == [c.rpc for c in others]  # not its kind: passed untouched


@pytest.mark.parametrize("stack", STACKS)
def test_wrong_shape_call_never_leaves(stack: str) -> None:
    """A unary-stream call to one of the service's methods would leave unexamined: refused."""
    request = metadata_request("licensed_instance")
    if stack == "sync":
        with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
            method = wrap_channel(raw, load_test_policy()).unary_stream(RECORD_EVENTS_PATH)
            with pytest.raises(grpc.RpcError) as raised:
                list(method(request.SerializeToString(), timeout=TIMEOUT))
            code = raised.value.code()
    else:

        async def run() -> grpc.StatusCode:
            async with serve_aio() as served:
                interceptors = [AsyncGuardUnaryStreamInterceptor(load_test_policy())]
                async with grpc.aio.insecure_channel(served.target, interceptors=interceptors) as channel:
                    call = channel.unary_stream(RECORD_EVENTS_PATH)(request.SerializeToString(), timeout=TIMEOUT)
                    with pytest.raises(grpc.aio.AioRpcError) as raised:
                        [r async for r in call]
            assert served.recorder.calls == []
            return raised.value.code()

        code = asyncio.run(run())
    assert code == grpc.StatusCode.INTERNAL


# -- other services, INTERNAL ---------------------------------------------------------------


def test_other_services_pass_untouched() -> None:
    with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
        channel = grpc.intercept_channel(raw, GuardClientInterceptor(load_test_policy()))
        assert channel.unary_unary(ECHO_UNARY)(b"\xff", timeout=TIMEOUT) == b"\xff"
        assert list(channel.stream_stream(ECHO_STREAM)(iter([b"\x01", b"\xfe"]), timeout=TIMEOUT)) == [b"\x01", b"\xfe"]

    async def run() -> list[bytes]:
        async with serve_aio() as served:
            interceptors = aio_client_interceptors(load_test_policy())
            async with grpc.aio.insecure_channel(served.target, interceptors=interceptors) as channel:
                echoed = await channel.unary_unary(ECHO_UNARY)(b"\xff", timeout=TIMEOUT)
                chat = channel.stream_stream(ECHO_STREAM)(iter([b"\x01", b"\xfe"]), timeout=TIMEOUT)
                return [echoed, *[r async for r in chat]]

    assert asyncio.run(run()) == [b"\xff", b"\x01", b"\xfe"]


class BrokenEngine(Engine):
    def record_events(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SECRET-PRIVATE-VALUE")

    def record_event(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SECRET-PRIVATE-VALUE")

    record_event_admitted = record_event  # what the interceptors call, once they have admitted the request

    def publish_instance_user_metadata(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SECRET-PRIVATE-VALUE")


@pytest.mark.parametrize("stack", STACKS)
def test_internal_when_the_policy_cannot_be_evaluated(stack: str) -> None:
    calls = [
        Call("RecordEvents", [metadata_request("licensed_instance"), events_request(event("z1"))]),
        Call("RecordEvent", [record_event_request("managed_service", event("z2"))], BEARER),
        Call("PublishInstanceUserMetadata", [publish_metadata_request("licensed_instance"), users_request()]),
    ]
    results, recorder = exercise(stack, "client", calls, policy=BrokenEngine(load_test_policy()))
    assert recorder.calls == []
    for call, result in zip(calls, results, strict=True):
        assert result.code == grpc.StatusCode.INTERNAL
        assert call.rpc in result.details and "SECRET" not in result.details


def test_invalid_argument_codes_match_the_server_side() -> None:
    """Spot check across sides: the same refusal, word for word."""
    call = Call("RecordEvents", [events_request(event("s1"))])
    (client_side,), _ = exercise("sync", "client", [call])
    (server_side,), _ = exercise("sync", "server", [call])
    assert client_side.code == server_side.code == INVALID
    assert client_side.details == server_side.details


def test_default_policy_is_used_when_none_is_given() -> None:
    with serve_sync() as served, grpc.insecure_channel(served.target) as raw:
        result = call_sync(
            wrap_channel(raw), "PublishInstanceUserMetadata", [publish_metadata_request("licensed_instance")]
        )
    assert result.code == DENIED and "user_metadata.enabled" in result.details
    assert served.recorder.calls == []


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != OK], ids=lambda c: c.name)
def test_guard_errors_keep_their_code_in_both_client_forms(code: grpc.StatusCode) -> None:
    error = GuardError(code, "rule.x", f"RecordEvents: refused (rule rule.x) {code.name}")
    sync_form = error.as_rpc_error()
    assert isinstance(sync_form, grpc.RpcError) and isinstance(sync_form, grpc.Call)
    assert (sync_form.code(), sync_form.details()) == (code, error.message)
    aio_form = error.as_aio_rpc_error()
    assert (aio_form.code(), aio_form.details()) == (code, error.message)
    assert str(error) == f"{code.name}: {error.message}"


def test_a_guard_is_used_as_built() -> None:
    guard = Guard.build(load_test_policy(), side="client")
    assert GuardClientInterceptor(guard).guard is guard
    with pytest.raises(ValueError, match="as built"):
        GuardServerInterceptor(guard)  # a client guard copies requests; a server guard does not
    with pytest.raises(ValueError, match="as built"):
        GuardClientInterceptor(guard, verifier=BearerPresent())
