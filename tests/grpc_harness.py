"""Real servers and channels on 127.0.0.1 for the interceptor tests, sync and grpc.aio.

- A recording servicer (sync and aio): what each call received, in order. RecordEvents
  answers every events payload with the ids it received, minus `fail_ids` (events it "failed").
- A second tiny service, test.Echo, registered beside it with raw-bytes handlers: the
  guard must pass its calls untouched.
- serve_sync / serve_aio: a server with the given interceptors on an ephemeral port.
- call_sync / call_aio: one call of an RPC, normalized to a Result (code, details, responses).
- Builders for identifiers, events and requests; policies for the tests.

Every RPC has a deadline (TIMEOUT) and every wait is bounded, so nothing can hang.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from google.protobuf import struct_pb2, timestamp_pb2

from policy import Policy, load_policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
TIMEOUT = 10.0
ECHO_UNARY = "/test.Echo/Echo"
ECHO_STREAM = "/test.Echo/Chat"
KINDS = ("licensed_instance", "unlicensed_instance", "managed_service", "workspace")
TOKEN = "tok-good"
BEARER = (("authorization", f"Bearer {TOKEN}"),)

# Values that the test policy removes; none may appear in a log record or an error message.
SECRET_VALUES = (
    "SECRET-PRIVATE-VALUE",
    "987654321",  # a non-string value under an allowlisted key
    "https://secret.example.com/marketing",
    "secret-cohort",
    "secret@example.com",
    "secret-username",
    "SECRET-IN-DROPPED-EVENT",
    "SECRET-UNKNOWN-FIELD",
)

# A policy with every kind of removal: allowlisted private_metadata, marketing dropped, a
# feature filter, invalid events dropped, user metadata enabled with some fields only.
TEST_POLICY = """\
version: 1
allowlists: [builtin:sourcegraph]
access:
  RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]
  RecordEvent: [managed_service, workspace]
  PublishInstanceUserMetadata: [licensed_instance, unlicensed_instance]
credentials:
  required_for: [managed_service, workspace]
user_metadata:
  enabled: true
  user_fields: [id, assigned_rbac_roles]
  organization_fields: [id, user_ids]
defaults:
  marketing_tracking: drop
  private_metadata: {mode: allowlist, non_string: drop}
  events: {include: ["*"], exclude: ["internal.*"]}
  invalid_events: drop
  unknown_fields: discard
  legacy_metadata: keep
"""


def test_policy(tmp_path: Path, text: str = TEST_POLICY) -> Policy:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


# -- messages --------------------------------------------------------------------------


def identifier(kind: str, complete: bool = True) -> pb.Identifier:
    ident = pb.Identifier()
    if kind == "licensed_instance":
        ident.licensed_instance.license_key = "lic-key" if complete else ""
        ident.licensed_instance.instance_id = "inst-licensed"
    elif kind == "unlicensed_instance":
        ident.unlicensed_instance.instance_id = "inst-unlicensed" if complete else ""
    elif kind == "managed_service":
        ident.managed_service.service_id = "svc-1" if complete else ""
    elif kind == "workspace":
        ident.workspace.workspace_id = "ws-1" if complete else ""
    elif kind != "none":
        raise ValueError(kind)
    return ident


def event(
    event_id: str,
    feature: str = "cody.completion",
    action: str = "accepted",
    *,
    private: dict[str, Any] | None = None,
    marketing: bool = False,
) -> pb.Event:
    ev = pb.Event(id=event_id, feature=feature, action=action, timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000))
    ev.parameters.metadata["count"] = 1.0
    if private is not None:
        struct = struct_pb2.Struct()
        struct.update(private)
        ev.parameters.private_metadata.CopyFrom(struct)
    if marketing:
        ev.marketing_tracking.url = "https://secret.example.com/marketing"
        ev.marketing_tracking.cohort_id = "secret-cohort"
    return ev


def sensitive_event(event_id: str) -> pb.Event:
    """Allowlisted type (cody.completion: languageId, otherCompletionProviders) with things to remove."""
    private = {"languageId": "go", "prompt": "SECRET-PRIVATE-VALUE", "otherCompletionProviders": 987654321.5}
    return event(event_id, private=private, marketing=True)


def dropped_event(event_id: str) -> pb.Event:
    """Removed whole by the test policy's feature filter (internal.*)."""
    return event(event_id, feature="internal.debug", action="dumped", private={"blob": "SECRET-IN-DROPPED-EVENT"})


def metadata_request(kind: str, request_id: str = "req-1", complete: bool = True) -> pb.RecordEventsRequest:
    md = pb.RecordEventsRequestMetadata(request_id=request_id)
    if kind != "none":
        md.identifier.CopyFrom(identifier(kind, complete))
    return pb.RecordEventsRequest(metadata=md)


def events_request(*events: pb.Event) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(events=pb.RecordEventsRequest.EventsPayload(events=events))


