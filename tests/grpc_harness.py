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
import atexit
import functools
import queue
import shutil
import tempfile
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

from telemetry_guard.policy import Policy, load_policy
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
        return [list(r.succeeded_events) for r in self.responses if isinstance(r, pb.RecordEventsResponse)]


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
    md = grpc.aio.Metadata(*metadata)
    try:
        if rpc == "RecordEvent":
            return _ok([await stub.RecordEvent(requests[0], timeout=TIMEOUT, metadata=md)])
        if rpc == "PublishInstanceUserMetadata":
            return _ok([await stub.PublishInstanceUserMetadata(iter(requests), timeout=TIMEOUT, metadata=md)])
    except grpc.aio.AioRpcError as exc:
        return Result(exc.code(), exc.details() or "", [])
    # RecordEvents in lockstep, as an exporter sends it: each payload after the previous answer.
    # (The write() API is not used here: grpc.aio reports a write() that races with the end of
    # the call as INTERNAL "Internal error from Core", whatever status the server sent.)
    answered: asyncio.Queue[Any] = asyncio.Queue()

    async def lockstep() -> AsyncIterator[Any]:
        for request in requests:
            yield request
            if request.WhichOneof("payload") == "events":
                await asyncio.wait_for(answered.get(), TIMEOUT)

    call = stub.RecordEvents(lockstep(), timeout=TIMEOUT, metadata=md)
    responses: list[Any] = []
    try:
        async for response in call:
            responses.append(response)
            answered.put_nowait(response)
    except grpc.aio.AioRpcError as exc:
        return Result(exc.code(), exc.details() or "", responses)
    return _ok(responses)


def _ok(responses: list[Any]) -> Result:
    return Result(grpc.StatusCode.OK, "", responses)


# -- the guard on either side of a real call --------------------------------------------


