"""What a shadow roll-out did to the traffic, added up from the sidecar's audit lines.

The sidecar run with --shadow-policy writes, among its JSON log lines, `shadow_summary` (per call:
messages and events compared, messages that differ), `shadow_difference` (per message that
differs: direction, area, rule, count), `shadow_refusal` (per call or message refused under one
policy and not the other) and, at --log-level debug, `shadow_keys` (key names). Every other line
is skipped, so a whole log (or several, from several workers or pods) can be read as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RECORDS = ("shadow_summary", "shadow_difference", "shadow_refusal", "shadow_keys")


def _int(value: Any) -> int:
    """A count from a log line; anything else (a line edited or cut short) counts 0."""
    return value if type(value) is int and value >= 0 else 0


def _entries(value: Any) -> list[dict[str, Any]]:
    return [d for d in value if isinstance(d, dict)] if isinstance(value, list) else []


@dataclass
class DifferenceRow:
    """Things one policy removes and the other lets leave, added up for one group."""

    direction: str
    rpc: str
    kind: str
    area: str
    rule: str
    count: int = 0
    messages: int = 0
    keys: set[str] = field(default_factory=set)


@dataclass
class RefusalRow:
    rpc: str
    kind: str
    in_force: str
    candidate: str
    rule: str
    times: int = 0


@dataclass
class ShadowReport:
    """The totals of one or more logs."""

    sources: list[str]
    policies: dict[tuple[str, str], int] = field(default_factory=dict)  # (in force, candidate) sha256 -> messages
    calls: int = 0
    compared_messages: int = 0
    compared_events: int = 0
    differing_messages: int = 0
    first: str = ""
    last: str = ""
    differences: dict[tuple[str, ...], DifferenceRow] = field(default_factory=dict)
    refusals: dict[tuple[str, ...], RefusalRow] = field(default_factory=dict)
    records: int = 0
    with_keys: bool = False

    @property
    def empty(self) -> bool:
        return self.records == 0

    def rows(self, direction: str) -> list[DifferenceRow]:
        found = [row for row in self.differences.values() if row.direction == direction]
        return sorted(found, key=lambda r: (-r.count, r.rpc, r.kind, r.area, r.rule))

    def refusal_rows(self) -> list[RefusalRow]:
        return sorted(self.refusals.values(), key=lambda r: (-r.times, r.rpc, r.kind, r.in_force, r.candidate))

    @property
    def widening(self) -> bool:
        """Anything the candidate would let leave that the policy in force stops."""
        return bool(self.rows("candidate_keeps")) or any(r.candidate == "OK" for r in self.refusals.values())

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("audit")
        if kind not in RECORDS:
            return
        self.records += 1
        stamp = str(record.get("time", ""))
        if stamp:
            self.first = min(self.first, stamp) if self.first else stamp
            self.last = max(self.last, stamp)
        rpc, who = str(record.get("rpc", "")), str(record.get("kind") or "none")
        if kind == "shadow_summary":
            messages = _int(record.get("compared_messages"))
            self.calls += 1
            self.compared_messages += messages
            self.compared_events += _int(record.get("compared_events"))
            self.differing_messages += _int(record.get("differing_messages"))
            pair = (str(record.get("policy_sha256", "")), str(record.get("candidate_sha256", "")))
            self.policies[pair] = self.policies.get(pair, 0) + messages
        elif kind == "shadow_difference":
            for d in _entries(record.get("differences")):
                row = self._row(d, rpc, who)
                row.count += _int(d.get("count"))
                row.messages += 1
        elif kind == "shadow_keys":
            if self.with_keys:
                for d in _entries(record.get("differences")):
                    keys = d.get("keys")
                    self._row(d, rpc, who).keys.update(str(k) for k in (keys if isinstance(keys, list) else ()))
        else:
            in_force, candidate = str(record.get("in_force", "")), str(record.get("candidate", ""))
            rule = str(record.get("candidate_rule") or record.get("in_force_rule") or "")
            key = (rpc, who, in_force, candidate, rule)
            found = self.refusals.setdefault(key, RefusalRow(*key))
            found.times += 1

    def _row(self, d: dict[str, Any], rpc: str, kind: str) -> DifferenceRow:
        key = (str(d.get("direction", "")), rpc, kind, str(d.get("area", "")), str(d.get("rule", "")))
        return self.differences.setdefault(key, DifferenceRow(*key))


def read(sources: Iterable[tuple[str, Iterable[str]]], *, with_keys: bool = False) -> ShadowReport:
    """Add up the shadow records of (name, lines) sources; lines that are not JSON objects are skipped."""
    named = list(sources)
    report = ShadowReport([name for name, _ in named], with_keys=with_keys)
    for _, lines in named:
        for line in lines:
            if '"shadow_' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                report.add(record)
    return report
