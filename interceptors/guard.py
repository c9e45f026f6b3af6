"""What the four interceptors share: the engine, a verifier, the audit log, and one call's state.

The interceptors (sync and aio, server and client) only adapt gRPC's shapes to these
steps; every decision is taken here and in stream.py, the same way on both sides:

1. decode: bytes are parsed, messages copied on the client (the exporter's objects are
   never changed in place); anything else is refused. An events payload of an admitted
   RecordEvents stream is not parsed here: it is judged on its wire bytes (a message given
   is serialized), and the consumer gets the bytes that may leave: as they are, parsed once
   (a servicer), or carried to the channel's serializer unparsed (client_encoder);
2. admit: identifier present and complete, kind allowed for the RPC, bearer token present
   when the kind needs credentials (the engine's check_access);
3. verify: the verifier judges the token (sync, or in an executor for aio);
4. filter: the engine removes what the policy says;
5. audit: one record per request message, refusals included, and the call's tally counts it.

Any exception other than a GuardError while doing so becomes INTERNAL naming the RPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message

from telemetry_guard.interceptors.audit import AuditLog, DecisionLines
from telemetry_guard.interceptors.credentials import BearerPresent, CredentialVerifier, cancelled
from telemetry_guard.interceptors.errors import GuardError, internal_error, wire_error
from telemetry_guard.policy import RPCS, Decision, Engine, Policy, default_policy
from telemetry_guard.policy.access import bearer_token, check_event
from telemetry_guard.policy.engine import PUBLISH_USER_METADATA, RECORD_EVENT, RECORD_EVENTS
from telemetry_guard.policy.kinds import method_path
from telemetry_guard.policy.safety import check_enforceable
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# What a guard passes on: a filtered message, or the filtered wire bytes of an events payload.
Passed = Message | bytes
Encode = Callable[[Passed], Any]

REQUEST_TYPES: dict[str, type[Message]] = {
    RECORD_EVENTS: pb.RecordEventsRequest,
    RECORD_EVENT: pb.RecordEventRequest,
    PUBLISH_USER_METADATA: pb.PublishInstanceUserMetadataRequest,
}
_RPC_BY_METHOD = {method_path(rpc): rpc for rpc in RPCS}


def rpc_for_method(method: str | bytes) -> str | None:
    """The RPC a gRPC method path names, or None for a method of another service."""
    if isinstance(method, bytes):
        method = method.decode("utf-8", "replace")
    return _RPC_BY_METHOD.get(method)


def server_encoder(rpc: str, deserializer: Callable[[bytes], Any] | None) -> Encode:
    """How a servicer takes a filtered request: as its handler's deserializer would give it.

    The wrapped handler receives raw bytes (so that a request that does not parse is refused
    by the guard, not answered INTERNAL by grpc) and hands the servicer what it expects:
    the message itself for the generated deserializer, bytes for a raw-bytes handler (a
    forwarding proxy), or the result of any other deserializer.
    """
    if deserializer is None:
        return serialize
    if deserializer == REQUEST_TYPES[rpc].FromString:
        return _message_of(REQUEST_TYPES[rpc])
    return lambda passed: deserializer(serialize(passed))


def client_encoder(call: CallGuard) -> Encode:
    """How a channel takes a filtered request: bytes for a raw-bytes method, else a message its serializer takes.

    The filtered wire bytes of an events payload go as a wire carrier (wire_carrier()), which the request type's
    serializer writes out as they are: not parsed back into a message for grpc to serialize again.
    """
    if call.raw:
        return serialize
    if _CARRIERS_SERIALIZE:
        return _as_carrier
    return _message_of(REQUEST_TYPES[call.rpc])


def wire_carrier(data: bytes) -> Message:
    """A message that serializes to exactly `data`: a message type without fields, which keeps all of `data` as its
    unknown fields (protobuf writes unknown fields back as they were read; only the top-level tags are read)."""
    return empty_pb2.Empty.FromString(data)


def _as_carrier(passed: Passed) -> Message:
    """Encode: for a channel whose request serializer is a protobuf message type's (as generated stubs register)."""
    return wire_carrier(passed) if isinstance(passed, bytes) else passed


