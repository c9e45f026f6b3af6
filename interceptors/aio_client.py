"""The exporter side, grpc.aio: interceptors to pass when the channel is created.

    channel = grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(policy))

grpc.aio channels take interceptors only at creation, and register an object that
implements several interceptor kinds for the first matching kind only, silently. So there
is one object per kind, sharing one Guard:
- AsyncGuardUnaryUnaryInterceptor: RecordEvent;
- AsyncGuardStreamUnaryInterceptor: PublishInstanceUserMetadata;
- AsyncGuardStreamStreamInterceptor: RecordEvents;
- AsyncGuardUnaryStreamInterceptor: refuses a unary-stream call to any of the service's
  methods (none has that shape, so such a call would otherwise leave unexamined).
Every other method passes through untouched.

Requests are filtered before they leave (copies; the caller's messages are not changed).
An events payload goes on as its filtered wire bytes in a message that serializes to them
(guard.wire_carrier), not parsed back: an interceptor after the guard sees that message.
A refused call fails locally with the server side's status and sends nothing. For the two
streaming RPCs the interceptor returns at once a call object that reads and judges the
first message in a task, then starts the real call: the call's write() API works (writes
only reach the interceptor once it has returned). A violation later in the stream cancels
the real call, and the call reports the guard's status. Acknowledgements are merged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterable
from typing import Any, cast

import grpc
import grpc.aio

from telemetry_guard.interceptors.audit import AuditLog
from telemetry_guard.interceptors.credentials import CredentialVerifier
from telemetry_guard.interceptors.errors import GuardError, internal_error
from telemetry_guard.interceptors.guard import Guard, UnaryGuard, authorization_from, client_encoder, rpc_for_method
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy import Engine, Policy
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, RECORD_EVENT, RECORD_EVENTS
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

PolicyLike = Policy | Engine | Guard | None


def aio_client_interceptors(
    policy_or_engine: PolicyLike = None,
    *,
    verifier: CredentialVerifier | None = None,
    audit: AuditLog | None = None,
    allow_unsafe_policy: bool = False,
) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per kind, sharing one guard: pass as grpc.aio.*_channel(interceptors=...)."""
    guard = Guard.build(
        policy_or_engine, verifier=verifier, audit=audit, side="client", allow_unsafe_policy=allow_unsafe_policy
    )
    return [
        AsyncGuardUnaryUnaryInterceptor(guard),
        AsyncGuardUnaryStreamInterceptor(guard),
        AsyncGuardStreamUnaryInterceptor(guard),
        AsyncGuardStreamStreamInterceptor(guard),
    ]


class _AsyncGuardInterceptor:
    def __init__(
        self,
        policy_or_engine: PolicyLike = None,
        *,
        verifier: CredentialVerifier | None = None,
        audit: AuditLog | None = None,
        allow_unsafe_policy: bool = False,
    ) -> None:
        self.guard = Guard.build(
            policy_or_engine, verifier=verifier, audit=audit, side="client", allow_unsafe_policy=allow_unsafe_policy
        )


def _wrong_shape(rpc: str, shape: str) -> grpc.aio.AioRpcError:
    return internal_error(rpc, TypeError(f"{rpc} called as {shape}")).as_aio_rpc_error()


