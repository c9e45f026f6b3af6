"""The stream protocol of RecordEvents and PublishInstanceUserMetadata, for all four interceptors.

As the gateway enforces it (GATEWAY.md): the first message carries `metadata` (request_id and
identifier); every later one carries a payload. Metadata twice, or a payload before the
metadata: INVALID_ARGUMENT. A message with no payload set is skipped (never passed on). The
identifier of the metadata message governs the whole stream: it is admitted once (kind
allowed, token present and verified) and every payload is filtered under its kind.

How an interceptor uses it:

    stream = StreamGuard(guard, rpc, authorization)
    first = stream.first(requests)       # reads up to the metadata message; raises GuardError
    stream.verify()                      # or: await stream.verify_async()
    for item in stream.rest(first, requests, encode):   # what may be passed on
        ...
    response = stream.merge(response)    # RecordEvents: removed-whole ids acknowledged

A violation later in the stream is remembered in `stream.error` (and audited) before the
GuardError is raised from the request iterator; whoever consumes that iterator may swallow it
or turn it into UNKNOWN, so the interceptor's handler aborts with `stream.error` itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from google.protobuf.message import DecodeError, Message

from telemetry_guard.interceptors.acks import AckLedger
from telemetry_guard.interceptors.errors import GuardError, protocol_error, wire_error
from telemetry_guard.interceptors.guard import REQUEST_TYPES, CallGuard, Encode, Guard, Passed
from telemetry_guard.policy import Outcome, wire
from telemetry_guard.policy.engine import RECORD_EVENTS
from telemetrygateway.v1 import telemetrygateway_pb2 as pb


class StreamGuard(CallGuard):
    """One RecordEvents or PublishInstanceUserMetadata stream, on either side."""

    def __init__(self, guard: Guard, rpc: str, authorization: str | None) -> None:
        super().__init__(guard, rpc, authorization)
        self.acks = AckLedger() if rpc == RECORD_EVENTS else None
        self._received = 0
        self._judge: Callable[[bytes], Outcome[bytes]] | None = None  # events payloads, once admitted and verified
        self._users_judge: Callable[[bytes], Outcome[bytes] | None] | None = None  # user metadata payloads, the same
        self._acks = AckLedger()  # self.acks and self.kind, once _judge is made
        self._kind = ""
        self._request_type = REQUEST_TYPES[rpc]
        self._payload = "events" if rpc == RECORD_EVENTS else "user_metadata"  # the payload judged on its bytes

    # -- one message --------------------------------------------------------------------

    @property
    def received(self) -> int:
        """How many messages the stream has received so far (the index of the last one is this minus 1)."""
        return self._received

    def accept(self, item: Any) -> Passed | None:
        """The next request as received: what to pass on, or None to skip it; raises GuardError.

        A payload of an admitted stream (events, or user metadata: field 2 of either request) is judged on its
        wire bytes (_events(), _users()) and passed on as the bytes that may leave; every other message, and a
        user metadata payload the walk does not take, is parsed whole and checked against the protocol.
        Fails closed as judging() does, without a context manager on the per-payload path.
        """
        index = self._received
        self._received = index + 1
        try:
            if self.kind is not None:
                if type(item) is bytes:  # the usual: a server's or a proxy's bytes
                    self.raw = True
                    data = item if wire.payload(item) == wire.EVENTS else None
                else:
                    data = self._payload_wire(item)
                if data is not None:
                    if self.acks is not None:
                        return self._events(data, index)
                    passed = self._users(data, index)
                    if passed is not None:
                        return passed
            return self._message(item, index)
        except Exception as exc:
            raise self.failed(exc, message=index) from None

    def _payload_wire(self, item: Any) -> bytes | None:
        """The wire bytes of a payload of this admitted stream given as a message or a buffer; None for anything
        else. Told from the top-level tags only (policy.wire.payload): what is irregular there is parsed whole."""
        if isinstance(item, bytearray | memoryview):
            self.raw = True
            data = bytes(item)
            return data if wire.payload(data) == wire.EVENTS else None
        if isinstance(item, self._request_type) and item.WhichOneof("payload") == self._payload:
            self.raw = False
            return item.SerializeToString()
        return None

    def _users(self, data: bytes, index: int) -> bytes | None:
        """A user metadata payload judged on the C walk (Engine.admitted_user_payloads, made at the first payload):
        the bytes that may leave, counted and audited first; None when the walk does not take it (the payload is
        then parsed whole)."""
        judge = self._users_judge
        if judge is None:
            if not self._verified or self.kind is None:
                raise RuntimeError("user metadata before the stream was admitted and its credentials verified")
            judge = self._users_judge = self.guard.engine.admitted_user_payloads(self.kind, override=self.override)
        outcome = judge(data)
        if outcome is None:
            return None
        self.audit(outcome.decision, index)
        return outcome.request

    def _events(self, data: bytes, index: int) -> bytes | None:
        """One events payload of the admitted stream: the bytes that may leave (None: nothing to pass on).

        Judged under the stream's kind and override as admitted once (Engine.admitted_payloads, made at the
        first payload), its removed-whole ids given to the acknowledgement ledger, its decision counted and
        audited before anything is passed on.
        """
        judge = self._judge
        if judge is None:
            judge = self._judging_payloads()
        try:
            outcome = judge(data)
        except DecodeError:
            raise wire_error(self.rpc) from None
        decision = outcome.decision
        if decision.denial is not None:
            raise GuardError.from_denial(decision.denial)
        removed = decision.dropped_event_ids
        if removed:
            removed = self.guard.engine.acknowledged_removals(self._kind, decision)
        self._acks.forwarded(outcome.request, removed)
        self.audit(decision, index)
        return outcome.request

    def _judging_payloads(self) -> Callable[[bytes], Outcome[bytes]]:
        """The stream's judge of events payloads, once it is admitted and its credentials verified."""
        if not self._verified or self.kind is None or self.acks is None:
            raise RuntimeError("events before the stream was admitted and its credentials verified")
        self._acks, self._kind = self.acks, self.kind
        self._judge = self.guard.engine.admitted_payloads(self.kind, override=self.override)
        return self._judge

    def _message(self, item: Any, index: int) -> Message | bytes | None:
        """A message parsed whole: the stream's metadata, a user metadata payload, or one irregular on the wire."""
        request = self._decode(item)
        if not isinstance(request, pb.RecordEventsRequest | pb.PublishInstanceUserMetadataRequest):
            raise TypeError(type(request).__name__)
        payload = request.WhichOneof("payload")
        if payload is None:
            return None
        if payload == "metadata":
            if self.kind is not None:
                raise protocol_error(self.rpc, "received metadata more than once")
            metadata = request.metadata
            self.request_id = metadata.request_id
            self._admit(metadata.identifier if metadata.HasField("identifier") else None)
        elif self.kind is None:
            raise protocol_error(self.rpc, f"got {payload} when metadata not yet received")
        elif payload == "events":
            return self._events(request.SerializeToString(), index)
        else:
            self._require_verified()
        outcome = self._filter(request, payload)
        if outcome.denial is not None:
            raise GuardError.from_denial(outcome.denial)
        self.audit(outcome.decision, index)
        return request

    def _filter(
        self, request: pb.RecordEventsRequest | pb.PublishInstanceUserMetadataRequest, payload: str
    ) -> Outcome[Any]:
        identifier = None if payload == "metadata" else self.identifier  # metadata: its own
        if isinstance(request, pb.RecordEventsRequest):
            return self.guard.engine.record_events(request, identifier, detailed=self.guard.detailed)
        return self.guard.engine.publish_instance_user_metadata(request, identifier)

    # -- the stream ---------------------------------------------------------------------

    def _no_metadata(self) -> GuardError:
        return self.refuse(protocol_error(self.rpc, "stream ended before its metadata message"))

    def first(self, items: Iterator[Any]) -> Passed:
        """Read up to the metadata message (empty messages skipped); raises GuardError."""
        for item in items:
            message = self.accept(item)
            if message is not None:
                return message
        raise self._no_metadata()

    async def first_async(self, items: AsyncIterator[Any]) -> Passed:
        async for item in items:
            message = self.accept(item)
            if message is not None:
                return message
        raise self._no_metadata()

    def rest(
        self, first: Passed, items: Iterator[Any], encode: Encode, on_refusal: Callable[[], None] | None = None
    ) -> Iterator[Any]:
        """The first message, then every later one filtered, each encoded for the consumer.

        On a refusal: raise the GuardError into the consumer, or, with on_refusal, call it and
        end (the client side cancels its call rather than half-close it).
        """
        yield self.pass_on(encode, first)
        for item in items:
            try:
                message = self.accept(item)
            except GuardError:
                if on_refusal is None:
                    raise
                on_refusal()
                return
            if message is not None:
                yield self.pass_on(encode, message)

    async def rest_async(
        self, first: Passed, items: AsyncIterator[Any], encode: Encode, on_refusal: Callable[[], None] | None = None
    ) -> AsyncIterator[Any]:
        yield self.pass_on(encode, first)
        async for item in items:
            try:
                message = self.accept(item)
            except GuardError:
                if on_refusal is None:
                    raise
                on_refusal()
                return
            if message is not None:
                yield self.pass_on(encode, message)

    # -- responses ----------------------------------------------------------------------

    def merge(self, response: Any) -> Any:
        """RecordEvents: the response with the removed-whole ids of its payload acknowledged.

        As judging() does, without a context manager per response (one per events payload).
        """
        if self.acks is None:
            return response
        try:
            return self.acks.merge(response)
        except Exception as exc:
            raise self.failed(exc) from None