@functools.cache
@functools.cache
def _policy_dir() -> Path:
    """Where load_test_policy writes: kept for the session, as the interceptors lint the policy's files."""
    path = Path(tempfile.mkdtemp(prefix="telemetry-guard-test-policy-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def load_test_policy() -> Policy:
    return test_policy(_policy_dir())


@dataclass
class Call:
    rpc: str
    requests: Sequence[Any]
    metadata: Sequence[tuple[str, str]] = ()


def sync_calls(target: str, calls: Sequence[Call]) -> list[Result]:
    with grpc.insecure_channel(target) as channel:
        return [call_sync(channel, c.rpc, c.requests, c.metadata) for c in calls]


def exercise(
    stack: str,
    side: str,
    calls: Sequence[Call],
    *,
    policy: Any = None,
    verifier: Any = None,
    fail_ids: Sequence[str] = ("fail-me",),
    client: str | None = None,
) -> tuple[list[Result], Recorder]:
    """Each call on one server of `stack`, with the guard on the server or on the client channel.

    client: the stack of the client ("sync" or "aio"). By default the server's, except for an
    aio server that refuses: a grpc.aio client writing while the server ends the call may
    report INTERNAL "Internal error from Core" instead of the server's status (grpc/grpc#36066),
    so the aio server is called by a sync client (in a thread) unless asked otherwise.
    """
    from telemetry_guard.interceptors import (
        AsyncGuardServerInterceptor,
        GuardServerInterceptor,
        aio_client_interceptors,
        wrap_channel,
    )

    policy = load_test_policy() if policy is None else policy
    client = client or ("sync" if side == "server" else stack)
    if stack == "sync":
        server_side = [GuardServerInterceptor(policy, verifier=verifier)] if side == "server" else []
        with serve_sync(server_side, fail_ids=fail_ids) as served, grpc.insecure_channel(served.target) as channel:
            guarded = wrap_channel(channel, policy, verifier=verifier) if side == "client" else channel
            return [call_sync(guarded, c.rpc, c.requests, c.metadata) for c in calls], served.recorder

    async def run() -> tuple[list[Result], Recorder]:
        aio_side = [AsyncGuardServerInterceptor(policy, verifier=verifier)] if side == "server" else []
        client_side = aio_client_interceptors(policy, verifier=verifier) if side == "client" else None
        async with (
            serve_aio(aio_side, fail_ids=fail_ids) as served,
            grpc.aio.insecure_channel(served.target, interceptors=client_side) as channel,
        ):
            if client == "sync":
                return await asyncio.to_thread(sync_calls, served.target, calls), served.recorder
            return [await call_aio(channel, c.rpc, c.requests, c.metadata) for c in calls], served.recorder

    return asyncio.run(run())


# -- the table: for each RPC and identifier kind, what the servicer gets and the client sees --

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
UNSUPPORTED = "unsupported identifier type"  # the gateway's own message for UNIMPLEMENTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def kept_event(event_id: str) -> pb.Event:
    """sensitive_event after the test policy: marketing and non-allowlisted keys gone."""
    return event(event_id, private={"languageId": "go"})


def kept_users() -> pb.PublishInstanceUserMetadataRequest:
    users = [pb.InstanceUserMetadata(id=7, assigned_rbac_roles=["admin"])]
    return pb.PublishInstanceUserMetadataRequest(
        user_metadata=pb.PublishInstanceUserMetadataRequest.UserMetadataPayload(users=users)
    )


@dataclass
class Case:
    """One call and everything expected of it, whichever side the guard is on.

    received: the messages the servicer must get (None: the servicer is never called).
    partial: a refusal later in the stream; a client-side guard cancels its call, so the
    server may have seen only a prefix of `received` by then.
    """

    name: str
    call: Call
    code: grpc.StatusCode
    details: Sequence[str] = ()
    received: Sequence[Any] | None = None
    acked: Sequence[Sequence[str]] = ()
    partial: bool = False
    exact: bool = False  # details is the whole message (the gateway's own words)


def _auth(kind: str) -> Sequence[tuple[str, str]]:
    return BEARER if kind in ("managed_service", "workspace") else ()


def _record_events_ok(kind: str) -> Case:
    requests = [
        pb.RecordEventsRequest(),  # no payload: skipped
        metadata_request(kind),
        events_request(sensitive_event("a"), dropped_event("b"), event("fail-me")),
        events_request(dropped_event("d")),  # all removed: forwarded empty, still answered
    ]
    received = [metadata_request(kind), events_request(kept_event("a"), event("fail-me")), events_request()]
    return Case(
        f"RecordEvents-{kind}",
        Call("RecordEvents", requests, _auth(kind)),
        OK,
        received=received,
        acked=[["a", "b"], ["d"]],
    )


def _record_event_ok(kind: str) -> Case:
    return Case(
        f"RecordEvent-{kind}",
        Call("RecordEvent", [record_event_request(kind, sensitive_event("u1"))], BEARER),
        OK,
        received=[record_event_request(kind, kept_event("u1"))],
    )


def _publish_ok(kind: str) -> Case:
    return Case(
        f"Publish-{kind}",
        Call("PublishInstanceUserMetadata", [publish_metadata_request(kind), users_request()]),
        OK,
        received=[publish_metadata_request(kind), kept_users()],
    )


def _refused(name: str, call: Call, code: grpc.StatusCode, *details: str) -> Case:
    return Case(name, call, code, details=(call.rpc, *details))


def _unsupported(name: str, call: Call) -> Case:
    """The gateway's own refusal, its code and exact message: what exporters already handle."""
    return Case(name, call, UNIMPLEMENTED, details=(UNSUPPORTED,), exact=True)


CASES: list[Case] = [
    *(_record_events_ok(kind) for kind in KINDS),
    _record_event_ok("managed_service"),
    *(_publish_ok(kind) for kind in ("licensed_instance", "unlicensed_instance")),
    # identifier kind the gateway does not serve for the RPC (whatever the policy lists: it has workspace)
    *(
        _unsupported(f"RecordEvent-{kind}-unsupported", Call("RecordEvent", [record_event_request(kind, event("u2"))]))
        for kind in ("licensed_instance", "unlicensed_instance")
    ),
    _unsupported(
        "RecordEvent-workspace-unsupported",
        Call("RecordEvent", [record_event_request("workspace", event("u3"))], BEARER),
    ),
    *(
        _unsupported(
            f"Publish-{kind}-unsupported",
            Call("PublishInstanceUserMetadata", [publish_metadata_request(kind), users_request()], BEARER),
        )
        for kind in ("managed_service", "workspace")
    ),
    # no identifier / an incomplete one
    _unsupported(
        "RecordEvents-no-identifier", Call("RecordEvents", [metadata_request("none"), events_request(event("n1"))])
    ),
    _refused(
        "RecordEvents-incomplete-identifier",
        Call("RecordEvents", [metadata_request("licensed_instance", complete=False), events_request(event("n2"))]),
        INVALID,
        "license_key",
    ),
    _unsupported("RecordEvent-no-identifier", Call("RecordEvent", [record_event_request("none", event("n3"))])),
    _unsupported(
        "Publish-no-identifier",
        Call("PublishInstanceUserMetadata", [publish_metadata_request("none"), users_request()]),
    ),
    Case(
        "RecordEvent-no-event",
        Call("RecordEvent", [record_event_request("managed_service", None)], BEARER),
        INVALID,
        details=("event is required",),
        exact=True,
    ),
    # credentials required but absent (or not a bearer token)
    _refused(
        "RecordEvents-no-token",
        Call("RecordEvents", [metadata_request("managed_service"), events_request(event("t1"))]),
        UNAUTHENTICATED,
        "credentials.required_for",
    ),
    _refused(
        "RecordEvent-basic-auth",
        Call(
            "RecordEvent",
            [record_event_request("managed_service", event("t2"))],
            (("authorization", "Basic dXNlcjpwYXNz"),),
        ),
        UNAUTHENTICATED,
        "credentials.required_for",
    ),
    # the stream protocol
    _refused(
        "RecordEvents-events-first",
        Call("RecordEvents", [events_request(event("p1")), metadata_request("licensed_instance")]),
        INVALID,
        "metadata not yet received",
    ),
    _refused("RecordEvents-empty-stream", Call("RecordEvents", []), INVALID, "metadata"),
    _refused(
        "Publish-users-first",
        Call("PublishInstanceUserMetadata", [users_request(), publish_metadata_request("licensed_instance")]),
        INVALID,
        "metadata not yet received",
    ),
    Case(
        "RecordEvents-metadata-twice",
        Call(
            "RecordEvents",
            [
                metadata_request("unlicensed_instance"),
                events_request(event("m1")),
                metadata_request("unlicensed_instance", "req-2"),
                events_request(event("m2")),
            ],
        ),
        INVALID,
        details=("RecordEvents", "metadata more than once"),
        received=[metadata_request("unlicensed_instance"), events_request(event("m1"))],
        acked=[["m1"]],
        partial=True,
    ),
    Case(
        "Publish-metadata-twice",
        Call(
            "PublishInstanceUserMetadata",
            [
                publish_metadata_request("licensed_instance"),
                users_request(),
                publish_metadata_request("licensed_instance"),
            ],
        ),
        INVALID,
        details=("PublishInstanceUserMetadata", "metadata more than once"),
        received=[publish_metadata_request("licensed_instance"), kept_users()],
        partial=True,
    ),
    # an event removed whole: answered with success, nothing reaches the servicer
    Case(
        "RecordEvent-removed-whole",
        Call("RecordEvent", [record_event_request("managed_service", dropped_event("w1"))], BEARER),
        OK,
    ),
]


def check_case(case: Case, side: str, result: Result, recorder: Recorder) -> None:
    """What the client got back and what the servicer received, as the case says."""
    assert result.code == case.code, (case.name, result)
    if case.exact:
        assert (result.details,) == tuple(case.details), (case.name, result.details)
    for part in case.details:
        assert part in result.details, (case.name, part, result.details)
    assert result.acked[: len(case.acked)] == [list(a) for a in case.acked], (case.name, result.acked)
    if case.code == OK and case.call.rpc == "RecordEvents":
        assert len(result.responses) == len(case.acked), "one response per payload"
    own = [c for c in recorder.calls if c.rpc == case.call.rpc]
    if case.received is None:
        assert own == [], f"{case.name}: the servicer was called"
        return
    if case.partial and side == "client":  # cancelled by the client: the server may have seen less
        assert len(own) <= 1, case.name
        got = own[0].messages if own else []
        assert got == list(case.received)[: len(got)], case.name
        return
    assert len(own) == 1, case.name
    assert own[0].messages == list(case.received), case.name