class AsyncGuardUnaryUnaryInterceptor(_AsyncGuardInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    """RecordEvent. An event the policy removes whole is answered locally with success."""

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        rpc = rpc_for_method(client_call_details.method)
        if rpc is None:
            return await continuation(client_call_details, request)
        if rpc != RECORD_EVENT:
            raise _wrong_shape(rpc, "unary-unary")
        call = UnaryGuard(self.guard, rpc, authorization_from(client_call_details.metadata))
        try:
            admitted = call.admit(request)
            await call.verify_async()
            kept = call.filter(admitted)
            if kept is None:  # a response, not a call: grpc wraps it into a finished call
                return b"" if call.raw else pb.RecordEventResponse()
            passed = call.pass_on(client_encoder(call), kept)
        except GuardError as exc:
            raise exc.as_aio_rpc_error() from None
        return await continuation(client_call_details, passed)


class AsyncGuardUnaryStreamInterceptor(_AsyncGuardInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """No RPC of the service is unary-stream: such a call to one of its methods never leaves."""

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        rpc = rpc_for_method(client_call_details.method)
        if rpc is not None:
            raise _wrong_shape(rpc, "unary-stream")
        return await continuation(client_call_details, request)


class AsyncGuardStreamUnaryInterceptor(_AsyncGuardInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    """PublishInstanceUserMetadata."""

    async def intercept_stream_unary(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        rpc = rpc_for_method(client_call_details.method)
        if rpc is None:
            return await continuation(client_call_details, request_iterator)
        if rpc != PUBLISH_USER_METADATA:
            raise _wrong_shape(rpc, "stream-unary")
        return _GuardedStreamUnaryCall(self.guard, rpc, continuation, client_call_details, request_iterator)


class AsyncGuardStreamStreamInterceptor(_AsyncGuardInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """RecordEvents."""

    async def intercept_stream_stream(
        self,
        continuation: Callable[..., Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        rpc = rpc_for_method(client_call_details.method)
        if rpc is None:
            return await continuation(client_call_details, request_iterator)
        if rpc != RECORD_EVENTS:
            raise _wrong_shape(rpc, "stream-stream")
        return _GuardedStreamStreamCall(self.guard, rpc, continuation, client_call_details, request_iterator)


def _aiter(requests: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
    """grpc.aio takes sync and async request iterables alike; an async one is iterated as it is (no layer
    of our own per message: grpc's iterator of the caller's write()s is one already)."""
    if hasattr(requests, "__aiter__"):
        return cast(AsyncIterable[Any], requests).__aiter__()
    return _from_sync(requests)


async def _from_sync(requests: Iterable[Any]) -> AsyncIterator[Any]:
    for request in requests:
        yield request


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _GuardedStreamCall:
    """The call object returned at once; a task judges the first message and starts the real call."""

    def __init__(
        self,
        guard: Guard,
        rpc: str,
        continuation: Callable[..., Awaitable[Any]],
        details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> None:
        self._stream = StreamGuard(guard, rpc, authorization_from(details.metadata))
        self._call: Any = None
        self._task = asyncio.get_running_loop().create_task(self._start(continuation, details, request_iterator))
        self._task.add_done_callback(_retrieve)  # a refusal nobody reads is not "never retrieved"

    async def _start(
        self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails, request_iterator: Any
    ) -> Any:
        stream = self._stream
        requests = _aiter(request_iterator)
        try:
            first = await stream.first_async(requests)
            await stream.verify_async()
        except GuardError as exc:
            raise exc.as_aio_rpc_error() from None
        filtered = stream.rest_async(first, requests, client_encoder(stream), on_refusal=self._stop)
        self._call = await continuation(details, filtered)
        return self._call

    def _stop(self) -> None:
        """A later message was refused: end the real call rather than half-close it."""
        if self._call is not None:
            self._call.cancel()

    async def _started(self) -> Any:
        if self._call is not None:  # started: every read after the first
            return self._call
        return await asyncio.shield(self._task)

    def _refusal(self, exc: BaseException) -> BaseException:
        error = self._stream.error
        return error.as_aio_rpc_error() if error is not None else exc

    # -- RpcContext --------------------------------------------------------------------

    def cancelled(self) -> bool:
        if self._task.cancelled():
            return True
        return self._call is not None and bool(self._call.cancelled())

    def done(self) -> bool:
        if not self._task.done():
            return False
        return self._call is None or bool(self._call.done())

    def time_remaining(self) -> float | None:
        return None if self._call is None else self._call.time_remaining()

    def cancel(self) -> bool:
        if self._call is not None:
            return bool(self._call.cancel())
        return self._task.cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        def started(task: asyncio.Task[Any]) -> None:
            if self._call is None:
                callback(self)
            else:
                self._call.add_done_callback(lambda _: callback(self))

        self._task.add_done_callback(started)

    @property
    def _done_writing_flag(self) -> bool:  # read by grpc.aio's intercepted call before a write()
        return self._call is not None and bool(self._call._done_writing_flag)

    # -- Call --------------------------------------------------------------------------

    async def code(self) -> grpc.StatusCode:
        try:
            call = await self._started()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except asyncio.CancelledError:
            return grpc.StatusCode.CANCELLED
        code: grpc.StatusCode = await call.code()
        return self._stream.error.code if self._stream.error is not None else code

    async def details(self) -> str:
        try:
            call = await self._started()
        except grpc.aio.AioRpcError as exc:
            return exc.details() or ""
        except asyncio.CancelledError:
            return "cancelled"
        details: str = await call.details()
        return self._stream.error.message if self._stream.error is not None else details

    async def debug_error_string(self) -> str:
        try:
            call = await self._started()
        except grpc.aio.AioRpcError as exc:
            return exc.debug_error_string() or ""
        return str(await call.debug_error_string())

    async def initial_metadata(self) -> grpc.aio.Metadata:
        try:
            call = await self._started()
        except grpc.aio.AioRpcError:
            return grpc.aio.Metadata()
        metadata: grpc.aio.Metadata = await call.initial_metadata()
        return metadata

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        try:
            call = await self._started()
        except grpc.aio.AioRpcError:
            return grpc.aio.Metadata()
        metadata: grpc.aio.Metadata = await call.trailing_metadata()
        return metadata

    async def wait_for_connection(self) -> None:
        await (await self._started()).wait_for_connection()

    # -- the write API is served by grpc.aio's intercepted call, never by this object ---

    async def write(self, request: Any) -> None:
        raise grpc.aio.UsageError("write() goes through the intercepted call")

    async def done_writing(self) -> None:
        raise grpc.aio.UsageError("done_writing() goes through the intercepted call")


class _GuardedStreamUnaryCall(_GuardedStreamCall, grpc.aio.StreamUnaryCall[Any, Any]):
    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        call = await self._started()
        try:
            return await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            raise self._refusal(exc) from None


class _GuardedStreamStreamCall(_GuardedStreamCall, grpc.aio.StreamStreamCall[Any, Any]):
    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        while (response := await self.read()) is not grpc.aio.EOF:
            yield response

    async def read(self) -> Any:
        call = await self._started()
        try:
            response = await call.read()
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            raise self._refusal(exc) from None
        if response is grpc.aio.EOF:
            if self._stream.error is not None:
                raise self._stream.error.as_aio_rpc_error()
            return response
        try:
            return self._stream.merge(response)
        except GuardError as exc:
            call.cancel()
            raise exc.as_aio_rpc_error() from None
