"""The enforcement engine: one function per RPC request type.

Each takes a request message (filtered in place: it is normally a message just parsed
off the wire; pass a copy to keep the original) and returns an Outcome: the request
that may leave, or a denial, plus the decision record. Each event is visited once.
What depends only on (kind, feature, action) - the whole-event filter, the validity
of the names and the allowlist entry - is resolved once and cached in a bounded
cache, so the cost per event does not grow with the allowlist.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import hmac
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import grpc
from cachetools import LRUCache
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError, Message

from telemetry_guard.policy import access, fastpath, fieldpaths, validity, views
from telemetry_guard.policy.decision import Decision, Denial, EventRecord, Removal
from telemetry_guard.policy.kinds import SINGLE_TENANT_KINDS
from telemetry_guard.policy.model import MATCH_FINGERPRINT, AllowlistEntry, KindRules, Override, Policy
from telemetry_guard.policy.unknown import discard_unknown
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message | bytes)
Wire = bytes | bytearray | memoryview  # a serialized message, as record_events_bytes takes it

RECORD_EVENTS = "RecordEvents"
RECORD_EVENT = "RecordEvent"
PUBLISH_USER_METADATA = "PublishInstanceUserMetadata"

_USER_FIELDS = tuple(pb.InstanceUserMetadata.DESCRIPTOR.fields_by_name)
_ORG_FIELDS = tuple(pb.InstanceOrganizationMetadata.DESCRIPTOR.fields_by_name)


@dataclass(slots=True)
class Outcome(Generic[R]):
    """The request that may leave (None when denied) and the decision record."""

    request: R | None
    decision: Decision

    @property
    def denial(self) -> Denial | None:
        return self.decision.denial


@dataclass(frozen=True, slots=True)
class EventType:
    """Everything decided by (kind, feature, action) alone."""

    dropped_by: str | None  # filter rule removing every event of this type
    invalid: str | None  # why the gateway would reject the names
    entry: AllowlistEntry | None  # allowlist entry (allowlist mode only)
    # The same for the C fast path: (dropped_by, invalid, the entry's keys as UTF-8, or None).
    wire: tuple[str | None, bool, frozenset[bytes] | None] = (None, False, None)


class _KindPlan:
    """A kind's rules turned into what the hot loop needs: booleans, closures, a view class."""

    def __init__(self, rules: KindRules, accelerate: bool, key: str = "") -> None:
        self.rules = rules
        self.key = key or rules.kind  # what the engine files the plan under: the kind, or overrides.NAME
        self.drop_marketing = rules.marketing_tracking.value == "drop"
        self.marketing_removal = Removal(rules.marketing_tracking.rule, "marketing_tracking")
        pm = rules.private_metadata
        self.private_mode = pm.mode
        self.private_rule = pm.rule
        self.replace_non_string = pm.non_string != "drop"
        self.replacement_for = pm.replacement_for
        self.non_string_rule = pm.non_string_rule
        self.drop_invalid = rules.invalid_events.value == "drop"
        self.invalid_rule = rules.invalid_events.rule
        self.merge_legacy = rules.legacy_metadata.value == "merge"
        self.legacy_rule = rules.legacy_metadata.rule
        self.discard_unknown = rules.unknown_fields.value == "discard"
        self.unknown_rule = rules.unknown_fields.rule
        self.unknown_removal = Removal(self.unknown_rule, fastpath.UNKNOWN_PATH)
        self.droppers: list[tuple[Removal, fieldpaths.Remover]] = []
        for path in rules.drop_fields.value:
            resolved = fieldpaths.resolve(path)
            if isinstance(resolved, str):  # the loader refuses such paths; never silently skip one
                raise ValueError(f"{rules.drop_fields.rule}: {resolved}")
            self.droppers.append((Removal(rules.drop_fields.rule, path), fieldpaths.remover(resolved)))
        # Nothing per event can apply: the loop is skipped (events are only counted).
        self.untouched = (
            not self.drop_marketing
            and self.private_mode == "keep"
            and not self.drop_invalid
            and not self.merge_legacy
            and not self.droppers
            and rules.events.include == ("*",)
            and not rules.events.exclude
        )
        as_bytes = set()
        if self.drop_marketing:
            as_bytes.add(views.MARKETING)
        if self.private_mode != "keep":
            as_bytes.add(views.PRIVATE)
        self.view = views.view_class(frozenset(as_bytes))
        droppers = [removal for removal, _ in self.droppers]
        self.fast = fastpath.plan(rules, droppers, self.marketing_removal) if accelerate else None


