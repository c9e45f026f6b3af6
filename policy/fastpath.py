"""The C fast path for RecordEvents payloads (policy/_wirefilter.c): its tables and its records.

A kind's rules become a `_wirefilter.Plan`: one table per message type reachable from
RecordEventsRequest, built from the generated descriptors (field number, wire type,
presence, oneof, map), with the kind's rules marked on the fields they govern. The C
walk copies, skips or rewrites fields in one pass over the bytes and reports the
removals per rule and the ids of the events removed whole at once, and per event
something happened to a compact record that becomes the Python engine's EventRecord
only when the decision's events are read (`Decision.defer`).

The fast path takes only what it fully understands and says None otherwise; the
engine then runs its Python path (the reference), so both always agree. A kind whose
rules it cannot express (field drops inside what other rules govern, drops on a path
that is ambiguous, ...) gets no Plan at all. The extension is optional at build time:
without a C compiler everything runs on the Python path, only slower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from telemetry_guard.policy import markers
from telemetry_guard.policy.decision import EventRecord, Removal
from telemetry_guard.policy.model import KindRules
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

try:
    from telemetry_guard.policy import _wirefilter
except ImportError:  # built without a C compiler: the Python path serves alone
    _wirefilter = None  # type: ignore[assignment]

AVAILABLE = _wirefilter is not None

# Field kinds, flags and roles: the numbering of _wirefilter.c.
T_VARINT, T_FIXED64, T_STRING, T_BYTES, T_MESSAGE, T_FIXED32 = range(6)
F_REPEATED, F_IMPLICIT, F_MAP, F_INT32, F_FLOAT = 1, 2, 4, 8, 16
(R_NONE, R_FALLBACK, R_EVENT, R_ID, R_FEATURE, R_ACTION, R_TIMESTAMP, R_MARKETING, R_PRIVATE, R_LEGACY, R_ITEM) = range(
    11
)
MODES = {"keep": 0, "drop": 1, "allowlist": 2}
REC_MARKETING, REC_PRIVATE_WHOLE, REC_UNKNOWN = 1, 2, 4

PRIVATE_PATH = "parameters.private_metadata"  # the path decision records name (both engine paths)
_VALUE_SLOTS = 7  # replacements per google.protobuf.Value kind: no kind (0), then fields 1-6 (_wirefilter.c)
UNKNOWN_PATH = "(unknown fields)"  # what a record names for the unknown fields left out of an event

_FD = FieldDescriptor
_TYPES = {
    _FD.TYPE_DOUBLE: T_FIXED64,
    _FD.TYPE_FLOAT: T_FIXED32,
    _FD.TYPE_INT64: T_VARINT,
    _FD.TYPE_UINT64: T_VARINT,
    _FD.TYPE_INT32: T_VARINT,
    _FD.TYPE_FIXED64: T_FIXED64,
    _FD.TYPE_FIXED32: T_FIXED32,
    _FD.TYPE_BOOL: T_VARINT,
    _FD.TYPE_STRING: T_STRING,
    _FD.TYPE_MESSAGE: T_MESSAGE,
    _FD.TYPE_BYTES: T_BYTES,
    _FD.TYPE_UINT32: T_VARINT,
    _FD.TYPE_ENUM: T_VARINT,
    _FD.TYPE_SFIXED32: T_FIXED32,
    _FD.TYPE_SFIXED64: T_FIXED64,
    _FD.TYPE_SINT32: T_VARINT,
    _FD.TYPE_SINT64: T_VARINT,
}

# Varints a parser reads as 32 bits (2**32 is 0 to it), and the types whose -0.0 is "not set" as 0.0 is.
_INT32 = frozenset({_FD.TYPE_INT32, _FD.TYPE_UINT32, _FD.TYPE_SINT32, _FD.TYPE_ENUM})
_FLOAT = frozenset({_FD.TYPE_FLOAT, _FD.TYPE_DOUBLE})

_EVENT = pb.Event.DESCRIPTOR
_ROLES = {
    (pb.RecordEventsRequest.DESCRIPTOR.full_name, "metadata"): R_FALLBACK,
    (pb.RecordEventsRequest.EventsPayload.DESCRIPTOR.full_name, "events"): R_EVENT,
    (_EVENT.full_name, "id"): R_ID,
    (_EVENT.full_name, "feature"): R_FEATURE,
    (_EVENT.full_name, "action"): R_ACTION,
    (_EVENT.full_name, "timestamp"): R_TIMESTAMP,
    (_EVENT.full_name, "marketing_tracking"): R_MARKETING,
    (pb.EventParameters.DESCRIPTOR.full_name, "private_metadata"): R_PRIVATE,
    (pb.EventParameters.DESCRIPTOR.full_name, "legacy_metadata"): R_LEGACY,
}
# Fields other rules govern: a drop_fields path on, inside or above one keeps the kind on the Python path.
_GOVERNED = ("marketing_tracking", PRIVATE_PATH, "parameters.legacy_metadata", "id", "timestamp", "feature", "action")

FieldSpec = tuple[int, int, int, int, int, int, int]  # number, type, flags, role, oneof, drop bit, child
Resolver = Callable[[str, str], tuple[str | None, bool, frozenset[bytes] | None]]


def _messages(root: Descriptor, roles: dict[tuple[str, str], int]) -> list[Descriptor]:
    """Every message type reachable from root, root first; not through a field the walk leaves to Python
    (R_FALLBACK), whose child it never reads."""
    found: dict[str, Descriptor] = {}
    todo = [root]
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name in found:
            continue
        found[descriptor.full_name] = descriptor
        todo.extend(
            fd.message_type
            for fd in descriptor.fields
            if fd.message_type is not None and roles.get((descriptor.full_name, fd.name)) != R_FALLBACK
        )
    return list(found.values())


def _tables(
    drops: dict[tuple[str, str], int],
    root: Descriptor = pb.RecordEventsRequest.DESCRIPTOR,
    roles: dict[tuple[str, str], int] = _ROLES,
) -> tuple[list[tuple[list[FieldSpec], bool, bool]], int, int]:
    """(messages, root index, Value index) for the C Plan; drops: (message, field) -> rule bit; roles:
    (message, field) -> role. The Value index is 0 where no Value is reachable (nothing reads it then)."""
    messages = _messages(root, roles)
    index = {d.full_name: i for i, d in enumerate(messages)}
    tables = []
    for descriptor in messages:
        oneofs = {o.name: i for i, o in enumerate(descriptor.oneofs) if not o.name.startswith("_")}
        fields: list[FieldSpec] = []
        for fd in descriptor.fields:
            kind = _TYPES[fd.type]  # groups (TYPE_GROUP) are not in this proto: a KeyError says so
            flags = 0
            if fd.is_repeated:
                flags |= F_REPEATED
                if kind not in (T_STRING, T_BYTES, T_MESSAGE):
                    raise ValueError(f"{fd.full_name}: repeated scalars (packed) are not in the fast path's tables")
            if not fd.has_presence:
                flags |= F_IMPLICIT
            if fd.type in _INT32:
                flags |= F_INT32
            elif fd.type in _FLOAT:
                flags |= F_FLOAT
            child = -1
            key = (descriptor.full_name, fd.name)
            if fd.message_type is not None:
                child = index.get(fd.message_type.full_name, 0)  # not in the tables: R_FALLBACK, never walked
                if fd.message_type.GetOptions().map_entry:
                    flags |= F_MAP
                    if fd.message_type.fields_by_name["key"].type != _FD.TYPE_STRING:
                        raise ValueError(f"{fd.full_name}: maps with non-string keys are not in the fast path's tables")
            oneof = oneofs.get(fd.containing_oneof.name, -1) if fd.containing_oneof is not None else -1
            fields.append((fd.number, kind, flags, roles.get(key, R_NONE), oneof, drops.get(key, -1), child))
        strict = bool(descriptor.GetOptions().map_entry)
        tables.append((fields, strict, _clean(descriptor, drops, roles)))
    return tables, 0, index.get(struct_pb2.Value.DESCRIPTOR.full_name, 0)


def _clean(
    descriptor: Descriptor,
    drops: dict[tuple[str, str], int],
    roles: dict[tuple[str, str], int] = _ROLES,
    seen: frozenset[str] = frozenset(),
) -> bool:
    """Nothing inside (at any depth) is dropped or read by a rule: the walk may copy it whole."""
    if descriptor.full_name in seen:
        return True  # a cycle (Struct, Value, ListValue) adds nothing new
    for fd in descriptor.fields:
        key = (descriptor.full_name, fd.name)
        if key in roles or key in drops:
            return False
        if fd.message_type is not None and not _clean(fd.message_type, drops, roles, seen | {descriptor.full_name}):
            return False
    return True


def _paths_to(descriptor: Descriptor, root: Descriptor = _EVENT, seen: tuple[str, ...] = ()) -> int:
    """How many paths lead from Event to a message type (google.protobuf types not entered)."""
    if root.full_name == descriptor.full_name:
        return 1
    if root.full_name.startswith("google.protobuf.") or root.full_name in seen:
        return 0
    return sum(
        _paths_to(descriptor, fd.message_type, (*seen, root.full_name))
        for fd in root.fields
        if fd.message_type is not None
    )


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def _drop_bits(paths: Iterable[str]) -> dict[tuple[str, str], int] | None:
    """drop_fields paths as (message, field) -> bit, or None when the fast path cannot express them exactly."""
    from telemetry_guard.policy import fieldpaths

    paths = tuple(paths)
    if len(paths) > 64:
        return None
    bits: dict[tuple[str, str], int] = {}
    for bit, path in enumerate(paths):
        resolved = fieldpaths.resolve(path)
        if isinstance(resolved, str):
            raise ValueError(resolved)
        last = resolved[-1]
        # Overlapping drops record what the Python engine's in-order removers see: not mirrored here.
        if any(_related(path, other) for other in paths[:bit]) or any(_related(path, g) for g in _GOVERNED):
            return None
        parent = last.containing_type
        if parent is None or _paths_to(parent) != 1:
            return None  # the same message type elsewhere in Event would be dropped there too
        bits[(parent.full_name, last.name)] = bit
    return bits


def _replacements(rules: KindRules) -> tuple[bytes, ...]:
    """What replaces a non-string value, indexed by the Value field its kind is in (0: no kind set)."""
    if max(markers.VALUE_KINDS) >= _VALUE_SLOTS:
        raise ValueError("google.protobuf.Value has a kind the fast path's table has no slot for")
    pm = rules.private_metadata
    return tuple(pm.replacement_for(markers.VALUE_KINDS.get(n)).encode() for n in range(_VALUE_SLOTS))


class Filtered(NamedTuple):
    """A payload through the fast path: the bytes that leave and the makings of its decision."""

    data: bytes
    events_in: int
    events_out: int
    records: Callable[[], list[EventRecord]]  # built when the decision's events are first read
    counts: dict[str, int]  # Decision.counts() of those records
    dropped_ids: list[str]  # the ids of the events removed whole, in order


class FastPlan:
    """A kind's rules for the C walk, and the way back from its records to EventRecords."""

    def __init__(self, rules: KindRules, droppers: list[Removal], marketing: Removal) -> None:
        bits = _drop_bits(rules.drop_fields.value)
        if bits is None or _wirefilter is None:
            raise ValueError("not expressible on the fast path")
        pm = rules.private_metadata
        messages, root, value = _tables(bits)
        self._plan = _wirefilter.Plan(
            messages,
            root,
            value,
            drop_marketing=rules.marketing_tracking.value == "drop",
            private_mode=MODES[pm.mode],
            merge_legacy=rules.legacy_metadata.value == "merge",
            discard_unknown=rules.unknown_fields.value == "discard",
            drop_invalid=rules.invalid_events.value == "drop",
            replacement=_replacements(rules) if pm.non_string != "drop" else None,
            invalid_rule=rules.invalid_events.rule,
        )
        self._droppers = droppers
        self._marketing = marketing
        self._private_whole = Removal(pm.rule, PRIVATE_PATH)  # an empty one: no key to name
        self._unknown = Removal(rules.unknown_fields.rule, UNKNOWN_PATH)
        self._private_rule = pm.rule
        self._non_string_rule = pm.non_string_rule
        self._non_string_action: Any = "removed" if pm.non_string == "drop" else "replaced"

    def filter(self, data: bytes, resolve: Resolver) -> Filtered | None:
        """The bytes that may leave and what to put in the decision, or None: use the Python path."""
        got = self._plan.filter(data, resolve)
        if got is None:
            return None
        out, events_in, events_out, raw, totals = got
        return Filtered(
            out, events_in, events_out, lambda: [self._record(*r) for r in raw.build()], *self._totals(totals)
        )

    def _totals(self, totals: _wirefilter.Totals) -> tuple[dict[str, int], list[str]]:
        """Decision.counts() of the records, and the ids of the events removed whole, without the records."""
        marketing, private_whole, gone, wrong, unknown, drops, dropped_ids, dropped_rules = totals
        counts = dict(dropped_rules)
        for rule, count in (
            (self._marketing.rule, marketing),
            (self._private_rule, private_whole + gone),
            (self._non_string_rule, wrong),
        ):
            if count:
                counts[rule] = counts.get(rule, 0) + count
        for bit, removal in enumerate(self._droppers):
            if drops[bit]:
                counts[removal.rule] = counts.get(removal.rule, 0) + drops[bit]
        if unknown:
            counts[self._unknown.rule] = counts.get(self._unknown.rule, 0) + unknown
        return counts, dropped_ids

    def _record(
        self,
        index: int,
        event_id: str,
        feature: str,
        action: str,
        dropped_by: str | None,
        flags: int,
        gone: tuple[str, ...] | None,
        wrong: tuple[str, ...] | None,
        drops: int,
    ) -> EventRecord:
        """The EventRecord the Python engine writes for the same event, removals in its order."""
        if dropped_by is not None:
            return EventRecord(index, event_id, feature, action, [], dropped_by)
        removals = []
        if flags & REC_MARKETING:
            removals.append(self._marketing)
        if gone:  # keys removed from an allowlisted private_metadata, or the keys of one removed whole
            removals.append(Removal(self._private_rule, PRIVATE_PATH, tuple(sorted(gone))))
        elif flags & REC_PRIVATE_WHOLE:
            removals.append(self._private_whole)
        if wrong:
            removals.append(Removal(self._non_string_rule, PRIVATE_PATH, tuple(sorted(wrong)), self._non_string_action))
        if drops:
            removals.extend(removal for bit, removal in enumerate(self._droppers) if drops >> bit & 1)
        if flags & REC_UNKNOWN:
            removals.append(self._unknown)
        return EventRecord(index, event_id, feature, action, removals)