def _carriers_serialize() -> bool:
    """Whether the request types' serializers write a wire carrier as its bytes (upb's and the pure Python
    implementation's SerializeToString take any message); if not, filtered bytes are parsed into the request type."""
    sample = b"\x12\x04\x0a\x02\x0a\x00"  # field 2 holding a message that holds an empty field 1
    try:
        return all(cls.SerializeToString(wire_carrier(sample)) == sample for cls in REQUEST_TYPES.values())
    except Exception:  # a serializer that refuses the carrier: the request type itself is used
        return False


_CARRIERS_SERIALIZE = _carriers_serialize()


def serialize(passed: Passed) -> bytes:
    """Encode: for a consumer that takes bytes (raw handlers, the sidecar's upstream)."""
    return passed if isinstance(passed, bytes) else passed.SerializeToString()


def _message_of(cls: type[Message]) -> Encode:
    """Encode: for a consumer that takes the request message (parsed once, from the bytes that may leave)."""

    def message(passed: Passed) -> Message:
        return cls.FromString(passed) if isinstance(passed, bytes) else passed

    return message


H = TypeVar("H")


class GuardedHandlers(Generic[H]):
    """A server interceptor's guarded handlers, made once per servicer handler rather than once per call.

    A servicer's handlers are the same objects call after call (the generated code registers them once), so the
    handler that wraps one is kept, by the wrapped handler's identity. Bounded: a servicer that made a new handler
    for every call would only have its handlers made again, never kept without end.
    """

    LIMIT = 64

    def __init__(self, wrap: Callable[[str, H], H]) -> None:
        self._wrap = wrap
        self._made: dict[int, tuple[H, str, H]] = {}

    def get(self, rpc: str, handler: H) -> H:
        """The guarded handler of `handler`, a handler of `rpc` (made at its first call for that RPC)."""
        made = self._made.get(id(handler))
        if made is not None and made[0] is handler and made[1] == rpc:
            return made[2]
        guarded = self._wrap(rpc, handler)
        if len(self._made) >= self.LIMIT:
            self._made.clear()
        self._made[id(handler)] = (handler, rpc, guarded)  # the handler kept with it: its id is not reused meanwhile
        return guarded


def removed_event_response(serializer: Callable[[Any], bytes] | None) -> Any:
    """The RecordEvent answer for an event the policy removed whole (nothing to send): success."""
    return b"" if serializer is None else pb.RecordEventResponse()


