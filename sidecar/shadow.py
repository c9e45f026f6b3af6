"""Shadow policy: every message is judged by a candidate policy too; only the difference is recorded.

The policy in force alone decides what leaves. The shadow sees a message only after the policy in
force has judged it (an events payload: after it was written upstream) and gives nothing back:
its output is compared and dropped, and any exception in it is counted and swallowed. What it
records, per message where the two policies disagree (policy.compare):

- metrics: telemetry_guard_shadow_differences{rpc, kind, direction, area, rule} (what the
  candidate would remove that the policy in force lets leave, and the reverse),
  telemetry_guard_shadow_refusals{rpc, kind, in_force, candidate, rule}, and the messages
  compared (telemetry_guard_shadow_compared, ..._events_compared, ..._differing);
- audit lines on the audit logger: `shadow_difference` (rule names, areas, counts) and
  `shadow_refusal` per message or call that differs, `shadow_summary` when a call that compared
  something ends; key names only in `shadow_keys` records at DEBUG (the audit trail's with_keys
  switch). Never a value.

Sampling (--shadow-sample RATE): each process judges, of the messages it receives, every one at
rate 1 and otherwise an exact fraction spread evenly over them in arrival order (a credit counter,
no randomness: at 0.25, the 4th, 8th, 12th...). The admission of a stream (its metadata message:
which identifier kinds may call, credentials required) is always compared: it is cheap and the
stream's payloads can only be judged by a candidate that admitted it.

An events payload whose forwarded bytes equal the candidate's output is no difference (the fast
path under both). Otherwise the policy in force judges it again (the fast path: its decision is
not kept by the forwarder) and the two decisions are compared; the keys of a private_metadata one
of them removed whole are read from the payload, parsed only then. Where the two policies treat
unknown fields differently for the kind, both judge it with detailed decisions (the Python
reference path), which alone record unknown fields per event.
"""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf.message import DecodeError
from prometheus_client import Counter

from telemetry_guard.interceptors.audit import AuditLog, Sink, identity
from telemetry_guard.interceptors.guard import CallGuard, Guard
from telemetry_guard.policy import Decision, Denial, Engine, wire
from telemetry_guard.policy.compare import Difference, PrivateKeys, RefusalDifference, compare, compare_refusals
from telemetry_guard.sidecar.logs import fields
from telemetry_guard.sidecar.metrics import NO_KIND, Metrics
from telemetry_guard.sidecar.shadow_candidate import Candidate, CandidateReloader
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

LOG = logging.getLogger("telemetry_guard.sidecar.shadow")


class _PrivateKeys:
    """The key names of an event's private_metadata in a serialized payload; parsed on the first question."""

    __slots__ = ("_events", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._events: Any = None

    def __call__(self, index: int) -> list[str]:
        if self._events is None:
            self._events = pb.RecordEventsRequest.FromString(self._raw).events.events
        return sorted(self._events[index].parameters.private_metadata.fields)


class Sampler:
    """Deterministic sampling at `rate` (0 < rate <= 1): take() is True for an even share of calls."""

    def __init__(self, rate: float) -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"the shadow sample rate must be in (0, 1], not {rate}")
        self.rate = rate
        self._credit = 0.0

    def take(self) -> bool:
        if self.rate >= 1.0:
            return True
        self._credit += self.rate
        if self._credit >= 1.0 - 1e-9:
            self._credit -= 1.0
            return True
        return False


