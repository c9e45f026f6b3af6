"""What the engine decided about one request: a denial, or what was removed and why.

A record names rules, field paths, private_metadata key names and counts, never a
removed value, so it can go to an audit log. Key names can themselves say something
about the data, so `to_dict(with_keys=False)` leaves them out (the default for logs
above debug level).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

Action = Literal["removed", "replaced", "merged"]

NAME_LIMIT = 128


def clip(text: str, limit: int = NAME_LIMIT) -> str:
    """An id or name as written to a record or log: bounded (an invalid name or id can be huge).

    Records keep the exact text (acknowledgements need the exact id); only what is written is clipped.
    """
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


@dataclass(frozen=True, slots=True)
class Denial:
    """The request may not pass at all: a gRPC status and the rule that refused it.

    message: what the caller gets. reason: for the audit log only, where the message is the
    gateway's own short text (exporters are written against it) and says less than the record should.
    """

    code: grpc.StatusCode
    rule: str
    message: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


@dataclass(frozen=True, slots=True)
class Removal:
    """One rule taking something out of a message (or rewriting it, for merged/replaced)."""

    rule: str
    path: str  # field path inside the message, e.g. parameters.private_metadata
    keys: tuple[str, ...] = ()  # private_metadata keys or field names, when the path is a map or struct
    action: Action = "removed"

    @property
    def count(self) -> int:
        return len(self.keys) or 1


@dataclass(slots=True)
class EventRecord:
    """What happened to one event of a request (only events something happened to are recorded)."""

    index: int  # position in the request as received
    event_id: str
    feature: str
    action: str
    removals: list[Removal] = field(default_factory=list)
    dropped_by: str | None = None  # rule that removed the whole event


class Decision:
    """What the engine decided about one request message.

    The per-event records of a payload filtered on the C fast path are built only when
    `events` is first read (most callers need only `counts()` and `dropped_event_ids`,
    which are known without them): see `defer`.
    """

    __slots__ = (
        "_events",
        "_later",
        "_later_counts",
        "_later_dropped",
        "denial",
        "events_in",
        "events_out",
        "kind",
        "override",
        "removals",
        "request_id",
        "rpc",
        "unknown_fields",
    )

    def __init__(
        self,
        rpc: str,
        kind: str | None = None,
        request_id: str = "",
        denial: Denial | None = None,
        events: list[EventRecord] | None = None,
        removals: list[Removal] | None = None,  # outside events (user metadata, unknown fields)
        unknown_fields: Literal["discarded", "kept", ""] = "",
        events_in: int = 0,
        events_out: int = 0,
    ) -> None:
        self.rpc = rpc
        self.kind = kind
        self.override: str | None = None  # the override whose rules applied (overrides.NAME), if any
        self.request_id = request_id
        self.denial = denial
        self._events = [] if events is None else events
        self.removals = [] if removals is None else removals
        self.unknown_fields = unknown_fields
        self.events_in = events_in
        self.events_out = events_out
        self._later: Callable[[], list[EventRecord]] | None = None
        self._later_counts: dict[str, int] = {}
        self._later_dropped: list[str] = []

    @property
    def events(self) -> list[EventRecord]:
        """One record per event something happened to, in the order of the request."""
        if self._later is not None:
            later, self._later = self._later, None
            self._events.extend(later())
            self._later_counts, self._later_dropped = {}, []
        return self._events

    def defer(self, records: Callable[[], list[EventRecord]], counts: dict[str, int], dropped: list[str]) -> None:
        """Records to be appended when first read; their counts() and dropped ids, known now."""
        if self._later is not None:
            self.events  # noqa: B018 (one pending batch at a time: an earlier one is built first)
        self._later, self._later_counts, self._later_dropped = records, counts, dropped

    @property
    def dropped_event_ids(self) -> list[str]:
        if not self._events:
            return list(self._later_dropped)
        return [e.event_id for e in self._events if e.dropped_by is not None] + self._later_dropped

    def counts(self) -> dict[str, int]:
        """Removals per rule: whole events count 1, private_metadata keys 1 each. Once per message: kept lean."""
        if not self._events and not self.removals:
            return dict(self._later_counts)  # a payload of the fast path whose records are not built yet
        counts: dict[str, int] = {}
        get = counts.get
        for event in self._events:
            if event.dropped_by is not None:
                counts[event.dropped_by] = get(event.dropped_by, 0) + 1
            for removal in event.removals:
                counts[removal.rule] = get(removal.rule, 0) + (len(removal.keys) or 1)
        for rule, count in self._later_counts.items():
            counts[rule] = get(rule, 0) + count
        for removal in self.removals:
            counts[removal.rule] = get(removal.rule, 0) + (len(removal.keys) or 1)
        return counts

    def _fields(self) -> tuple[Any, ...]:
        return (
            self.rpc,
            self.kind,
            self.request_id,
            self.denial,
            self.events,
            self.removals,
            self.unknown_fields,
            self.events_in,
            self.events_out,
            self.override,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, as the dataclass it replaces

    def __repr__(self) -> str:
        names = ("rpc", "kind", "request_id", "denial", "events", "removals", "unknown_fields")
        shown = ", ".join(f"{n}={v!r}" for n, v in zip(names, self._fields(), strict=False))
        return f"Decision({shown}, events_in={self.events_in}, events_out={self.events_out})"

    def fields(self, counts: dict[str, int] | None = None) -> dict[str, Any]:
        """What every record of this decision says of it (the audit line, the CLI's summary): the events in
        and out, removals per rule, the ids removed whole (clipped), and unknown_fields when it applies.

        counts: counts(), when the caller has it already.
        """
        dropped = self.dropped_event_ids
        out: dict[str, Any] = {
            "events_in": self.events_in,
            "events_out": self.events_out,
            "removed_per_rule": self.counts() if counts is None else counts,
            "dropped_event_ids": [clip(i) for i in dropped] if dropped else dropped,
        }
        if self.unknown_fields:
            out["unknown_fields"] = self.unknown_fields
        return out

    def to_dict(self, with_keys: bool = False) -> dict[str, Any]:
        """A JSON-ready summary for audit logs; key names only when with_keys."""

        def removal(r: Removal) -> dict[str, Any]:
            out: dict[str, Any] = {"rule": r.rule, "path": r.path, "action": r.action, "count": r.count}
            if with_keys and r.keys:
                out["keys"] = list(r.keys)
            return out

        out: dict[str, Any] = {"rpc": self.rpc, "kind": self.kind, "request_id": self.request_id}
        if self.override is not None:
            out["override"] = self.override
        if self.denial is not None:
            out["denial"] = {"code": self.denial.code.name, "rule": self.denial.rule, "message": self.denial.message}
            if self.denial.reason:
                out["denial"]["reason"] = self.denial.reason
        out.update(self.fields())
        out["events"] = [self._event(e, removal) for e in self.events]
        if self.removals:
            out["removals"] = [removal(r) for r in self.removals]
        if self.unknown_fields:
            out["unknown_fields"] = out.pop("unknown_fields")  # last, where the summary has always had it
        return out

    @staticmethod
    def _event(event: EventRecord, removal: Callable[[Removal], dict[str, Any]]) -> dict[str, Any]:
        """An event's entry. An event removed whole keeps only its id: its feature and action left with it."""
        if event.dropped_by is not None:
            return {"index": event.index, "id": clip(event.event_id), "dropped_by": event.dropped_by}
        return {
            "index": event.index,
            "id": clip(event.event_id),
            "feature": clip(event.feature),
            "action": clip(event.action),
            "removals": [removal(r) for r in event.removals],
        }