class Engine:
    """Applies one loaded policy. Safe to share between threads and tasks; one resolution cache per engine.

    accelerate: use the C fast path (policy/_wirefilter.c) for RecordEvents payloads where it
    applies; False runs the Python path alone (the reference; tests compare the two).
    """

    def __init__(self, policy: Policy, cache_size: int = 8192, *, accelerate: bool = True) -> None:
        self.policy = policy
        self._plans = {kind: _KindPlan(rules, accelerate) for kind, rules in policy.kinds.items()}
        # Overrides: plans of their own (the fast path takes them like any kind's rules), by overrides.NAME.
        self._overrides = {o.name: o for o in policy.overrides}
        self._overrides_of: dict[str, tuple[Override, ...]] = {}
        self._override_access: dict[str, Policy] = {}
        self._pinned: Override | None = None
        for o in policy.overrides:
            self._plans[o.key] = _KindPlan(o.rules, accelerate, o.key)
            self._overrides_of[o.kind] = (*self._overrides_of.get(o.kind, ()), o)
            if o.access is not None:  # the kind's access lists, with the kind in every one (see _check_kind)
                opened = {rpc: kinds | {o.kind} for rpc, kinds in policy.access.items()}
                self._override_access[o.name] = dataclasses.replace(policy, access=opened)
        self._resolvers = {kind: self._wire_resolver(kind) for kind in self._plans}
        self._types: LRUCache[tuple[str, str, str], EventType] = LRUCache(maxsize=cache_size)
        self._types_lock = threading.Lock()
        keep = policy.user_metadata
        # Per user metadata payload: its items, the fields withheld from them, the rule.
        self._withheld: dict[str, tuple[str, tuple[str, ...], str]] = {}
        for payload, items, fields, kept, rule in (
            ("user_metadata", "users", _USER_FIELDS, keep.user_fields, "user_fields"),
            ("organization_metadata", "organizations", _ORG_FIELDS, keep.organization_fields, "organization_fields"),
        ):
            names = tuple(f for f in fields if f not in kept)
            self._withheld[payload] = (items, names, f"{keep.rule}.{rule}")
        # User metadata payloads on the C walk, per plan key (unknown fields are a kind's rule).
        users = self._withheld["user_metadata"][1]
        self._user_plans = {
            key: fastpath.user_metadata_plan(users, plan.discard_unknown) if accelerate else None
            for key, plan in self._plans.items()
        }

    # -- access ---------------------------------------------------------------------------

    def check_access(
        self, rpc: str, identifier: pb.Identifier | None, authorization: str | None = None
    ) -> str | Denial:
        """Identifier, kind access (or the matching override's) and credentials presence: the kind, or a denial."""
        override = self.override_for(identifier)
        if override is None or override.access is None:
            return access.check_access(self.policy, rpc, identifier, authorization)
        kind = access.check_identifier(rpc, identifier)
        if isinstance(kind, Denial):
            return kind
        return (
            self._check_kind(rpc, kind, override)
            or access.check_credentials(self.policy, rpc, kind, authorization)
            or kind
        )

    def _check_kind(self, rpc: str, kind: str, override: Override | None) -> Denial | None:
        """access.check_kind, with an override's access list in place of its kind's."""
        if override is None or override.access is None:
            return access.check_kind(self.policy, rpc, kind)
        rule = override.access
        if rpc not in rule.value:
            allowed = ", ".join(sorted(rule.value)) or "no RPC"
            return Denial(
                grpc.StatusCode.PERMISSION_DENIED,
                rule.rule,
                f"{rpc}: the caller's identifier matches {override.key}, whose rule {rule.rule} "
                f"does not allow it (allowed: {allowed})",
            )
        return access.check_kind(self._override_access[override.name], rpc, kind)

    # -- overrides ------------------------------------------------------------------------

    def override_for(self, identifier: pb.Identifier | None) -> Override | None:
        """The override whose match the identifier meets, if any (at most one can: the loader sees to it).

        Once per stream or call, never per event; with no override for the kind it costs a dict lookup.
        """
        kind = None if identifier is None else identifier.WhichOneof("identifier")
        if kind is None or identifier is None:
            return None
        pinned = self._pinned
        if pinned is not None and pinned.kind == kind:
            return pinned
        candidates = self._overrides_of.get(kind)
        if not candidates:
            return None
        fields = getattr(identifier, kind)
        fingerprint: str | None = None
        for override in candidates:
            for name, expected in override.match:
                if name == MATCH_FINGERPRINT:
                    if fingerprint is None:
                        fingerprint = hashlib.sha256(fields.license_key.encode("utf-8")).hexdigest()
                    if not hmac.compare_digest(fingerprint, expected):
                        break
                elif getattr(fields, name) != expected:
                    break
            else:
                return override
        return None

    def pinned(self, name: str) -> Engine:
        """This engine, but every identifier of the override's kind counts as matching override `name`.

        For dry runs (`apply --override`, a case's `override:`) of an override matched on a license
        key fingerprint, whose key a reviewer does not hold. Shares this engine's plans and caches.
        """
        override = self._overrides.get(name)
        if override is None:
            known = ", ".join(self._overrides) or "none"
            raise ValueError(f"the policy has no override {name!r} (it has: {known})")
        twin = copy.copy(self)
        twin._pinned = override
        return twin

    def _admit(self, rpc: str, identifier: pb.Identifier | None, decision: Decision) -> str | None:
        """The identifier's plan key (its kind, or overrides.NAME of the override it matches), or None: denied."""
        kind = access.check_identifier(rpc, identifier)
        if not isinstance(kind, Denial):
            decision.kind = kind
            override = self.override_for(identifier)
            if override is not None:
                decision.override = override.name
            denial = self._check_kind(rpc, kind, override)
            if denial is None:
                return kind if override is None else override.key
            kind = denial
        decision.denial = kind
        return None

    # -- RecordEvents ---------------------------------------------------------------------

    def record_events(
        self, request: pb.RecordEventsRequest, identifier: pb.Identifier | None = None, *, detailed: bool = False
    ) -> Outcome[pb.RecordEventsRequest]:
        """One message of a RecordEvents stream; identifier: the stream's (from its metadata message).

        detailed: accepted for callers written when it changed the record; a decision is the same
        either way (named keys, unknown fields per event, counts), so that counts never depend on it.
        """
        if request.WhichOneof("payload") != "events":
            return self._stream_metadata(RECORD_EVENTS, request, identifier)
        out = self.record_events_bytes(request.SerializeToString(), identifier, detailed=detailed)
        if out.request is None:
            return Outcome(None, out.decision)
        request.Clear()
        request.MergeFromString(out.request)
        return Outcome(request, out.decision)

    def record_events_bytes(
        self, data: Wire, identifier: pb.Identifier | None, *, detailed: bool = False
    ) -> Outcome[bytes]:
        """record_events on the wire form: a serialized RecordEventsRequest in, the bytes that may leave out.

        The fast path for proxies: the request is parsed once, into the kind's view class.
        data: bytes or any bytes-like object (bytearray, memoryview), read as the bytes it holds now.
        Raises google.protobuf.message.DecodeError when the bytes are not a RecordEventsRequest.
        """
        data = _as_bytes(data)
        decision = Decision(RECORD_EVENTS)
        kind = None if identifier is None else self._admit(RECORD_EVENTS, identifier, decision)
        if kind is not None:
            out = self._payload_bytes(data, self._plans[kind], self._resolvers[kind], decision)
            if out is not None:
                return out
        elif identifier is not None:
            return Outcome(None, decision)  # the stream's identifier is refused
        return self._metadata_bytes(data, decision)

    def record_events_admitted(
        self, data: Wire, kind: str, *, detailed: bool = False, override: str | None = None
    ) -> Outcome[bytes]:
        """record_events_bytes for a stream whose identifier check_access admitted, as `kind`, under this engine.

        The same outcome as record_events_bytes(data, that identifier), without judging the identifier
        again for every payload (the stream's identifier does not change): a proxy's per-payload call.
        override: the name of the override the identifier matched (override_for, once per stream), if any.
        A kind the policy does not allow RecordEvents is denied as record_events_bytes denies it.
        """
        return self.admitted_payloads(kind, override=override)(_as_bytes(data))

    def admitted_payloads(self, kind: str, *, override: str | None = None) -> Callable[[bytes], Outcome[bytes]]:
        """record_events_admitted for one stream, as a function of the payload's bytes: what depends only on
        the stream (the kind's access, the override, the plan) is looked up once, not for every payload."""
        key = kind
        denial: Denial | None = None
        if override is None:
            if kind not in self.policy.access[RECORD_EVENTS]:
                denial = access.check_kind(self.policy, RECORD_EVENTS, kind)
        else:
            found = self._overrides[override]
            if found.kind != kind:
                raise ValueError(f"override {override!r} is for {found.kind}, not {kind}")
            key = found.key
            denial = self._check_kind(RECORD_EVENTS, kind, found)
        if denial is not None:

            def denied(data: bytes) -> Outcome[bytes]:
                decision = Decision(RECORD_EVENTS, kind, denial=denial)
                decision.override = override
                return Outcome(None, decision)

            return denied
        payload, plan, resolve = self._payload_bytes, self._plans[key], self._resolvers[key]

        def judge(data: bytes) -> Outcome[bytes]:
            decision = Decision(RECORD_EVENTS, kind)
            decision.override = override
            out = payload(data, plan, resolve, decision)
            return self._metadata_bytes(data, decision) if out is None else out

        return judge

    def _payload_bytes(
        self, data: bytes, plan: _KindPlan, resolve: fastpath.Resolver, decision: Decision
    ) -> Outcome[bytes] | None:
        """A message of an admitted kind's stream, but for a metadata message (None: see _metadata_bytes).
        plan and resolve: the kind's (or the override's)."""
        if plan.fast is not None:
            fast = plan.fast.filter(data, resolve)
            if fast is not None:
                decision.events_in += fast.events_in
                decision.events_out += fast.events_out
                decision.defer(fast.records, fast.counts, fast.dropped_ids)
                decision.unknown_fields = "discarded" if plan.discard_unknown else "kept"
                return Outcome(fast.data, decision)
        return self._payload_view(data, plan, decision, measure_unknown=False)

    def _payload_view(
        self, data: bytes, plan: _KindPlan, decision: Decision, *, measure_unknown: bool
    ) -> Outcome[bytes] | None:
        """The Python path of _payload_bytes: parse into the kind's view, filter, serialize.

        Which events had unknown fields (a record and a count each) takes two sizes per event; a
        payload is measured whole first, and only one that had unknown fields is done again, event
        by event (exporters do not send unknown fields: this is rare).
        """
        view: Any = plan.view.FromString(data)
        payload = view.WhichOneof("payload")
        if payload == "metadata":
            return None
        measure_whole = payload == "events" and plan.discard_unknown and not measure_unknown
        if payload == "events":
            self._filter_events(plan, view.events.events, decision, measure_unknown=measure_unknown)
        before = view.ByteSize() if measure_whole else 0
        self._unknown(plan, view, decision)
        out = view.SerializeToString()
        if measure_whole and len(out) != before:  # something unknown was left out: find its events
            decision.events.clear()
            decision.events_in = decision.events_out = 0
            return self._payload_view(data, plan, decision, measure_unknown=True)
        return Outcome(out, decision)

    def _metadata_bytes(self, data: bytes, decision: Decision) -> Outcome[bytes]:
        """A metadata message, judged by its own identifier, whatever the stream's (rare: once a stream);
        anything else reaching here has no identifier at all (decision: the one to deny)."""
        request = pb.RecordEventsRequest.FromString(data)
        payload = request.WhichOneof("payload")
        if payload != "metadata":  # no metadata before it: the stream protocol's refusal, as the gateway's
            decision.denial = access.before_metadata(RECORD_EVENTS, payload or "a message")
            return Outcome(None, decision)
        out = self._stream_metadata(RECORD_EVENTS, request, None)
        return Outcome(None if out.request is None else out.request.SerializeToString(), out.decision)

    def _stream_metadata(self, rpc: str, request: M, identifier: pb.Identifier | None) -> Outcome[M]:
        """A stream message that is not a payload: the metadata message, judged by its own identifier
        (whatever the stream's), or an empty message, judged by the stream's identifier."""
        decision = Decision(rpc)
        if request.WhichOneof("payload") == "metadata":
            metadata = request.metadata  # type: ignore[attr-defined]
            decision.request_id = metadata.request_id
            identifier = metadata.identifier if metadata.HasField("identifier") else None
        kind = self._admit(rpc, identifier, decision)
        if kind is None:
            return Outcome(None, decision)
        self._unknown(self._plans[kind], request, decision)
        return Outcome(request, decision)

    # -- RecordEvent ----------------------------------------------------------------------

    def record_event(self, request: pb.RecordEventRequest, *, detailed: bool = False) -> Outcome[pb.RecordEventRequest]:
        """The unary RPC: the identifier travels in the request. A removed event leaves no event."""
        decision = Decision(RECORD_EVENT, request_id=request.metadata.request_id)
        decision.denial = access.check_event(request)  # the gateway judges the event before the identifier
        if decision.denial is not None:
            return Outcome(None, decision)
        kind = self._admit(
            RECORD_EVENT, request.metadata.identifier if request.HasField("metadata") else None, decision
        )
        if kind is None:
            return Outcome(None, decision)
        return self._event_of(request, kind, decision)

    def record_event_admitted(
        self, request: pb.RecordEventRequest, kind: str, *, override: str | None = None
    ) -> Outcome[pb.RecordEventRequest]:
        """record_event for a request its caller has checked and admitted already (access.check_event, then
        check_access: the kind, and the override its identifier matched), as a stream's payloads are judged
        (admitted_payloads): the same decision, without judging the request's event and identifier again."""
        decision = Decision(RECORD_EVENT, kind, request_id=request.metadata.request_id)
        decision.override = override
        return self._event_of(request, kind if override is None else self._overrides[override].key, decision)

    def _event_of(
        self, request: pb.RecordEventRequest, kind: str, decision: Decision
    ) -> Outcome[pb.RecordEventRequest]:
        """record_event once its request is admitted; kind: the plan's key (the kind, or overrides.NAME)."""
        plan = self._plans[kind]
        # The same path as RecordEvents: the event as a one-event payload, on the C walk where it applies.
        payload = _events_payload(request.event.SerializeToString())
        if plan.fast is not None:
            fast = plan.fast.filter(payload, self._resolvers[kind])
            if fast is not None:
                return self._event_filtered(request, payload, fast, kind, decision)
        try:
            view: Any = plan.view.FromString(payload)
        except DecodeError:  # one level deeper there than in its own request: past the parser's limit
            decision.denial = access.nested_too_deep(RECORD_EVENT)
            return Outcome(None, decision)
        events = view.events.events
        self._filter_events(plan, events, decision, measure_unknown=True)
        if events:
            self._unknown(plan, view, decision)
            request.event.Clear()
            request.event.MergeFromString(events[0].SerializeToString())
        else:
            decision.denial = self._event_removed(kind, decision, request)
            if decision.denial is not None:
                return Outcome(None, decision)
        self._unknown(plan, request, decision)
        return Outcome(request, decision)

    def _event_filtered(
        self, request: pb.RecordEventRequest, payload: bytes, fast: fastpath.Filtered, key: str, decision: Decision
    ) -> Outcome[pb.RecordEventRequest]:
        """record_event's answer from the C walk over its one-event payload (what the Python path decides)."""
        plan = self._plans[key]
        decision.events_in += fast.events_in
        decision.events_out += fast.events_out
        decision.defer(fast.records, fast.counts, fast.dropped_ids)
        if fast.events_out:
            if fast.data != payload:  # the walk changed the event: it leaves as the walk wrote it
                request.event.CopyFrom(pb.RecordEventsRequest.FromString(fast.data).events.events[0])
        else:
            decision.denial = self._event_removed(key, decision, request)
            if decision.denial is not None:
                return Outcome(None, decision)
        if plan.discard_unknown:
            # The event left the walk without unknown fields at any depth, and nothing else in the request can
            # hold a Struct (test_fastpath checks it): upb's own discard reaches every field left.
            request.DiscardUnknownFields()
            decision.unknown_fields = "discarded"
        else:
            decision.unknown_fields = "kept"
        return Outcome(request, decision)

    def _event_removed(self, key: str, decision: Decision, request: pb.RecordEventRequest) -> Denial | None:
        """RecordEvent's one event removed whole: the request goes on without it, or is refused (see below)."""
        refused = self._invalid_unacknowledged(key, decision, request.event)
        if refused is None:
            request.ClearField("event")
        return refused

    def _invalid_unacknowledged(self, key: str, decision: Decision, event: pb.Event) -> Denial | None:
        """RecordEvent's one event removed as invalid, for a kind whose invalid events the gateway fails:
        refused as the gateway refuses a publish failure (INTERNAL), never answered as a success.
        key: the plan applied (the kind, or overrides.NAME)."""
        plan = self._plans[key]
        if plan.rules.kind in SINGLE_TENANT_KINDS or not decision.events:
            return None
        if decision.events[0].dropped_by != plan.invalid_rule:
            return None
        problem = validity.event_problem(event) or "invalid"
        return Denial(
            grpc.StatusCode.INTERNAL,
            plan.invalid_rule,
            f"{RECORD_EVENT}: the event is invalid ({problem}) and was not published (rule {plan.invalid_rule})",
        )

    # -- acknowledgements -------------------------------------------------------------------

    def acknowledged_removals(self, kind: str, decision: Decision) -> list[str]:
        """The ids of a payload's events removed whole that are acknowledged, as the gateway reports them.

        Removed by the feature filter: acknowledged (the policy's choice; never sent, never retried).
        Removed as invalid (invalid_events: drop): acknowledged for instances, whose invalid events the
        gateway reports as succeeded so that exporters do not retry them forever; not for managed
        services and workspaces, whose invalid events it reports as failed.
        """
        dropped = decision.dropped_event_ids
        if not dropped or kind in SINGLE_TENANT_KINDS:
            return dropped
        plan = self._plans[kind if decision.override is None else self._overrides[decision.override].key]
        if not plan.drop_invalid:
            return dropped
        invalid = plan.invalid_rule
        return [e.event_id for e in decision.events if e.dropped_by is not None and e.dropped_by != invalid]

    # -- PublishInstanceUserMetadata ------------------------------------------------------

    def user_metadata_bytes(self, data: bytes, kind: str, *, override: str | None = None) -> Outcome[bytes] | None:
        """A user metadata payload of a stream admitted as `kind` (with `override`, if it matched one) on the C walk:
        the bytes that may leave and the decision publish_instance_user_metadata takes for the same payload; None
        when the walk does not take it (any other payload, the extension missing, bytes not in its form): parse
        the request and use publish_instance_user_metadata."""
        return self.admitted_user_payloads(kind, override=override)(data)

    def admitted_user_payloads(
        self, kind: str, *, override: str | None = None
    ) -> Callable[[bytes], Outcome[bytes] | None]:
        """user_metadata_bytes for one stream, as a function of the payload's bytes: the plan, the rule and the
        unknown fields' handling are looked up once, not for every payload (as admitted_payloads for events)."""
        key = kind if override is None else self._overrides[override].key
        fast = self._user_plans[key]
        items, names, rule = self._withheld["user_metadata"]
        unknown_fields: Literal["discarded", "kept"] = "discarded" if self._plans[key].discard_unknown else "kept"

        def judge(data: bytes) -> Outcome[bytes] | None:
            got = None if fast is None else fast.filter(data)
            if got is None:
                return None
            out, counts = got  # counts: per withheld field, by position (the plan's table holds more)
            removals = [
                _withheld_removal(rule, items, name, count) for name, count in zip(names, counts, strict=False) if count
            ]
            decision = Decision(PUBLISH_USER_METADATA, kind, removals=removals, unknown_fields=unknown_fields)
            decision.override = override
            return Outcome(out, decision)

        return judge

    def publish_instance_user_metadata(
        self, request: pb.PublishInstanceUserMetadataRequest, identifier: pb.Identifier | None = None
    ) -> Outcome[pb.PublishInstanceUserMetadataRequest]:
        """One message of a PublishInstanceUserMetadata stream; only the policy's fields pass."""
        payload = request.WhichOneof("payload")
        if payload not in ("user_metadata", "organization_metadata"):
            return self._stream_metadata(PUBLISH_USER_METADATA, request, identifier)
        decision = Decision(PUBLISH_USER_METADATA)
        kind = self._admit(PUBLISH_USER_METADATA, identifier, decision)
        if kind is None:
            return Outcome(None, decision)
        plan = self._plans[kind]
        items, names, rule = self._withheld[payload]
        removed = _removed_each(getattr(getattr(request, payload), items), names) if names else []
        self._unknown(plan, request, decision)
        decision.removals.extend(_withheld_removal(rule, items, name, count) for name, count in removed)
        return Outcome(request, decision)

    # -- shared -------------------------------------------------------------------------

    def _unknown(self, plan: _KindPlan, message: Message, decision: Decision) -> None:
        if plan.discard_unknown:
            discard_unknown(message)
            decision.unknown_fields = "discarded"
        else:
            decision.unknown_fields = "kept"

    def event_type(self, kind: str, feature: str, action: str) -> EventType:
        """The cached per-type resolution (also used by `explain`); kind: a plan key (a kind, or overrides.NAME).

        cachetools caches are not thread-safe (an LRU lookup reorders): a lock guards the
        cache. It is taken once per event type per request, not per event.
        """
        key = (kind, feature, action)
        with self._types_lock:
            found = self._types.get(key)
        if found is None:
            found = self._resolve(kind, feature, action)
            with self._types_lock:
                self._types[key] = found
        return found

    def _resolve(self, kind: str, feature: str, action: str) -> EventType:
        plan = self._plans[kind]
        entry = self.policy.allowlist.lookup(feature, action) if plan.private_mode == "allowlist" else None
        dropped_by = plan.rules.events.rejects(feature)
        invalid = validity.type_problem(feature, action)
        keys = None if entry is None else frozenset(key.encode() for key in entry.keys)
        return EventType(dropped_by, invalid, entry, (dropped_by, invalid is not None, keys))

    def _wire_resolver(self, kind: str) -> fastpath.Resolver:
        """What the fast path asks per event type (once per type and payload)."""
        if self._plans[kind].untouched:
            nothing: tuple[str | None, bool, frozenset[bytes] | None] = (None, False, None)
            return lambda feature, action: nothing
        return lambda feature, action: self.event_type(kind, feature, action).wire

    def _filter_events(self, plan: _KindPlan, events: Any, decision: Decision, *, measure_unknown: bool) -> None:
        """The hot loop over view events: each once; only events something happens to get a record.

        Written for speed (locals, shared Removal objects, no allocation for an event
        nothing happens to): it runs once per event on the sidecar's path.
        """
        count = len(events)
        decision.events_in += count
        if plan.untouched and not measure_unknown:
            decision.events_out += count
            return
        kind = plan.key
        memo: dict[tuple[str, str], EventType] = {}
        dropped: list[int] = []
        records = decision.events
        drop_marketing = plan.drop_marketing
        marketing_removal = plan.marketing_removal
        filter_private = plan.private_mode != "keep"
        merge_legacy = plan.merge_legacy
        drop_invalid = plan.drop_invalid
        droppers = plan.droppers
        measure_unknown = measure_unknown and plan.discard_unknown
        unknown_removal = plan.unknown_removal
        private = self._private
        for index, event in enumerate(events):
            feature = event.feature
            action = event.action
            etype = memo.get((feature, action))
            if etype is None:
                etype = memo[(feature, action)] = self.event_type(kind, feature, action)
            dropped_by = etype.dropped_by
            if (
                dropped_by is None
                and drop_invalid
                and (etype.invalid is not None or not event.id or not event.HasField("timestamp"))
            ):
                dropped_by = plan.invalid_rule
            if dropped_by is not None:
                records.append(EventRecord(index, event.id, feature, action, [], dropped_by))
                dropped.append(index)
                continue
            removals: list[Removal] | None = None
            if drop_marketing and event.HasField("marketing_tracking"):
                event.ClearField("marketing_tracking")
                removals = [marketing_removal]
            params = event.parameters
            if filter_private and params.HasField("private_metadata"):
                removed = private(plan, etype.entry, params)
                if removed:
                    removals = removed if removals is None else removals + removed
            if merge_legacy and params.legacy_metadata:
                legacy = params.legacy_metadata
                names = tuple(legacy)
                for name in names:
                    params.metadata[name] = float(legacy[name])
                params.ClearField("legacy_metadata")
                merged = Removal(plan.legacy_rule, "parameters.legacy_metadata", names, "merged")
                removals = [merged] if removals is None else [*removals, merged]
            for dropped_field, remove in droppers:
                if remove(event):
                    removals = [*(removals or ()), dropped_field]
            if measure_unknown:  # per event, so that the record and the counts say which events had them
                before = event.ByteSize()
                discard_unknown(event)
                if event.ByteSize() != before:
                    removals = [*(removals or ()), unknown_removal]
            if removals is not None:
                records.append(EventRecord(index, event.id, feature, action, removals))
        for index in reversed(dropped):
            del events[index]
        decision.events_out += len(events)

    @staticmethod
    def _private(plan: _KindPlan, entry: AllowlistEntry | None, params: Any) -> list[Removal]:
        """private_metadata (a RawStruct in the view) by mode: drop it, or keep allowlisted string values.

        Key names in the record are sorted, so that records do not depend on map order.
        """
        path = fastpath.PRIVATE_PATH
        raw = params.private_metadata.SerializeToString()  # a RawStruct serializes as the Struct it stands for
        if entry is None or plan.private_mode == "drop":
            names = tuple(sorted(struct_pb2.Struct.FromString(raw).fields))  # counted 1 each, as keys removed
            params.ClearField("private_metadata")
            return [Removal(plan.private_rule, path, names)]
        removals = []
        struct = struct_pb2.Struct.FromString(raw)
        fields = struct.fields
        allowed = entry.keys
        if not allowed.issuperset(fields):
            gone = tuple(sorted(name for name in fields if name not in allowed))
            for name in gone:
                del fields[name]
            removals.append(Removal(plan.private_rule, path, gone))
        wrong = tuple(sorted(name for name in fields if fields[name].WhichOneof("kind") != "string_value"))
        if wrong:
            if plan.replace_non_string:
                for name in wrong:
                    value = fields[name]
                    replacement = plan.replacement_for(value.WhichOneof("kind"))
                    value.Clear()  # nothing of the old value survives, unknown fields included
                    value.string_value = replacement
                removals.append(Removal(plan.non_string_rule, path, wrong, "replaced"))
            else:
                for name in wrong:
                    del fields[name]
                removals.append(Removal(plan.non_string_rule, path, wrong))
        if plan.discard_unknown:
            discard_unknown(struct)
        params.private_metadata.Clear()
        params.private_metadata.MergeFromString(struct.SerializeToString())
        return removals