def plan(rules: KindRules, droppers: list[Removal], marketing: Removal) -> FastPlan | None:
    """The kind's FastPlan, or None when the extension is missing or the rules are beyond it."""
    try:
        return FastPlan(rules, droppers, marketing)
    except ValueError:
        return None


# PublishInstanceUserMetadata: a user metadata payload on the walk; the stream's metadata message and
# organization payloads (repeated int64 user_ids: packed scalars are not in the tables) stay with Python.
_PUBLISH = pb.PublishInstanceUserMetadataRequest.DESCRIPTOR
_USER_ROLES = {
    (_PUBLISH.full_name, "metadata"): R_FALLBACK,
    (_PUBLISH.full_name, "organization_metadata"): R_FALLBACK,
    (pb.PublishInstanceUserMetadataRequest.UserMetadataPayload.DESCRIPTOR.full_name, "users"): R_ITEM,
}


def _no_event_types(feature: str, action: str) -> tuple[str | None, bool, frozenset[bytes] | None]:
    raise RuntimeError("a user metadata payload has no events")


class UserMetadataPlan:
    """A kind's user metadata rules on the C walk: the withheld fields of each user removed, and counted once
    per user that had them set (as the Python engine counts them), unknown fields discarded where the kind
    discards them."""

    def __init__(self, withheld: tuple[str, ...], discard_unknown: bool) -> None:
        if _wirefilter is None:
            raise ValueError("not expressible on the fast path")
        user = pb.InstanceUserMetadata.DESCRIPTOR.full_name
        drops = {(user, name): bit for bit, name in enumerate(withheld)}
        messages, root, value = _tables(drops, _PUBLISH, _USER_ROLES)
        self._plan = _wirefilter.Plan(
            messages,
            root,
            value,
            drop_marketing=False,
            private_mode=MODES["keep"],
            merge_legacy=False,
            discard_unknown=discard_unknown,
            drop_invalid=False,
            replacement=None,
            invalid_rule="",
        )

    def filter(self, data: bytes) -> tuple[bytes, tuple[int, ...]] | None:
        """(the bytes that may leave, how many users had each withheld field: by its position in `withheld`, zip
        them), or None: use the Python path (a metadata or organization payload, or bytes not in the form the walk
        takes)."""
        got = self._plan.filter(data, _no_event_types)
        if got is None:
            return None
        out, _, _, _, totals = got
        return out, totals[5]  # the drops of each drop_fields bit: here, each withheld field


def user_metadata_plan(withheld: tuple[str, ...], discard_unknown: bool) -> UserMetadataPlan | None:
    """The UserMetadataPlan, or None when the extension is missing."""
    try:
        return UserMetadataPlan(withheld, discard_unknown)
    except ValueError:
        return None
