"""What one request message would lose or keep under another policy: two decisions compared.

A shadow policy (`telemetry-guard serve --shadow-policy`) judges the same message as the policy
in force; `compare` says where the two disagree about what leaves, item by item:

- an event removed whole by one and not by the other (area "event", 1 per event);
- a field of an event removed by one and not by the other (area: its path, 1 per event);
- a private_metadata key (area "parameters.private_metadata", 1 per key; a value replaced by a
  fixed string counts as removed: the value does not leave);
- unknown fields of an event (area "(unknown fields)", detailed decisions only);
- outside events: user-metadata fields and the like (area: the removal's path, 1 per removal).

Legacy metadata merged into metadata is not a difference: its values leave either way.
Direction "candidate_removes": leaves under the policy in force, removed by the candidate (the
rule is the candidate's); "candidate_keeps": removed by the policy in force, left by the
candidate (the rule is the one in force). Key names are kept for reports that ask for them;
never a value (a decision holds none).

Decisions of the C fast path do not name the keys of a private_metadata removed whole (only
`detailed` ones do): give `private_keys`, which names the keys of an event's private_metadata
(from the message as received), and those removals are expanded to their keys. Without it the
decisions must be detailed (a whole removal naming no key is then an empty private_metadata). Unknown fields
of an event are recorded only in `detailed` decisions: compare detailed decisions when the two
policies treat unknown fields differently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from telemetry_guard.policy.decision import Decision, Denial, Removal
from telemetry_guard.policy.fastpath import PRIVATE_PATH

Direction = Literal["candidate_removes", "candidate_keeps"]
DIRECTIONS: tuple[Direction, ...] = ("candidate_removes", "candidate_keeps")
EVENT_AREA = "event"
ADMITTED = "OK"  # the status name of a call or message that is not refused

Item = tuple[str, str]  # (area, key name or "")
PrivateKeys = Callable[[int], Sequence[str]]  # event index -> the key names of its private_metadata


@dataclass(frozen=True, slots=True)
class Difference:
    """Things one policy removes and the other lets leave, for one (direction, area, rule)."""

    direction: Direction
    area: str
    rule: str
    count: int
    keys: tuple[str, ...] = ()  # private_metadata key names, sorted, each once


@dataclass(frozen=True, slots=True)
class RefusalDifference:
    """A call or message refused under one policy and not the other, or with another status."""

    in_force: str  # a status code name, or ADMITTED
    candidate: str
    in_force_rule: str  # "" when admitted
    candidate_rule: str

    @property
    def rule(self) -> str:
        """The rule behind the candidate's refusal, or else behind the one in force."""
        return self.candidate_rule or self.in_force_rule


def compare_refusals(in_force: Denial | None, candidate: Denial | None) -> RefusalDifference | None:
    """None when both admit or both refuse with the same status (the rule names may differ)."""
    a = ADMITTED if in_force is None else in_force.code.name
    b = ADMITTED if candidate is None else candidate.code.name
    if a == b:
        return None
    return RefusalDifference(
        a, b, "" if in_force is None else in_force.rule, "" if candidate is None else candidate.rule
    )


_WHOLE: Item = (PRIVATE_PATH, "")  # a private_metadata removed whole, its keys not named


def _expand(items: dict[Item, str], keys: Sequence[str]) -> None:
    """Name the keys of a private_metadata removed whole (an empty one: nothing of it leaves either way)."""
    rule = items.pop(_WHOLE)
    for key in keys:
        items[(PRIVATE_PATH, key)] = rule


def _items(removals: Iterable[Removal]) -> dict[Item, str]:
    """Removed items -> the rule that removed them (merges left out: their values leave)."""
    out: dict[Item, str] = {}
    for removal in removals:
        if removal.action == "merged":
            continue
        if removal.keys:
            for key in removal.keys:
                out[(removal.path, key)] = removal.rule
        else:
            out[(removal.path, "")] = removal.rule
    return out


def _counted(removals: Iterable[Removal]) -> dict[Item, tuple[str, int]]:
    """Removals outside events -> (rule, how many): a user field removed from 3 users counts 3."""
    out: dict[Item, tuple[str, int]] = {}
    for removal in removals:
        if removal.action == "merged":
            continue
        for key in removal.keys or ("",):
            rule, count = out.get((removal.path, key), (removal.rule, 0))
            out[(removal.path, key)] = (rule, count + 1)
    return out


class _Tally:
    def __init__(self) -> None:
        self.counts: dict[tuple[Direction, str, str], int] = {}
        self.keys: dict[tuple[Direction, str, str], set[str]] = {}

    def add(self, direction: Direction, item: Item, rule: str, count: int = 1) -> None:
        area, key = item
        group = (direction, area, rule)
        self.counts[group] = self.counts.get(group, 0) + count
        if key and count:
            self.keys.setdefault(group, set()).add(key)

    def differences(self) -> list[Difference]:
        return [
            Difference(direction, area, rule, count, tuple(sorted(self.keys.get((direction, area, rule), ()))))
            for (direction, area, rule), count in sorted(self.counts.items())
        ]


def compare(in_force: Decision, candidate: Decision, private_keys: PrivateKeys | None = None) -> list[Difference]:
    """Where two decisions about the same message disagree on what leaves (empty: nowhere).

    Events are matched by their position in the message as received. Refusals are compared by
    compare_refusals: a refused message has no removals to compare. private_keys: see the module.
    """
    tally = _Tally()
    events_a = {e.index: e for e in in_force.events}
    events_b = {e.index: e for e in candidate.events}
    for index in sorted(events_a.keys() | events_b.keys()):
        a = events_a.get(index)
        b = events_b.get(index)
        dropped_a = a.dropped_by if a is not None else None
        dropped_b = b.dropped_by if b is not None else None
        if dropped_a is not None or dropped_b is not None:
            if dropped_a is None and dropped_b is not None:
                tally.add("candidate_removes", (EVENT_AREA, ""), dropped_b)
            elif dropped_b is None and dropped_a is not None:
                tally.add("candidate_keeps", (EVENT_AREA, ""), dropped_a)
            continue  # removed whole by one: what the other removes inside it is no difference
        if a is not None and b is not None and a.removals == b.removals:
            continue  # the same removals by the same rules (the usual case): nothing to take apart
        items_a = _items(a.removals) if a is not None else {}
        items_b = _items(b.removals) if b is not None else {}
        if (_WHOLE in items_a) != (_WHOLE in items_b):  # one removed a private_metadata whole, unnamed
            _expand(items_a if _WHOLE in items_a else items_b, () if private_keys is None else private_keys(index))
        for item in items_b.keys() - items_a.keys():
            tally.add("candidate_removes", item, items_b[item])
        for item in items_a.keys() - items_b.keys():
            tally.add("candidate_keeps", item, items_a[item])
    outside_a = _counted(in_force.removals)
    outside_b = _counted(candidate.removals)
    for item in outside_a.keys() | outside_b.keys():
        rule_a, count_a = outside_a.get(item, ("", 0))
        rule_b, count_b = outside_b.get(item, ("", 0))
        if count_b > count_a:
            tally.add("candidate_removes", item, rule_b, count_b - count_a)
        elif count_a > count_b:
            tally.add("candidate_keeps", item, rule_a, count_a - count_b)
    return tally.differences()
