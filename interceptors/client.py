"""The exporter side, sync: a channel whose TelemeteryGatewayService calls obey the policy.

    channel = wrap_channel(grpc.insecure_channel(target), load_policy("policy.yaml"))
    stub = TelemeteryGatewayServiceStub(channel)

Requests are filtered before they leave the process (copies: the caller's messages are
never changed). An events payload is judged on its wire bytes and those that may leave are
handed on unparsed, as a message that serializes to them (guard.wire_carrier): an interceptor
placed after the guard sees that message, not a RecordEventsRequest. A refused call fails
locally with the status the server side would give and sends nothing: the stream's first
message is read and judged before the call is started. Acknowledgements are merged as on
the server side. Methods of other services pass through untouched.

- RecordEvent (unary): judged when called; an event the policy removes whole is answered
  locally with success, nothing sent.
- PublishInstanceUserMetadata (stream-unary): the first message is read when the call is
  made (the call blocks until it is available, also for .future()).
- RecordEvents (stream-stream): the first message is read when the response iterator (or
  any method of the call) is first used, so a request iterator fed after the call is made
  works. A violation later in the stream cancels the call; the response iterator then
  raises the guard's status, not CANCELLED.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from telemetry_guard.interceptors.audit import AuditLog
from telemetry_guard.interceptors.credentials import CredentialVerifier
from telemetry_guard.interceptors.errors import GuardError, GuardRpcError, internal_error
from telemetry_guard.interceptors.guard import (
    Guard,
    UnaryGuard,
    authorization_from,
    client_encoder,
    rpc_for_method,
)
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy import Engine, Policy
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, RECORD_EVENT, RECORD_EVENTS
from telemetrygateway.v1 import telemetrygateway_pb2 as pb


def wrap_channel(
    channel: grpc.Channel,
    policy_or_engine: Policy | Engine | Guard | None = None,
    *,
    verifier: CredentialVerifier | None = None,
    audit: AuditLog | None = None,
    allow_unsafe_policy: bool = False,
) -> grpc.Channel:
    """`channel` with the policy enforced on the exporter's side. None: the default policy."""
    return grpc.intercept_channel(
        channel,
        GuardClientInterceptor(
            policy_or_engine, verifier=verifier, audit=audit, allow_unsafe_policy=allow_unsafe_policy
        ),
    )


def _wrong_shape(rpc: str, shape: str) -> GuardRpcError:
    return internal_error(rpc, TypeError(f"{rpc} called as {shape}")).as_rpc_error()


class GuardClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The sync client interceptor behind wrap_channel (grpc.intercept_channel takes one object
    for every kind; the grpc.aio channel does not: see aio_client.py)."""

    def __init__(
        self,
        policy_or_engine: Policy | Engine | Guard | None = None,
        *,
        verifier: CredentialVerifier | None = None,
        audit: AuditLog | None = None,
        allow_unsafe_policy: bool = False,
    ) -> None:
        self.guard = Guard.build(
            policy_or_engine, verifier=verifier, audit=audit, side="client", allow_unsafe_policy=allow_unsafe_policy
        )

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        rpc = rpc_for_method(details.method)
        if rpc is None:
            return continuation(details, request)
        if rpc != RECORD_EVENT:
            raise _wrong_shape(rpc, "unary-unary")
        call = UnaryGuard(self.guard, rpc, authorization_from(details.metadata))
        try:
            admitted = call.admit(request)
            call.verify()
            kept = call.filter(admitted)
            if kept is None:
                return _Answered(b"" if isinstance(request, bytes) else pb.RecordEventResponse())
            passed = call.pass_on(client_encoder(call), kept)
        except GuardError as exc:
            raise exc.as_rpc_error() from None
        return continuation(details, passed)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        rpc = rpc_for_method(details.method)
        if rpc is not None:  # no RPC of the service has this shape: never send it
            raise _wrong_shape(rpc, "unary-stream")
        return continuation(details, request)

    def intercept_stream_unary(
        self, continuation: Any, details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        rpc = rpc_for_method(details.method)
        if rpc is None:
            return continuation(details, request_iterator)
        if rpc != PUBLISH_USER_METADATA:
            raise _wrong_shape(rpc, "stream-unary")
        stream = StreamGuard(self.guard, rpc, authorization_from(details.metadata))
        try:
            first = stream.first(request_iterator)
            stream.verify()
        except GuardError as exc:
            raise exc.as_rpc_error() from None
        # A later violation raises into grpc's request consumer, which cancels the call.
        requests = stream.rest(first, request_iterator, client_encoder(stream))
        return _GuardedCall(stream, lambda: continuation(details, requests))

    def intercept_stream_stream(
        self, continuation: Any, details: grpc.ClientCallDetails, request_iterator: Iterator[Any]
    ) -> Any:
        rpc = rpc_for_method(details.method)
        if rpc is None:
            return continuation(details, request_iterator)
        if rpc != RECORD_EVENTS:
            raise _wrong_shape(rpc, "stream-stream")
        stream = StreamGuard(self.guard, rpc, authorization_from(details.metadata))
        guarded: _GuardedCall

        def start() -> Any:
            first = stream.first(request_iterator)
            stream.verify()
            encode = client_encoder(stream)
            return continuation(details, stream.rest(first, request_iterator, encode, on_refusal=guarded.stop))

        guarded = _GuardedCall(stream, start, lazy=True)
        return guarded


if TYPE_CHECKING:  # generic in the stubs only
    _Future: TypeAlias = grpc.Future[Any]
else:
    _Future = grpc.Future


class _Answered(grpc.Call, _Future):
    """A RecordEvent answered by the guard itself: the event was removed whole, nothing sent."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def result(self, timeout: float | None = None) -> Any:
        return self._response

    def exception(self, timeout: float | None = None) -> None:
        return None

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK

    def details(self) -> str:
        return ""

    def initial_metadata(self) -> tuple[()]:
        return ()

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False


