"""Forwarding the three RPCs upstream, with the policy applied on the way.

The sidecar's handlers take and give raw bytes (no deserializer): a request is parsed by the
guard, never by grpc, so a request that does not parse is refused by the guard
(INVALID_ARGUMENT naming the rule) instead of being answered INTERNAL by grpc. Enforcement
composes interceptors/: StreamGuard (the stream protocol: metadata first and only once; the
identifier admitted once; each events payload judged on its wire bytes under the admitted kind by
a judge made once per stream, Engine.admitted_payloads; refusals audited), UnaryGuard, the
credential verifier, the audit log and the acknowledgement ledger, as the four interceptors do.

One client RecordEvents stream = one upstream stream:

    client --requests--> [pump task: filter, write upstream]      --> upstream
    client <--responses-- [handler: read upstream, merge acks]   <-- upstream

Backpressure: each direction moves one message at a time (each write is awaited before the
next read), and at most `window` events payloads may be unanswered upstream before the pump
stops reading from the client; HTTP/2 flow control then holds the client. Nothing is buffered
without bound.

Acknowledgements: an upstream response goes back unchanged, except that the ids of the events
the policy removed whole from the payload it answers are added (interceptors/acks.py). An id
the upstream did not acknowledge is never added.

Audit and metrics: a message's audit line is written before it is forwarded (a forwarded payload
always has its record first), by the call's one encoder of decision records (a template of its
constant fields, interceptors.audit.DecisionLines); its counters
(requests, events, removals per rule, refusals, messages sent) go to the call's tally
(sidecar.metrics.StreamTally: kept in the call, published at least every half second and when
the call ends), and so does a payload's round trip, once the response is on its way to the
client: off the round trip's critical path.

Errors, in order of precedence: a refusal by the guard (its status, the call upstream
cancelled: nothing more is forwarded); an upstream error (its code and details, unchanged;
an unreachable upstream is UNAVAILABLE); anything else: INTERNAL, naming only the type.
Deadlines, cancellation and the `authorization` metadata pass through, and so does the W3C
trace context (`traceparent`, `tracestate`), so that the gateway's spans join the exporter's
trace; with tracing on (sidecar/tracing.py) the sidecar's own span takes the exporter's place as
their parent. gRPC's binary `grpc-trace-bin` is in the set too, but grpcio's core keeps it from
the handlers: it passes only where the runtime hands it over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from telemetry_guard.interceptors.errors import GuardError, internal_error
from telemetry_guard.interceptors.guard import (
    Guard,
    Passed,
    UnaryGuard,
    authorization_from,
    removed_event_response,
    serialize,
)
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, RECORD_EVENT, RECORD_EVENTS
from telemetry_guard.policy.kinds import SERVICE, method_path
from telemetry_guard.sidecar.logs import fields
from telemetry_guard.sidecar.metrics import Metrics

if TYPE_CHECKING:
    from telemetry_guard.sidecar.shadow import Shadow, ShadowCall

    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Metadata: TypeAlias = tuple[tuple[str, str | bytes], ...]

LOG = logging.getLogger("telemetry_guard.sidecar.forward")

TRACE_CONTEXT_METADATA = ("traceparent", "tracestate", "grpc-trace-bin")
DEFAULT_FORWARD_METADATA = ("authorization", *TRACE_CONTEXT_METADATA)
DEFAULT_WINDOW = 64  # events payloads per stream sent upstream and not yet answered
END_SETTLE_SECONDS = 0.01
NO_DEADLINE = 10.0**9  # seconds; beyond this a client's deadline is "none"


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done callback: a pump's outcome is read through its call, never left unretrieved."""
    if not task.cancelled():
        task.exception()