def authorization_from(metadata: Iterable[Any] | None) -> str | None:
    """The first `authorization` value of call metadata ((key, value) pairs), if any."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(key, str) and key.lower() == "authorization" and isinstance(value, str):
            return value
    return None


class CallTally:
    """Where one call's decisions, its refusal and the messages it passes on are counted.

    This one counts nothing: the interceptors keep no metrics. The sidecar's (sidecar.metrics.StreamTally)
    adds them up and publishes them as Prometheus counters. kind: the identifier kind of the call, or None.
    """

    __slots__ = ()

    def judged(self, kind: str | None, events_in: int, events_out: int, counts: dict[str, int]) -> None:
        """One request message decided (counts: Decision.counts())."""

    def refused(self, kind: str | None, error: GuardError) -> None:
        """The call refused (once per call)."""

    def sent(self) -> None:
        """One message passed on."""

    def answered(self, seconds: float) -> None:
        """A message's upstream round trip, in seconds (a forwarding proxy's)."""

    def flush(self) -> None:
        """Publish what was counted (the call's owner calls it when the call ends)."""


NO_TALLY = CallTally()


def no_tally(rpc: str) -> CallTally:
    """Guard's default tally: nothing counted."""
    return NO_TALLY


class Guard:
    """A loaded policy applied by one or more interceptors. side: "server" or "client" (audit).

    tally: makes the counters of one call of an RPC (the sidecar's metrics); by default nothing is counted.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        verifier: CredentialVerifier | None = None,
        audit: AuditLog | None = None,
        side: str = "server",
        copy_requests: bool = False,
        tally: Callable[[str], CallTally] = no_tally,
    ) -> None:
        self.engine = engine
        self.verifier = verifier or BearerPresent()
        self.audit = audit or AuditLog()
        self.side = side
        self.copy_requests = copy_requests
        self.tally = tally

    @classmethod
    def build(
        cls,
        policy_or_engine: Policy | Engine | Guard | None,
        *,
        verifier: CredentialVerifier | None = None,
        audit: AuditLog | None = None,
        side: str,
        allow_unsafe_policy: bool = False,
    ) -> Guard:
        """A guard for one side. None: the default policy. A Guard given is reused as it is.

        A policy (or an engine's) that lint refuses raises policy.safety.UnsafePolicyError, unless
        allow_unsafe_policy (then its findings are logged at ERROR).
        """
        if isinstance(policy_or_engine, Guard):
            if verifier is not None or audit is not None or policy_or_engine.side != side:
                raise ValueError(f"a Guard is used as built: give it the verifier and audit log, for side {side}")
            return policy_or_engine
        if policy_or_engine is None:
            policy_or_engine = default_policy()
        policy = policy_or_engine.policy if isinstance(policy_or_engine, Engine) else policy_or_engine
        check_enforceable(policy, allow_unsafe_policy=allow_unsafe_policy)
        engine = policy_or_engine if isinstance(policy_or_engine, Engine) else Engine(policy_or_engine)
        return cls(engine, verifier=verifier, audit=audit, side=side, copy_requests=side == "client")

    @property
    def detailed(self) -> bool:
        """Whether the audit log writes removed key names (DEBUG). Decisions are the same either way."""
        return self.audit.logger.isEnabledFor(logging.DEBUG)

    def decode(self, rpc: str, item: Any) -> Message:
        """A request message to filter: parsed from bytes, or (client side) a copy of the caller's."""
        cls = REQUEST_TYPES[rpc]
        if isinstance(item, bytes | bytearray | memoryview):
            try:
                return cls.FromString(bytes(item))
            except DecodeError:
                raise wire_error(rpc) from None
        if not isinstance(item, cls):
            raise wire_error(rpc)
        if not self.copy_requests:
            return item
        copy = cls()
        copy.CopyFrom(item)
        return copy


class CallGuard:
    """One call's state: who is calling (once admitted), the token to verify, the refusal if any."""

    def __init__(self, guard: Guard, rpc: str, authorization: str | None) -> None:
        self.guard = guard
        self.rpc = rpc
        self.authorization = authorization
        self.identifier: pb.Identifier | None = None
        self.identified_as: str | None = None  # the identifier's kind as given (admitted or not): the metrics' label
        self.request_id = ""
        self.raw = False  # the caller's requests are bytes (a raw-bytes method)
        self.kind: str | None = None
        self.override: str | None = None  # the override the identifier matched (its rules apply), once admitted
        self.error: GuardError | None = None
        self._token: str | None = None  # to verify before anything is passed on
        self._verified = False
        self._lines: DecisionLines | None = None
        self.tally = guard.tally(rpc)

    def _admit(self, identifier: pb.Identifier | None) -> None:
        """Identifier, kind and token presence; remembers who is calling (audited even if refused)."""
        self._remember(identifier)
        found = self.guard.engine.check_access(self.rpc, identifier, self.authorization)
        if not isinstance(found, str):
            raise GuardError.from_denial(found)
        self.kind = found
        matched = self.guard.engine.override_for(identifier)
        self.override = None if matched is None else matched.name
        if found in self.guard.engine.policy.credentials_required:
            self._token = bearer_token(self.authorization)
        else:
            self._verified = True

    def _remember(self, identifier: pb.Identifier | None) -> None:
        """Who is calling, for the audit log (a copy: the request may be filtered in place)."""
        if identifier is not None:
            self.identifier = pb.Identifier()
            self.identifier.CopyFrom(identifier)
            self.identified_as = identifier.WhichOneof("identifier")

    def refuse(self, error: GuardError, *, message: int | None = None) -> GuardError:
        """Remember and audit a refusal (the first one wins); returns it for raising."""
        if self.error is None:
            self.error = error
            self.tally.refused(self.identified_as, error)
            self.guard.audit.record(
                side=self.guard.side,
                rpc=self.rpc,
                identifier=self.identifier,
                refusal=error,
                request_id=self.request_id,
                message=message,
            )
        return self.error

    def audit(self, decision: Decision, message: int | None = None) -> None:
        """Count a decision and write its audit line (before the message is passed on: record first).

        Without a tally (the interceptors keep no metrics) nothing is counted, and the audit log reads the
        decision only if it writes it: a library user's logger at WARNING costs no record per message.
        """
        counts = None
        if self.tally is not NO_TALLY:
            counts = decision.counts()
            self.tally.judged(self.identified_as, decision.events_in, decision.events_out, counts)
        audit = self.guard.audit
        if audit.writes_decisions():
            audit.write_decision(self.decision_lines(), decision, message, counts)

    def decision_lines(self) -> DecisionLines:
        """The audit template of this call's decisions (made anew when identifier, request_id or override change)."""
        lines = self._lines
        if (
            lines is None
            or lines.identifier is not self.identifier
            or lines.request_id != self.request_id
            or lines.override != self.override
        ):
            lines = self._lines = DecisionLines(
                self.guard.side, self.rpc, self.identifier, self.request_id, self.override
            )
        return lines

    def _scopes(self) -> tuple[str, ...]:
        return self.guard.engine.policy.credentials_scopes

    @contextmanager
    def judging(self, message: int | None = None) -> Iterator[None]:
        """Fail closed (INTERNAL for any other exception) and remember and audit a refusal."""
        try:
            yield
        except Exception as exc:
            raise self.failed(exc, message=message) from None

    def failed(self, exc: Exception, *, message: int | None = None) -> GuardError:
        """The refusal for an exception raised while judging (a GuardError, else INTERNAL naming only its type),
        remembered and audited; for the per-message paths that catch for themselves."""
        return self.refuse(exc if isinstance(exc, GuardError) else internal_error(self.rpc, exc), message=message)

    def _decode(self, item: Any) -> Message:
        self.raw = isinstance(item, bytes | bytearray | memoryview)
        return self.guard.decode(self.rpc, item)

    def verify(self, active: Callable[[], bool] | None = None) -> None:
        """Let the verifier judge the token, if this kind must present one. Blocking.

        active: whether the call is still live (a server's context.is_active): a verification that
        failed while the call was cancelled is answered CANCELLED, as the gateway answers it.
        """
        if not self._verified:
            with self.judging():
                try:
                    self.guard.verifier.verify(self._token or "", self._scopes(), self.rpc)
                except GuardError as exc:
                    if exc.code == grpc.StatusCode.INTERNAL and active is not None and not active():
                        raise cancelled(exc.reason) from None
                    raise
            self._verified = True

    async def verify_async(self) -> None:
        """The aio form: a call cancelled meanwhile is audited as CANCELLED before the cancellation goes on."""
        if not self._verified:
            with self.judging():
                try:
                    await self.guard.verifier.verify_async(self._token or "", self._scopes(), self.rpc)
                except asyncio.CancelledError:
                    self.refuse(cancelled(f"{self.rpc}: the token was being validated"))
                    raise
            self._verified = True

    def pass_on(self, encode: Encode, passed: Passed) -> Any:
        """What the guard passes on, in the form its consumer takes; only once the token is verified."""
        try:
            if not self._verified:
                self._require_verified()
            return encode(passed)
        except Exception as exc:
            raise self.failed(exc) from None

    def _require_verified(self) -> None:
        """Call inside judging(): an interceptor that skipped verify() passes nothing on."""
        if not self._verified:
            raise RuntimeError("credentials were not verified")


class UnaryGuard(CallGuard):
    """RecordEvent: the identifier travels in the request itself.

    Fails closed as judging() does, without a context manager: these steps run once per call.
    """

    def admit(self, item: Any) -> pb.RecordEventRequest:
        """Decode and admit the request (verify next, then filter)."""
        try:
            request = self._decode(item)
            if not isinstance(request, pb.RecordEventRequest):
                raise TypeError(type(request).__name__)
            metadata = request.metadata
            self.request_id = metadata.request_id
            identifier = metadata.identifier if request.HasField("metadata") else None
            missing = check_event(request)  # the gateway judges the event before the identifier
            if missing is not None:
                self._remember(identifier)
                raise GuardError.from_denial(missing)
            self._admit(identifier)
            return request
        except Exception as exc:
            raise self.failed(exc) from None

    def filter(self, request: pb.RecordEventRequest) -> pb.RecordEventRequest | None:
        """What may be passed on; None when the policy removed the event whole."""
        try:
            self._require_verified()
            if self.kind is None:
                raise RuntimeError("the request was not admitted")
            outcome = self.guard.engine.record_event_admitted(request, self.kind, override=self.override)
            if outcome.denial is not None:
                raise GuardError.from_denial(outcome.denial)
            self.audit(outcome.decision)
            if outcome.request is None or not outcome.request.HasField("event"):
                return None
            return outcome.request
        except Exception as exc:
            raise self.failed(exc) from None
