"""The interceptor for `grpc.aio.server`: the same enforcement as server.py, for asyncio.

    server = grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(load_policy("policy.yaml"))])

An aio servicer method comes in three forms, and each is handled explicitly:
- an async generator (yields responses): iterated, each response merged and written;
- a coroutine that returns a response (unary and client-stream RPCs): awaited;
- a coroutine that uses context.read() / context.write() and returns None: such a handler
  would read the call directly, past a wrapped request iterator, so the servicer gets a
  context whose read() serves the filtered stream and whose write() merges acknowledgements.
A plain (sync) function or generator for a streaming RPC is refused with INTERNAL.

The wrapper of a streaming RPC is itself a coroutine writing through context.write(), so
that responses of both the yield and the write style go out the same way, in order. As on the
sync server, the guarded handler is made once per servicer handler (guard.GuardedHandlers).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from telemetry_guard.interceptors.audit import AuditLog
from telemetry_guard.interceptors.credentials import CredentialVerifier
from telemetry_guard.interceptors.errors import GuardError, internal_error
from telemetry_guard.interceptors.guard import (
    Guard,
    GuardedHandlers,
    UnaryGuard,
    authorization_from,
    removed_event_response,
    rpc_for_method,
    server_encoder,
)
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy import Engine, Policy
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, RECORD_EVENT, RECORD_EVENTS

if TYPE_CHECKING:  # generic in the stubs only
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AsyncGuardServerInterceptor(grpc.aio.ServerInterceptor):
    """Enforces a policy on a grpc.aio server. None: the default policy."""

    def __init__(
        self,
        policy_or_engine: Policy | Engine | Guard | None = None,
        *,
        verifier: CredentialVerifier | None = None,
        audit: AuditLog | None = None,
        allow_unsafe_policy: bool = False,
    ) -> None:
        self.guard = Guard.build(
            policy_or_engine, verifier=verifier, audit=audit, side="server", allow_unsafe_policy=allow_unsafe_policy
        )
        self._handlers: GuardedHandlers[Handler] = GuardedHandlers(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler: Handler | None = await continuation(details)
        rpc = rpc_for_method(details.method)
        if handler is None or rpc is None:
            return handler
        return self._handlers.get(rpc, handler)

    def _wrap(self, rpc: str, handler: Handler) -> Handler:
        try:
            return _WRAP[rpc](self.guard, rpc, handler)
        except Exception as exc:  # fail closed: a handler that refuses, never the servicer's
            return _refusing(handler, internal_error(rpc, exc))


class _GuardedContext:
    """The servicer's context, with read() and write() going through the guard."""

    def __init__(self, context: Context, requests: AsyncIterator[Any], stream: StreamGuard) -> None:
        self._context = context
        self._requests = requests
        self._stream = stream

    async def read(self) -> Any:
        try:
            return await anext(self._requests)
        except StopAsyncIteration:
            return grpc.aio.EOF

    async def write(self, message: Any) -> None:
        await self._context.write(self._stream.merge(message))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _run_stream(
    stream: StreamGuard, behavior: Callable[..., Any], requests: AsyncIterator[Any], context: Context
) -> Any:
    """Call a streaming-request servicer method in whichever of its forms; its response, if unary."""
    guarded = _GuardedContext(context, requests, stream)
    result = behavior(requests, guarded)
    if hasattr(result, "__aiter__"):  # async generator: responses yielded
        async for response in result:
            await context.write(stream.merge(response))
        return None
    if inspect.isawaitable(result):  # coroutine: a response, or None after context.write()s
        return await result
    # A sync handler would iterate an async iterator: refused before it runs.
    raise stream.refuse(internal_error(stream.rpc, TypeError("sync handler on an aio server")))


def _record_event(guard: Guard, rpc: str, handler: Handler) -> Handler:
    behavior: Callable[..., Any] | None = handler.unary_unary
    if behavior is None:
        raise TypeError(f"{rpc} handler is not unary-unary")
    encode = server_encoder(rpc, handler.request_deserializer)

    async def unary_unary(raw: bytes, context: Context) -> Any:
        call = UnaryGuard(guard, rpc, authorization_from(context.invocation_metadata()))
        try:
            request = call.admit(raw)
            await call.verify_async()
            kept = call.filter(request)
            if kept is None:
                return removed_event_response(handler.response_serializer)
            passed = call.pass_on(encode, kept)
        except GuardError as exc:
            await context.abort(exc.code, exc.message)
        result = behavior(passed, context)
        return await result if inspect.isawaitable(result) else result

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
    )


def _streaming(guard: Guard, rpc: str, handler: Handler) -> Handler:
    """RecordEvents (stream-stream) and PublishInstanceUserMetadata (stream-unary)."""
    behavior: Callable[..., Any] | None = handler.stream_stream if rpc == RECORD_EVENTS else handler.stream_unary
    if behavior is None:
        raise TypeError(f"{rpc} handler has the wrong shape")
    encode = server_encoder(rpc, handler.request_deserializer)

    async def streaming(raw: AsyncIterator[bytes], context: Context) -> Any:
        stream = StreamGuard(guard, rpc, authorization_from(context.invocation_metadata()))
        try:
            first = await stream.first_async(raw)
            await stream.verify_async()
        except GuardError as exc:
            await context.abort(exc.code, exc.message)
        response = None
        try:
            response = await _run_stream(stream, behavior, stream.rest_async(first, raw, encode), context)
        except (Exception, asyncio.CancelledError):  # a proxy's upstream call, cancelled by the refusal
            if stream.error is None:
                raise
        if stream.error is not None:
            await context.abort(stream.error.code, stream.error.message)
        return response

    if rpc == RECORD_EVENTS:
        return grpc.stream_stream_rpc_method_handler(
            streaming, request_deserializer=None, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        streaming, request_deserializer=None, response_serializer=handler.response_serializer
    )


_WRAP: dict[str, Callable[[Guard, str, Handler], Handler]] = {
    RECORD_EVENT: _record_event,
    RECORD_EVENTS: _streaming,
    PUBLISH_USER_METADATA: _streaming,
}


def _refusing(handler: Handler, error: GuardError) -> Handler:
    """A handler of the same shape that refuses every call with `error`."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(error.code, error.message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