async def _settle() -> None:
    """Before passing a client's end of stream upstream: wait a moment for a cancellation.

    The request iterator of a grpc.aio handler ends the same way when the client half-closes and
    when it cancels; in the second case grpc cancels the handler (and with it the pump) right
    after. Waiting that moment makes a cancellation reach the upstream as a cancellation, not as
    a clean end of stream (which would let the upstream finish the call as complete).
    """
    await asyncio.sleep(END_SETTLE_SECONDS)


def _sender(call: Any) -> Callable[[bytes], Awaitable[bool]]:
    """How to write messages on an upstream stream call: send(data) is False when the call has ended (its
    status says how). Resolved once per call.

    Not call.write(): when the upstream ends the call while a write is on its way, grpc.aio's write
    sets the call's status to INTERNAL "Internal error from Core", over the status the upstream sent
    or before it arrives, so that the client would get INTERNAL instead of, say, UNAVAILABLE (which
    exporters retry; grpc/grpc#36066). This is call.write() through grpc's cython call, with core's
    refusal of the write taken for what it is: the call is over, and the upstream's status stands.
    Where grpc has not that shape, call.write() as it is. The call's metadata goes out before its first
    message (call.wait_for_connection(), which raises the status if the call ended meanwhile): once is
    enough, as grpc.aio's own write waits for it only until it is out.
    """
    core = getattr(call, "_cython_call", None)
    core_send = getattr(core, "send_serialized_message", None)
    done = getattr(core, "done", None)  # what call.done() asks, without its frame
    if core_send is None or done is None or _CoreRefused is None:

        async def write(data: bytes) -> bool:
            if call.done():
                return False
            await call.write(data)
            return True

        return write
    connected = False

    async def send(data: bytes) -> bool:
        nonlocal connected
        if done():
            return False
        if not connected:
            await call.wait_for_connection()
            connected = True
        try:
            await core_send(data)
        except _CoreRefused:
            return False
        except asyncio.CancelledError:
            if not call.cancelled():
                call.cancel()
            raise
        return True

    return send


def _receiver(call: Any) -> Callable[[], Awaitable[Any]]:
    """How to read responses on an upstream stream call: read() gives a message, or grpc.aio.EOF once the messages
    ended and the call's status arrived (the handler reads it, as after any end). Resolved once per call.

    The first read is call.read() itself (it waits for the call to be set up and fixes its style of use); the
    later ones are what call.read() does then, through grpc's cython call, without its three frames per message:
    a call already done goes to call.read() (which raises its status when it is not OK), a cancellation cancels the
    call as call.read() does. Where grpc has not that shape, call.read() as it is.
    """
    core = getattr(call, "_cython_call", None)
    receive = getattr(core, "receive_serialized_message", None)
    done = getattr(core, "done", None)
    if receive is None or done is None:
        return call.read  # type: ignore[no-any-return]
    started = False

    async def read() -> Any:
        nonlocal started
        if not started or done():
            started = True
            return await call.read()
        try:
            response = await receive()  # bytes (no deserializer), or EOF
        except asyncio.CancelledError:
            if not call.cancelled():
                call.cancel()
            raise
        if response is grpc.aio.EOF:
            await call.code()  # the messages ended: the call's status arrives, as call.read() waits for it
        return response

    return read


async def _close(call: Any) -> None:
    """call.done_writing(); core refusing it means the call is over (see _sender)."""
    try:
        await call.done_writing()
    except Exception as exc:
        if _CoreRefused is None or not isinstance(exc, _CoreRefused):
            raise


_CoreRefused: type[Exception] | None = getattr(
    getattr(getattr(grpc, "_cython", None), "cygrpc", None), "InternalError", None
)