@functools.lru_cache(maxsize=256)
def _withheld_removal(rule: str, items: str, name: str, count: int) -> Removal:
    """The record of field `name` withheld from `count` of a payload's `items`. Removals are immutable, so equal
    ones are shared: a stream's payloads of one size mostly withhold the same fields from as many items."""
    return Removal(rule, f"{items}.{name}", (name,) * count)


def _removed_each(items: Iterable[Message], names: tuple[str, ...]) -> list[tuple[str, int]]:
    """Remove the fields `names` from each item: (field, items that had it set), in the order of `names` (the
    policy's field order: the order the C walk counts them in)."""
    removed = dict.fromkeys(names, 0)
    for item in items:
        for name in names:
            if getattr(item, name):  # proto3 scalars and repeated fields: falsy when not set
                item.ClearField(name)
                removed[name] += 1
    return [(name, count) for name, count in removed.items() if count]


def _as_bytes(data: Wire) -> bytes:
    """A payload as bytes, whatever buffer holds it: both paths read the same bytes, and the fast path's
    records, which point into them, never see them change. Not bytes-like (a str): TypeError."""
    return data if isinstance(data, bytes) else bytes(memoryview(data))


def _events_payload(event: bytes) -> bytes:
    """A serialized RecordEventsRequest whose events payload holds one serialized Event."""
    inner = b"\x0a" + _varint(len(event)) + event
    return b"\x12" + _varint(len(inner)) + inner


def _varint(value: int) -> bytes:
    if value < 0x4000:  # an event's length, nearly always: one or two bytes, without the loop
        return bytes((value,)) if value < 0x80 else bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
