"""The interceptor for `grpc.server`: the policy applied before the servicer sees a message.

    server = grpc.server(executor, interceptors=[GuardServerInterceptor(load_policy("policy.yaml"))])

gRPC's server interceptors see only the method name and metadata, so for the three
TelemeteryGatewayService methods the interceptor returns a new handler of the same shape
that wraps the servicer's behaviour and its request iterator, keeping its serializers; the
handlers of every other method are returned untouched. The guarded handler is made once per
servicer handler (guard.GuardedHandlers), not per call: a call reads its credentials from its
own context.

Refusals are raised with context.abort() from the handler itself: the first message is read
by the handler before the servicer is called, and a later violation, raised into the
servicer from the request iterator, is turned into the right status once the servicer
returns or raises (an abort raised inside a request iterator that someone else consumes
reaches the client as UNKNOWN).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

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


class GuardServerInterceptor(grpc.ServerInterceptor):
    """Enforces a policy on a sync server. None: the default policy."""

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

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Handler | None], details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = continuation(details)
        rpc = rpc_for_method(details.method)
        if handler is None or rpc is None:
            return handler
        return self._handlers.get(rpc, handler)

    def _wrap(self, rpc: str, handler: Handler) -> Handler:
        try:
            return _WRAP[rpc](self.guard, rpc, handler)
        except Exception as exc:  # fail closed: a handler that refuses, never the servicer's
            return _refusing(handler, internal_error(rpc, exc))


def _record_event(guard: Guard, rpc: str, handler: Handler) -> Handler:
    behavior = handler.unary_unary
    if behavior is None:
        raise TypeError(f"{rpc} handler is not unary-unary")
    encode = server_encoder(rpc, handler.request_deserializer)

    def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
        call = UnaryGuard(guard, rpc, authorization_from(context.invocation_metadata()))
        try:
            request = call.admit(raw)
            call.verify(context.is_active)
            kept = call.filter(request)
            if kept is None:
                return removed_event_response(handler.response_serializer)
            passed = call.pass_on(encode, kept)
        except GuardError as exc:
            context.abort(exc.code, exc.message)
        return behavior(passed, context)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary, request_deserializer=None, response_serializer=handler.response_serializer
    )


def _record_events(guard: Guard, rpc: str, handler: Handler) -> Handler:
    behavior = handler.stream_stream
    if behavior is None:
        raise TypeError(f"{rpc} handler is not stream-stream")
    encode = server_encoder(rpc, handler.request_deserializer)

    def stream_stream(raw: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        stream = StreamGuard(guard, rpc, authorization_from(context.invocation_metadata()))
        try:
            first = stream.first(raw)
            stream.verify(context.is_active)
        except GuardError as exc:
            context.abort(exc.code, exc.message)
        try:
            for response in behavior(stream.rest(first, raw, encode), context):
                yield stream.merge(response)
        except Exception:
            if stream.error is None:
                raise
        if stream.error is not None:
            context.abort(stream.error.code, stream.error.message)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, request_deserializer=None, response_serializer=handler.response_serializer
    )


def _publish_user_metadata(guard: Guard, rpc: str, handler: Handler) -> Handler:
    behavior = handler.stream_unary
    if behavior is None:
        raise TypeError(f"{rpc} handler is not stream-unary")
    encode = server_encoder(rpc, handler.request_deserializer)

    def stream_unary(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        stream = StreamGuard(guard, rpc, authorization_from(context.invocation_metadata()))
        try:
            first = stream.first(raw)
            stream.verify(context.is_active)
        except GuardError as exc:
            context.abort(exc.code, exc.message)
        response = None
        try:
            response = behavior(stream.rest(first, raw, encode), context)
        except Exception:
            if stream.error is None:
                raise
        if stream.error is not None:
            context.abort(stream.error.code, stream.error.message)
        return response

    return grpc.stream_unary_rpc_method_handler(
        stream_unary, request_deserializer=None, response_serializer=handler.response_serializer
    )


_WRAP: dict[str, Callable[[Guard, str, Handler], Handler]] = {
    RECORD_EVENT: _record_event,
    RECORD_EVENTS: _record_events,
    PUBLISH_USER_METADATA: _publish_user_metadata,
}


def _refusing(handler: Handler, error: GuardError) -> Handler:
    """A handler of the same shape that refuses every call with `error`."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(error.code, error.message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