def _cancelled_from_outside() -> bool:
    """Is this task being cancelled (client gone, shutdown)? Else a CancelledError came from a call
    we cancelled ourselves: grpc.aio raises CancelledError, not an AioRpcError, on reading it."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Payloads:
    """Events payloads sent upstream and not yet answered: the window, and their send times.

    One writer (the pump) and one reader (the handler), on one event loop: a count, and a future only
    while the pump waits for room.
    """

    __slots__ = ("_free", "_room", "_sent")

    def __init__(self, window: int) -> None:
        self._free = window
        self._sent: deque[float] = deque()
        self._room: asyncio.Future[None] | None = None

    async def room(self) -> None:
        """Until the window has room (awaited only when it is full)."""
        while self._free <= 0:
            self._room = asyncio.get_running_loop().create_future()
            await self._room

    def sending(self) -> bool:
        """Count a payload as sent now, if the window has room; False when it is full (await room(), then again)."""
        if self._free <= 0:
            return False
        self._free -= 1
        self._sent.append(time.perf_counter())
        return True

    def answered(self) -> float | None:
        """Seconds since the oldest unanswered payload was sent (None: no payload was waiting)."""
        if not self._sent:
            return None
        self._free += 1
        room = self._room
        if room is not None:
            self._room = None
            if not room.done():
                room.set_result(None)
        return time.perf_counter() - self._sent.popleft()


class Forwarder:
    """The sidecar's TelemeteryGatewayService: enforce, then forward to `channel`.

    guards: returns the guard in force (called once per call: a call keeps the policy it
    started with). forward_metadata: invocation metadata keys passed upstream. trace_context: with
    tracing on, puts the sidecar's span in the exporter's place (sidecar.tracing.Tracing.outgoing).
    shadow: a candidate policy that judges every message too, after the policy in force, and
    changes nothing (shadow.py).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        guards: Callable[[], Guard],
        metrics: Metrics,
        *,
        forward_metadata: Collection[str] = DEFAULT_FORWARD_METADATA,
        window: int = DEFAULT_WINDOW,
        trace_context: Callable[[Metadata, Collection[str]], Metadata] | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._guards = guards
        self.metrics = metrics
        self._forward = frozenset(key.lower() for key in forward_metadata)
        self._window = window
        self._trace_context = trace_context
        self._shadow = shadow
        # Raw bytes both ways: no serializers.
        self._record_events: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            method_path(RECORD_EVENTS)
        )
        self._record_event: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method_path(RECORD_EVENT)
        )
        self._publish: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
            method_path(PUBLISH_USER_METADATA)
        )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                RECORD_EVENTS: grpc.stream_stream_rpc_method_handler(self.record_events),
                RECORD_EVENT: grpc.unary_unary_rpc_method_handler(self.record_event),
                PUBLISH_USER_METADATA: grpc.stream_unary_rpc_method_handler(self.publish_instance_user_metadata),
            },
        )

    # -- call plumbing ------------------------------------------------------------------

    def _outgoing(self, metadata: Any) -> Metadata:
        out = tuple((item[0], item[1]) for item in metadata or () if item[0].lower() in self._forward)
        return out if self._trace_context is None else self._trace_context(out, self._forward)

    @staticmethod
    def _timeout(context: Context) -> float | None:
        """The client's deadline, for the upstream call (grpc.aio reports 'none' as ~2**63 seconds)."""
        remaining: float | None = context.time_remaining()
        return None if remaining is None or remaining > NO_DEADLINE else remaining

    def _upstream_failed(self, rpc: str, code: grpc.StatusCode) -> None:
        self.metrics.child(self.metrics.upstream_errors, rpc, code.name).inc()
        LOG.warning("upstream call failed", extra=fields(rpc=rpc, code=code.name))

    def _shadow_call(self, rpc: str, guard: Guard) -> ShadowCall | None:
        return None if self._shadow is None else self._shadow.start(rpc, guard)

    # -- RecordEvents -------------------------------------------------------------------

    async def record_events(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        metadata = context.invocation_metadata()
        stream = StreamGuard(self._guards(), RECORD_EVENTS, authorization_from(metadata))
        shadow = self._shadow_call(RECORD_EVENTS, stream.guard)
        active = self.metrics.child(self.metrics.streams, RECORD_EVENTS)
        active.inc()
        try:
            try:
                first = await stream.first_async(requests)
                await stream.verify_async()
            except GuardError as exc:
                await context.abort(exc.code, exc.message)
            finally:
                if shadow is not None:
                    shadow.admitted(stream)
            call = self._record_events(metadata=self._outgoing(metadata), timeout=self._timeout(context))
            payloads = _Payloads(self._window)
            read = _receiver(call)
            pump = asyncio.create_task(self._pump_events(stream, first, requests, call, payloads, shadow))
            pump.add_done_callback(_retrieve)
            tally = stream.tally
            failure: grpc.aio.AioRpcError | None = None
            waited: float | None = None  # measured, observed once the response is on its way to the client
            try:
                while True:
                    try:
                        response = await read()
                    except grpc.aio.AioRpcError as exc:
                        failure = exc
                        break
                    except asyncio.CancelledError:
                        if _cancelled_from_outside():
                            raise
                        break  # the pump cancelled the upstream call: stream.error says why
                    if response is grpc.aio.EOF:
                        break
                    waited = payloads.answered()
                    try:
                        merged = stream.merge(response)
                    except GuardError:
                        break  # an answer that cannot be merged (refused, audited): stream.error ends the call
                    yield merged
                    if waited is not None:
                        tally.answered(waited)
                        waited = None
            finally:  # upstream ended (or we are cancelled): nothing more can be forwarded
                if waited is not None:
                    tally.answered(waited)
                if not pump.done():
                    pump.cancel()
                if not call.done():
                    call.cancel()
            await self._finish(stream, call=call, pump=pump, failure=failure, context=context)
        finally:
            active.dec()
            stream.tally.flush()  # what was counted before the pump started, or if it never did

    async def _pump_events(
        self,
        stream: StreamGuard,
        first: Passed,
        requests: AsyncIterator[bytes],
        call: Any,
        payloads: _Payloads,
        shadow: ShadowCall | None = None,
    ) -> None:
        """Client -> upstream, one message at a time.

        A payload's decision is counted once the payload is written (or on any other way out of that
        step): the upstream is already at work meanwhile. Its audit line was written before. The
        stream's counters are published when it ends, however it ends. The shadow judges a payload
        after it is written.
        """
        tally = stream.tally
        send = _sender(call)
        try:
            if not await send(stream.pass_on(serialize, first)):
                return  # the upstream ended the call: its status is read by the handler
            tally.sent()
            async for raw in requests:
                passed = stream.accept(raw)
                if passed is None:
                    continue
                # An events payload comes back as the bytes that may leave, judged once the stream was verified.
                out = passed if type(passed) is bytes else stream.pass_on(serialize, passed)
                if not payloads.sending():
                    await payloads.room()
                    payloads.sending()
                if not await send(out):
                    return  # the upstream ended the call: its status is read by the handler
                tally.sent()
                if shadow is not None:
                    shadow.events(raw, out, stream.received - 1)
            await _settle()
            await _close(call)
        except GuardError:  # refused and audited (stream.error): nothing more goes upstream
            call.cancel()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the upstream call ended: its status is read by the handler
        except Exception:
            call.cancel()  # the handler reports it as INTERNAL
            raise
        finally:
            tally.flush()  # the stream's counters, however it ends
            if shadow is not None:
                shadow.close()

    async def _finish(
        self,
        stream: StreamGuard,
        *,
        call: Any,
        pump: asyncio.Task[None],
        failure: Any,
        context: Context,
    ) -> None:
        """End the client's call with the status that explains how the stream ended."""
        if stream.error is not None:
            await context.abort(stream.error.code, stream.error.message)
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            error = internal_error(stream.rpc, pump.exception() or RuntimeError())
            await context.abort(error.code, error.message)
        if failure is None:
            code = await call.code()
            if code != grpc.StatusCode.OK:
                failure = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), await call.details())
        if failure is not None:
            code, details = failure.code(), failure.details() or ""
            self._upstream_failed(stream.rpc, code)
            await context.abort(code, details)

    # -- PublishInstanceUserMetadata ----------------------------------------------------

    async def publish_instance_user_metadata(self, requests: AsyncIterator[bytes], context: Context) -> bytes:
        metadata = context.invocation_metadata()
        stream = StreamGuard(self._guards(), PUBLISH_USER_METADATA, authorization_from(metadata))
        shadow = self._shadow_call(PUBLISH_USER_METADATA, stream.guard)
        active = self.metrics.child(self.metrics.streams, PUBLISH_USER_METADATA)
        active.inc()
        try:
            try:
                first = await stream.first_async(requests)
                await stream.verify_async()
            except GuardError as exc:
                await context.abort(exc.code, exc.message)
            finally:
                if shadow is not None:
                    shadow.admitted(stream)
            started = time.perf_counter()
            call = self._publish(metadata=self._outgoing(metadata), timeout=self._timeout(context))
            pump = asyncio.create_task(self._pump_messages(stream, first, requests, call, shadow))
            pump.add_done_callback(_retrieve)
            failure: grpc.aio.AioRpcError | None = None
            response = b""
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                failure = exc
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
            finally:
                if not pump.done():
                    pump.cancel()
                if not call.done():
                    call.cancel()
            await self._finish(stream, call=call, pump=pump, failure=failure, context=context)
            stream.tally.answered(time.perf_counter() - started)
            return bytes(response)
        finally:
            active.dec()
            stream.tally.flush()

    async def _pump_messages(
        self,
        stream: StreamGuard,
        first: Passed,
        requests: AsyncIterator[bytes],
        call: Any,
        shadow: ShadowCall | None = None,
    ) -> None:
        send = _sender(call)
        try:
            if not await send(stream.pass_on(serialize, first)):
                return  # the upstream ended the call: its status is read by the handler
            stream.tally.sent()
            async for raw in requests:
                passed = stream.accept(raw)
                if passed is None:
                    continue
                if not await send(stream.pass_on(serialize, passed)):
                    return
                stream.tally.sent()
                if shadow is not None:
                    shadow.user_metadata(raw, stream, stream.received - 1)
            await _settle()
            await _close(call)
        except GuardError:
            call.cancel()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        except Exception:
            call.cancel()
            raise
        finally:
            if shadow is not None:
                shadow.close()

    # -- RecordEvent --------------------------------------------------------------------

    async def record_event(self, raw: bytes, context: Context) -> bytes:
        metadata = context.invocation_metadata()
        guarded = UnaryGuard(self._guards(), RECORD_EVENT, authorization_from(metadata))
        shadow = self._shadow_call(RECORD_EVENT, guarded.guard)
        active = self.metrics.child(self.metrics.streams, RECORD_EVENT)
        active.inc()
        try:
            try:
                request = guarded.admit(raw)
                await guarded.verify_async()
                kept = guarded.filter(request)
                passed = None if kept is None else guarded.pass_on(serialize, kept)
            except GuardError as exc:
                await context.abort(exc.code, exc.message)
            if passed is None:  # removed whole by the policy: acknowledged, nothing sent
                return bytes(removed_event_response(None))
            started = time.perf_counter()
            call = self._record_event(passed, metadata=self._outgoing(metadata), timeout=self._timeout(context))
            guarded.tally.sent()
            failure: grpc.aio.AioRpcError | None = None
            response = b""
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                failure = exc
            finally:
                if not call.done():
                    call.cancel()
            if failure is not None:
                self._upstream_failed(RECORD_EVENT, failure.code())
                await context.abort(failure.code(), failure.details() or "")
            guarded.tally.answered(time.perf_counter() - started)
            return bytes(response)
        finally:
            active.dec()
            guarded.tally.flush()
            if shadow is not None:  # after the answer: from the request's bytes (`request` was filtered in place)
                shadow.record_event(raw, guarded.authorization)
                shadow.close()