def record_event_request(kind: str, ev: pb.Event | None, request_id: str = "req-u") -> pb.RecordEventRequest:
    req = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(request_id=request_id))
    if kind != "none":
        req.metadata.identifier.CopyFrom(identifier(kind))
    if ev is not None:
        req.event.CopyFrom(ev)
    return req


def publish_metadata_request(kind: str, request_id: str = "req-p") -> pb.PublishInstanceUserMetadataRequest:
    md = pb.PublishInstanceUserMetadataRequestMetadata(request_id=request_id)
    if kind != "none":
        md.identifier.CopyFrom(identifier(kind))
    return pb.PublishInstanceUserMetadataRequest(metadata=md)


def users_request() -> pb.PublishInstanceUserMetadataRequest:
    users = [
        pb.InstanceUserMetadata(
            id=7, username="secret-username", primary_email="secret@example.com", assigned_rbac_roles=["admin"]
        )
    ]
    return pb.PublishInstanceUserMetadataRequest(
        user_metadata=pb.PublishInstanceUserMetadataRequest.UserMetadataPayload(users=users)
    )


def with_unknown_field(message: Any) -> bytes:
    """The serialized message plus field 99 (unknown to this proto) carrying a secret."""
    secret = b"SECRET-UNKNOWN-FIELD"
    return bytes(message.SerializeToString() + b"\x9a\x06" + bytes([len(secret)]) + secret)


# -- the servicer ----------------------------------------------------------------------


@dataclass
class Received:
    rpc: str
    messages: list[Any]
    metadata: dict[str, str]


@dataclass
class Recorder:
    calls: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, rpc: str, metadata: Any) -> Received:
        call = Received(rpc, [], {k: v for k, v in (metadata or ()) if isinstance(v, str)})
        with self.lock:
            self.calls.append(call)
        return call

    def rpcs(self) -> list[str]:
        return [c.rpc for c in self.calls]


def answer(request: pb.RecordEventsRequest, fail_ids: Iterable[str]) -> pb.RecordEventsResponse:
    failed = set(fail_ids)
    return pb.RecordEventsResponse(succeeded_events=[e.id for e in request.events.events if e.id not in failed])


