"""Sourcegraph's SRC_TELEMETRY_SENSITIVEMETADATA_ADDITIONAL_ALLOWED_EVENT_TYPES, as an allowlist file.

Admins of a Sourcegraph instance add event types to its private_metadata allowlist through that
variable: entries `feature::action::key1::key2`, separated by commas (Sourcegraph splits on "," and
"::" without trimming, and refuses an entry with fewer than three parts). `telemetry-guard
allowlist import` turns such a value into an allowlist file here, so the gateway side allows what
the instance exports; every entry is marked as awaiting review (AWAITING_REVIEW in its reason and
approved_by), and lint reports it (entry-awaiting-review) until a reviewer writes both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

VARIABLE = "SRC_TELEMETRY_SENSITIVEMETADATA_ADDITIONAL_ALLOWED_EVENT_TYPES"
AWAITING_REVIEW = "AWAITING REVIEW"
DESCRIPTION = f"Event types an instance adds to Sourcegraph's allowlist through {VARIABLE}."
REASON_PLACEHOLDER = f"{AWAITING_REVIEW}: say why these keys may leave (the use they serve)"

# The allowlist schema's patterns (policy/schema/allowlist.schema.json), as the gateway checks names.
_FEATURE = re.compile(r"[a-z][a-zA-Z.-]+\Z")
_ACTION = re.compile(r"(\*|[a-z][a-zA-Z.-]+)\Z")
_MAX_NAME = 64


@dataclass(frozen=True, slots=True)
class ImportedEntry:
    feature: str
    action: str
    keys: tuple[str, ...]
    raw: str  # the entry as written in the variable
    number: int  # 1-based, in the order written


class MalformedValue(ValueError):
    """The value has malformed entries; `problems` names each one (entry number and text)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(self.problems))


def _name_problem(what: str, name: str, pattern: re.Pattern[str]) -> str | None:
    if not name:
        return f"{what} is empty"
    if len(name) > _MAX_NAME or not pattern.match(name):
        return f"{what} {name!r} is not a valid event {what} (^[a-z][a-zA-Z.-]+$, at most {_MAX_NAME} characters)"
    return None


def _entry(raw: str, number: int) -> ImportedEntry | str:
    """One entry, or what is wrong with it."""
    where = f"entry {number} {json.dumps(raw, ensure_ascii=False)}"
    if not raw:
        return f"{where}: empty (two commas in a row, or a comma at an end)"
    parts = raw.split("::")
    if len(parts) < 3:
        return f"{where}: missing allowlisted keys (expected feature::action::key1[::key2...])"
    feature, action, keys = parts[0], parts[1], parts[2:]
    problems = [
        p
        for p in (
            _name_problem("feature", feature, _FEATURE),
            _name_problem("action", action, _ACTION) if action != "*" else None,
        )
        if p is not None
    ]
    if any(not key for key in keys):
        problems.append("an empty key")
    repeated = sorted({key for key in keys if key and keys.count(key) > 1})
    if repeated:
        problems.append(f"key {', '.join(map(repr, repeated))} given twice")
    if problems:
        return f"{where}: {'; '.join(problems)}"
    return ImportedEntry(feature, action, tuple(keys), raw, number)


def parse(value: str) -> list[ImportedEntry]:
    """The entries of the variable's value (surrounding whitespace and a leading `NAME=` ignored).

    Raises MalformedValue naming every malformed entry, and every entry whose event type an earlier
    one gives different keys (the allowlist would not load). An identical repeat is kept: it loads,
    and lint warns (duplicate-entry).
    """
    text = value.strip()
    if text.startswith(f"{VARIABLE}="):
        text = text[len(VARIABLE) + 1 :].strip()
    if not text:
        raise MalformedValue([f"the value of {VARIABLE} is empty: nothing to import"])
    entries: list[ImportedEntry] = []
    problems: list[str] = []
    first: dict[tuple[str, str], ImportedEntry] = {}
    for number, raw in enumerate(text.split(","), 1):
        got = _entry(raw, number)
        if isinstance(got, str):
            problems.append(got)
            continue
        earlier = first.setdefault((got.feature, got.action), got)
        if earlier is not got and set(earlier.keys) != set(got.keys):
            problems.append(
                f"entry {number} {json.dumps(raw, ensure_ascii=False)}: conflicts with entry {earlier.number} "
                f"{json.dumps(earlier.raw, ensure_ascii=False)} (one event type, different keys)"
            )
            continue
        entries.append(got)
    if problems:
        raise MalformedValue(problems)
    return entries


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are a subset of YAML's)."""
    return json.dumps(text, ensure_ascii=False)


def allowlist_yaml(entries: Sequence[ImportedEntry], today: date) -> str:
    """The allowlist file for the entries, each awaiting review."""
    lines = [
        f"# Imported by `telemetry-guard allowlist import` on {today.isoformat()} from the value of Sourcegraph's",
        f"# {VARIABLE}",
        "# (entries feature::action::key1::key2). Sourcegraph requires a review by its data team for such",
        f"# additions: every entry below is marked {AWAITING_REVIEW}, and `telemetry-guard lint` reports it",
        "# (entry-awaiting-review, an error) until its reason says why the keys may leave and approved_by",
        "# names who approved it.",
        "version: 1",
        f"description: {_q(DESCRIPTION)}",
        "entries:",
    ]
    for entry in entries:
        lines += [
            f"  - feature: {_q(entry.feature)}",
            f"    action: {_q(entry.action)}",
            f"    keys: [{', '.join(_q(key) for key in entry.keys)}]",
            f"    reason: {_q(REASON_PLACEHOLDER)}",
            f"    approved_by: {_q(AWAITING_REVIEW)}",
        ]
    return "\n".join(lines) + "\n"


def awaits_review(reason: str, approved_by: str) -> bool:
    """An entry whose reason or approver is still the importer's placeholder."""
    return reason.startswith(AWAITING_REVIEW) or approved_by.startswith(AWAITING_REVIEW)