class _GuardedCall(grpc.Call, _Future):
    """A streaming call whose refusals are the guard's.

    start() judges the first message and starts the real call (lazy: on first use). Errors of
    the real call are reported as the guard's refusal when the guard caused them (it cancels
    the call on a violation later in the stream); responses are merged (acknowledgements).
    """

    def __init__(self, stream: StreamGuard, start: Callable[[], Any], *, lazy: bool = False) -> None:
        self._stream = stream
        self._start = start
        self._lock = threading.Lock()
        self._call: Any = None
        self._cancelled = False
        if not lazy:
            self._call = start()

    def _started(self) -> Any:
        """The real call, started on first use; raises the refusal when there is one."""
        with self._lock:
            if self._call is None:
                if self._cancelled:
                    raise GuardError(
                        grpc.StatusCode.CANCELLED, "cancelled", f"{self._stream.rpc}: cancelled before it started"
                    ).as_rpc_error()
                if self._stream.error is not None:
                    raise self._stream.error.as_rpc_error()
                try:
                    self._call = self._start()
                except GuardError as exc:
                    raise exc.as_rpc_error() from None
                if self._cancelled or self._stream.error is not None:  # while it was being started
                    self._call.cancel()
            return self._call

    def stop(self) -> None:
        """The guard refused a later message: end the real call without half-closing it."""
        call = self._call
        if call is not None:
            call.cancel()

    def _refusal(self, exc: Exception) -> Exception:
        error = self._stream.error
        return error.as_rpc_error() if error is not None else exc

    # -- iterator (RecordEvents) -------------------------------------------------------

    def __iter__(self) -> _GuardedCall:
        return self

    def __next__(self) -> Any:
        call = self._call
        if call is None:  # not started yet: once (every later response skips the lock)
            call = self._started()
        try:
            response = next(call)
        except grpc.RpcError as exc:
            raise self._refusal(exc) from None
        try:
            return self._stream.merge(response)
        except GuardError as exc:
            call.cancel()
            raise exc.as_rpc_error() from None

    # -- future (PublishInstanceUserMetadata) ------------------------------------------

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._started().result(timeout)
        except grpc.RpcError as exc:
            raise self._refusal(exc) from None

    def exception(self, timeout: float | None = None) -> Exception | None:
        try:
            found = self._started().exception(timeout)
        except grpc.RpcError as exc:
            return self._refusal(exc)
        return None if found is None else self._refusal(found)

    def traceback(self, timeout: float | None = None) -> Any:
        try:
            return self._started().traceback(timeout)
        except grpc.RpcError:
            return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._started().add_done_callback(lambda _: fn(self))

    def cancel(self) -> bool:
        self._cancelled = True
        call = self._call
        return True if call is None else bool(call.cancel())

    def cancelled(self) -> bool:
        return self._cancelled or (self._call is not None and bool(self._call.cancelled()))

    def running(self) -> bool:
        return self._call is not None and bool(self._call.running())

    def done(self) -> bool:
        return self._cancelled or self._stream.error is not None or (self._call is not None and self._call.done())

    # -- call --------------------------------------------------------------------------

    def code(self) -> grpc.StatusCode:
        try:
            code: grpc.StatusCode = self._started().code()
        except GuardRpcError as exc:
            return exc.code()
        error = self._stream.error
        return error.code if error is not None else code

    def details(self) -> str:
        try:
            details: str = self._started().details()
        except GuardRpcError as exc:
            return exc.details()
        error = self._stream.error
        return error.message if error is not None else details

    def initial_metadata(self) -> Any:
        return self._started().initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._started().trailing_metadata()

    def is_active(self) -> bool:
        return self._call is not None and bool(self._call.is_active())

    def time_remaining(self) -> float:
        return float(self._call.time_remaining() or 0.0) if self._call is not None else 0.0

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return bool(self._started().add_callback(callback))