class RecordingServicer(pb_grpc.TelemeteryGatewayServiceServicer):
    def __init__(self, recorder: Recorder, fail_ids: Sequence[str] = ()) -> None:
        self.recorder = recorder
        self.fail_ids = fail_ids

    def RecordEvents(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        call = self.recorder.start("RecordEvents", context.invocation_metadata())
        for request in request_iterator:
            call.messages.append(request)
            if request.WhichOneof("payload") == "events":
                yield answer(request, self.fail_ids)

    def RecordEvent(self, request: Any, context: Any) -> Any:
        self.recorder.start("RecordEvent", context.invocation_metadata()).messages.append(request)
        return pb.RecordEventResponse()

    def PublishInstanceUserMetadata(self, request_iterator: Iterator[Any], context: Any) -> Any:
        call = self.recorder.start("PublishInstanceUserMetadata", context.invocation_metadata())
        call.messages.extend(request_iterator)
        return pb.PublishInstanceUserMetadataResponse()


class AsyncRecordingServicer(pb_grpc.TelemeteryGatewayServiceServicer):
    """Async generator, coroutine, and (with reader_writer) the context.read()/write() API."""

    def __init__(self, recorder: Recorder, fail_ids: Sequence[str] = (), reader_writer: bool = False) -> None:
        self.recorder = recorder
        self.fail_ids = fail_ids
        if reader_writer:
            self.RecordEvents = self._record_events_rw  # type: ignore[method-assign]
            self.PublishInstanceUserMetadata = self._publish_rw  # type: ignore[method-assign]

    async def RecordEvents(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        call = self.recorder.start("RecordEvents", context.invocation_metadata())
        async for request in request_iterator:
            call.messages.append(request)
            if request.WhichOneof("payload") == "events":
                yield answer(request, self.fail_ids)

    async def _record_events_rw(self, request_iterator: Any, context: Any) -> None:
        call = self.recorder.start("RecordEvents", context.invocation_metadata())
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            call.messages.append(request)
            if request.WhichOneof("payload") == "events":
                await context.write(answer(request, self.fail_ids))

    async def RecordEvent(self, request: Any, context: Any) -> Any:  # type: ignore[override]
        self.recorder.start("RecordEvent", context.invocation_metadata()).messages.append(request)
        return pb.RecordEventResponse()

    async def PublishInstanceUserMetadata(self, request_iterator: AsyncIterator[Any], context: Any) -> Any:  # type: ignore[override]
        call = self.recorder.start("PublishInstanceUserMetadata", context.invocation_metadata())
        async for request in request_iterator:
            call.messages.append(request)
        return pb.PublishInstanceUserMetadataResponse()

    async def _publish_rw(self, request_iterator: Any, context: Any) -> Any:
        call = self.recorder.start("PublishInstanceUserMetadata", context.invocation_metadata())
        while (request := await context.read()) is not grpc.aio.EOF:
            call.messages.append(request)
        return pb.PublishInstanceUserMetadataResponse()


# -- a second service ------------------------------------------------------------------


def _echo_handler(recorder: Recorder, aio: bool) -> grpc.GenericRpcHandler:
    """test.Echo with raw-bytes handlers: Echo (unary) and Chat (bidi) return what they get."""

    def echo(request: bytes, context: Any) -> bytes:
        recorder.start("Echo", ()).messages.append(request)
        return request

    def chat(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        call = recorder.start("Chat", ())
        for request in requests:
            call.messages.append(request)
            yield request

    async def aecho(request: bytes, context: Any) -> bytes:
        return echo(request, context)

    async def achat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        call = recorder.start("Chat", ())
        async for request in requests:
            call.messages.append(request)
            yield request

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(aecho if aio else echo),
        "Chat": grpc.stream_stream_rpc_method_handler(achat if aio else chat),
    }
    return grpc.method_handlers_generic_handler("test.Echo", handlers)


# -- servers ---------------------------------------------------------------------------


@dataclass
class Served:
    port: int
    recorder: Recorder

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"


@contextmanager
def serve_sync(
    interceptors: Sequence[grpc.ServerInterceptor] = (), *, fail_ids: Sequence[str] = (), servicer: Any = None
) -> Iterator[Served]:
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=list(interceptors))
    pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(servicer or RecordingServicer(recorder, fail_ids), server)
    server.add_generic_rpc_handlers((_echo_handler(recorder, aio=False),))
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    try:
        yield Served(port, recorder)
    finally:
        server.stop(grace=None)


@asynccontextmanager
async def serve_aio(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    *,
    fail_ids: Sequence[str] = (),
    reader_writer: bool = False,
    servicer: Any = None,
) -> AsyncIterator[Served]:
    recorder = Recorder()
    server = grpc.aio.server(interceptors=list(interceptors))
    pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(
        servicer or AsyncRecordingServicer(recorder, fail_ids, reader_writer), server
    )
    server.add_generic_rpc_handlers((_echo_handler(recorder, aio=True),))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield Served(port, recorder)
    finally:
        await server.stop(grace=None)


# -- calls -----------------------------------------------------------------------------


@dataclass
class Result:
    code: grpc.StatusCode
    details: str
    responses: list[Any]

    @property
    def acked(self) -> list[list[str]]:
        return [list(r.succeeded_events) for r in self.responses]


def _lockstep(requests: Sequence[Any], answered: queue.Queue[Any]) -> Iterator[Any]:
    """As the Sourcegraph exporter does: each payload waits for the response to the previous one."""
    for request in requests:
        yield request
        if isinstance(request, pb.RecordEventsRequest) and request.WhichOneof("payload") == "events":
            answered.get(timeout=TIMEOUT)


def call_sync(
    channel: grpc.Channel, rpc: str, requests: Sequence[Any], metadata: Sequence[tuple[str, str]] = ()
) -> Result:
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    responses: list[Any] = []
    try:
        if rpc == "RecordEvent":
            responses.append(stub.RecordEvent(requests[0], timeout=TIMEOUT, metadata=metadata))
        elif rpc == "RecordEvents":
            answered: queue.Queue[Any] = queue.Queue()
            for response in stub.RecordEvents(_lockstep(requests, answered), timeout=TIMEOUT, metadata=metadata):
                responses.append(response)
                answered.put(response)
        else:
            responses.append(stub.PublishInstanceUserMetadata(iter(requests), timeout=TIMEOUT, metadata=metadata))
    except grpc.RpcError as exc:
        return Result(exc.code(), exc.details() or "", responses)
    return Result(grpc.StatusCode.OK, "", responses)


async def call_aio(
    channel: grpc.aio.Channel, rpc: str, requests: Sequence[Any], metadata: Sequence[tuple[str, str]] = ()
) -> Result:
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    responses: list[Any] = []
    md = grpc.aio.Metadata(*metadata)
    try:
        if rpc == "RecordEvent":
            responses.append(await stub.RecordEvent(requests[0], timeout=TIMEOUT, metadata=md))
        elif rpc == "RecordEvents":
            # The write() API in lockstep, as an exporter would use it.
            call = stub.RecordEvents(timeout=TIMEOUT, metadata=md)
            for request in requests:
                await call.write(request)
                if request.WhichOneof("payload") == "events":
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    responses.append(response)
            await call.done_writing()
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        else:
            responses.append(await stub.PublishInstanceUserMetadata(iter(requests), timeout=TIMEOUT, metadata=md))
    except grpc.aio.AioRpcError as exc:
        return Result(exc.code(), exc.details() or "", responses)
    except asyncio.InvalidStateError:  # a write after the call ended: its status says why
        return Result(await call.code(), await call.details() or "", responses)
    return Result(grpc.StatusCode.OK, "", responses)