class ShadowMetrics:
    """The shadow's counters, in the sidecar's registry. Labels from closed sets: no value can be one."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.child = metrics.child
        self.compared = Counter(
            "telemetry_guard_shadow_compared",
            "Request messages judged by the candidate policy too (after sampling).",
            ["rpc", "kind"],
            registry=r,
        )
        self.events = Counter(
            "telemetry_guard_shadow_events_compared",
            "Events in the messages judged by the candidate policy too.",
            ["rpc", "kind"],
            registry=r,
        )
        self.differing = Counter(
            "telemetry_guard_shadow_differing",
            "Messages the candidate policy would have let leave otherwise than the policy in force.",
            ["rpc", "kind"],
            registry=r,
        )
        self.differences = Counter(
            "telemetry_guard_shadow_differences",
            "Things the candidate would remove that the policy in force lets leave (candidate_removes), and the "
            "reverse (candidate_keeps), per area and the rule that removes them (whole events 1, keys 1 each).",
            ["rpc", "kind", "direction", "area", "rule"],
            registry=r,
        )
        self.refusals = Counter(
            "telemetry_guard_shadow_refusals",
            "Calls or messages the candidate would refuse, or admit, otherwise than the policy in force "
            "(status code names; OK: admitted).",
            ["rpc", "kind", "in_force", "candidate", "rule"],
            registry=r,
        )
        self.errors = Counter(
            "telemetry_guard_shadow_errors",
            "Messages the candidate could not judge (an exception; nothing forwarded depends on it).",
            ["rpc"],
            registry=r,
        )


class Shadow:
    """The candidate policy of one sidecar process, its sampler, counters and audit lines."""

    def __init__(self, path: str, rate: float, metrics: Metrics, *, sink: Sink | None = None) -> None:
        self.sampler = Sampler(rate)
        self.metrics = ShadowMetrics(metrics)
        self.candidate = CandidateReloader(path, metrics)
        self._audit = AuditLog(sink=sink)
        self.logger = self._audit.logger

    def start(self, rpc: str, guard: Guard) -> ShadowCall | None:
        """The shadow of a call that starts now under `guard` (None: no candidate in shadow)."""
        candidate = self.candidate.current
        return None if candidate is None else ShadowCall(self, rpc, guard, candidate)

    async def reload(self, trigger: str) -> bool:
        return await self.candidate.reload(trigger)

    async def watch(self, interval: float) -> None:
        await self.candidate.watch(interval)

    def emit(self, level: int, record: dict[str, Any]) -> None:
        """One audit record, written as the audit trail writes its own (the sidecar's sink, else logging)."""
        self._audit.emit(level, record)


class ShadowCall:
    """One call judged by the candidate it started with, beside the policy in force. Never raises."""

    __slots__ = (
        "_base",
        "_candidate",
        "_compared",
        "_differing",
        "_events",
        "_in_force",
        "_kind",
        "_shadow",
        "_unknown_differs",
        "rpc",
    )

    def __init__(self, shadow: Shadow, rpc: str, guard: Guard, candidate: Candidate) -> None:
        self._shadow = shadow
        self.rpc = rpc
        self._in_force: Engine = guard.engine
        self._candidate = candidate
        self._kind: str | None = None  # the kind the candidate admitted the stream as
        self._unknown_differs = False  # do the policies treat the kind's unknown fields differently?
        self._base: dict[str, Any] = {}
        self._compared = self._events = self._differing = 0

    # -- what the forwarder calls ---------------------------------------------------------

    def admitted(self, call: CallGuard) -> None:
        """A stream's metadata message was judged by the policy in force (admitted or refused): compare."""
        if call.identifier is None:
            return  # no metadata read, or no identifier: refused alike by any policy
        try:
            self._describe(call.identifier, call.request_id)
            kind = self._kind = self._access(call.identifier, call.authorization)
            if kind is not None:
                self._unknown_differs = (
                    self._in_force.policy.kinds[kind].unknown_fields.value
                    != self._candidate.policy.kinds[kind].unknown_fields.value
                )
        except Exception as exc:
            self._failed(exc)

    def events(self, raw: bytes, forwarded: bytes, message: int) -> None:
        """An events payload of the stream, after the bytes the policy in force let out were written."""
        kind = self._kind
        if kind is None or wire.payload(raw) != wire.EVENTS or not self._shadow.sampler.take():
            return
        try:
            engine = self._candidate.engine
            out = engine.record_events_admitted(raw, kind)
            if out.denial is None and out.request == forwarded:
                self._count(out.decision.events_in, [], None, message)
                return
            if self._unknown_differs:
                ours = self._in_force.record_events_admitted(raw, kind, detailed=True).decision
                theirs = engine.record_events_admitted(raw, kind, detailed=True).decision
                self._judged(ours, theirs, message)
            else:
                ours = self._in_force.record_events_admitted(raw, kind).decision
                self._judged(ours, out.decision, message, _PrivateKeys(raw))
        except Exception as exc:
            self._failed(exc)

    def record_event(self, raw: bytes, authorization: str | None) -> None:
        """A RecordEvent call (one message: sampled as one), judged by both policies from its bytes."""
        if not self._shadow.sampler.take():
            return
        try:
            try:
                request = pb.RecordEventRequest.FromString(raw)
            except DecodeError:
                return  # refused alike by any policy (rule wire)
            identifier = request.metadata.identifier if request.HasField("metadata") else None
            if identifier is None:
                return
            self._describe(identifier, request.metadata.request_id)
            if self._access(identifier, authorization) is None:
                return
            ours = self._in_force.record_event(pb.RecordEventRequest.FromString(raw), detailed=True).decision
            theirs = self._candidate.engine.record_event(request, detailed=True).decision
            self._judged(ours, theirs, None)
        except Exception as exc:
            self._failed(exc)

    def user_metadata(self, raw: bytes, call: CallGuard, message: int) -> None:
        """A PublishInstanceUserMetadata payload the policy in force passed on (the stream admitted)."""
        if self._kind is None or call.identifier is None or not self._shadow.sampler.take():
            return
        try:
            request = pb.PublishInstanceUserMetadataRequest.FromString(raw)
            if request.WhichOneof("payload") not in ("user_metadata", "organization_metadata"):
                return
            ours = self._in_force.publish_instance_user_metadata(
                pb.PublishInstanceUserMetadataRequest.FromString(raw), call.identifier
            ).decision
            theirs = self._candidate.engine.publish_instance_user_metadata(request, call.identifier).decision
            self._judged(ours, theirs, message)
        except Exception as exc:
            self._failed(exc)

    def close(self) -> None:
        """The call ended: its summary line, when it compared anything."""
        if not self._compared:
            return
        try:
            self._shadow.emit(
                logging.INFO,
                {
                    **self._base,
                    "audit": "shadow_summary",
                    "compared_messages": self._compared,
                    "compared_events": self._events,
                    "differing_messages": self._differing,
                },
            )
        except Exception as exc:
            self._failed(exc)

    # -- comparing ------------------------------------------------------------------------

    def _describe(self, identifier: pb.Identifier, request_id: str) -> None:
        """The constant fields of this call's shadow records."""
        self._base = {
            "side": "server",
            "rpc": self.rpc,
            "kind": identifier.WhichOneof("identifier"),
            **identity(identifier),
            "request_id": request_id,
            "policy_sha256": self._in_force.policy.sha256,
            "candidate_sha256": self._candidate.policy.sha256,
        }

    def _access(self, identifier: pb.Identifier, authorization: str | None) -> str | None:
        """Compare admission; the kind both policies admit (None: either refuses; nothing more to compare)."""
        ours = self._in_force.check_access(self.rpc, identifier, authorization)
        theirs = self._candidate.engine.check_access(self.rpc, identifier, authorization)
        refusal = compare_refusals(
            ours if isinstance(ours, Denial) else None, theirs if isinstance(theirs, Denial) else None
        )
        if refusal is not None:
            self._refused(refusal, None)
        return theirs if isinstance(theirs, str) and isinstance(ours, str) else None

    def _judged(
        self, ours: Decision, theirs: Decision, message: int | None, private_keys: PrivateKeys | None = None
    ) -> None:
        refusal = compare_refusals(ours.denial, theirs.denial)
        if refusal is not None:
            self._refused(refusal, message)
            return
        if ours.denial is not None:
            return  # refused alike
        self._count(ours.events_in, compare(ours, theirs, private_keys), ours.kind, message)

    def _count(self, events: int, differences: list[Difference], kind: str | None, message: int | None) -> None:
        m = self._shadow.metrics
        kind = kind or self._base.get("kind") or NO_KIND
        self._compared += 1
        self._events += events
        m.child(m.compared, self.rpc, kind).inc()
        if events:
            m.child(m.events, self.rpc, kind).inc(events)
        if not differences:
            return
        self._differing += 1
        m.child(m.differing, self.rpc, kind).inc()
        for d in differences:
            m.child(m.differences, self.rpc, kind, d.direction, d.area, d.rule).inc(d.count)
        at = {} if message is None else {"message": message}
        self._shadow.emit(
            logging.INFO,
            {
                **self._base,
                **at,
                "audit": "shadow_difference",
                "events_in": events,
                "differences": [
                    {"direction": d.direction, "area": d.area, "rule": d.rule, "count": d.count} for d in differences
                ],
            },
        )
        named = [d for d in differences if d.keys]
        if named and self._shadow.logger.isEnabledFor(logging.DEBUG):
            self._shadow.emit(
                logging.DEBUG,
                {
                    **{k: v for k, v in self._base.items() if k in ("side", "rpc", "kind", "request_id")},
                    **at,
                    "audit": "shadow_keys",
                    "differences": [
                        {"direction": d.direction, "area": d.area, "rule": d.rule, "keys": list(d.keys)} for d in named
                    ],
                },
            )

    def _refused(self, refusal: RefusalDifference, message: int | None) -> None:
        m = self._shadow.metrics
        kind = self._base.get("kind") or NO_KIND
        m.child(m.refusals, self.rpc, kind, refusal.in_force, refusal.candidate, refusal.rule).inc()
        at = {} if message is None else {"message": message}
        self._shadow.emit(
            logging.INFO,
            {
                **self._base,
                **at,
                "audit": "shadow_refusal",
                "in_force": refusal.in_force,
                "candidate": refusal.candidate,
                "in_force_rule": refusal.in_force_rule,
                "candidate_rule": refusal.candidate_rule,
            },
        )

    def _failed(self, exc: Exception) -> None:
        m = self._shadow.metrics
        m.child(m.errors, self.rpc).inc()
        LOG.warning(
            "the shadow candidate could not judge a message; nothing forwarded depends on it",
            extra=fields(rpc=self.rpc, error=type(exc).__name__),
        )
