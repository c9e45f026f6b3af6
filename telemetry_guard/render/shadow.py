"""The layout of the shadow-report (telemetry_guard.shadowlog), shared by the markdown and HTML renderers."""

from __future__ import annotations

from telemetry_guard.render.report import Block, Table, shown, text
from telemetry_guard.shadowlog import ShadowReport

_DIRECTIONS = {
    "candidate_removes": (
        "Would be removed: leaves under the policy in force",
        "What the candidate would remove (its rule) that the policy in force lets leave.",
    ),
    "candidate_keeps": (
        "Would leave: removed by the policy in force",
        "What the candidate would let leave that the policy in force removes (the rule in force).",
    ),
}


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def shadow_blocks(report: ShadowReport) -> list[Block]:
    """A shadow roll-out's differences, for a policy review (from telemetry_guard.shadowlog)."""
    differ = report.differing_messages
    summary = text(
        f"{_count(report.compared_messages, 'message')} ({_count(report.compared_events, 'event')}) in "
        f"{_count(report.calls, 'call')} were judged by both policies; {differ:,} would have left otherwise "
        "under the candidate.",
    )
    bullets = [text("log: ", (shown(source), "code")) for source in report.sources]
    if report.first:
        bullets.append(text(f"from {report.first} to {report.last}"))
    for (in_force, candidate), messages in sorted(report.policies.items()):
        bullets.append(
            text(
                "policy in force ", (in_force, "code"), ", candidate ", (candidate, "code"), f": {messages:,} messages"
            )
        )
    blocks = [
        Block(
            "Shadow policy: what the candidate would have done to this traffic",
            level=1,
            lines=(
                summary,
                text(
                    "Counts: whole events 1 each, private_metadata keys 1 each, other fields 1 per event. "
                    "Only the policy in force decided what left; no value is recorded.",
                ),
            ),
            bullets=tuple(bullets),
        )
    ]
    for direction, (title, line) in _DIRECTIONS.items():
        rows = report.rows(direction)
        if not rows:
            continue
        headers: tuple[str, ...] = ("RPC", "kind", "area", "rule", "count", "messages")
        if report.with_keys:
            headers = (*headers, "keys")
        table = tuple(
            (
                text(r.rpc),
                text((r.kind, "code")),
                text((r.area, "code")),
                text((r.rule, "code")),
                text((f"{r.count:,}", "removed" if direction == "candidate_removes" else "leaves")),
                text(f"{r.messages:,}"),
                *((text((", ".join(sorted(r.keys)) or "-", "partial")),) if report.with_keys else ()),
            )
            for r in rows
        )
        blocks.append(Block(title, lines=(text(line),), table=Table(headers, table)))
    refusals = report.refusal_rows()
    if refusals:
        rows_r = tuple(
            (
                text(r.rpc),
                text((r.kind, "code")),
                text((r.in_force, "strong")),
                text((r.candidate, "strong")),
                text((r.rule, "code")),
                text(f"{r.times:,}"),
            )
            for r in refusals
        )
        blocks.append(
            Block(
                "Refusals that would differ",
                lines=(
                    text(
                        "Calls (or messages) refused under one policy and admitted, or refused with another "
                        "status, under the other; OK: admitted."
                    ),
                ),
                table=Table(("RPC", "kind", "policy in force", "candidate", "rule", "times"), rows_r),
            )
        )
    if not report.differences and not refusals:
        blocks.append(
            Block("No difference", lines=(text("The candidate would have let exactly the same things leave."),))
        )
    return blocks
