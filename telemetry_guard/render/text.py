"""Plain-text renderings: for a terminal and for CI logs."""

from __future__ import annotations

from collections.abc import Sequence

from telemetry_guard.policy.cases import CaseFileResult
from telemetry_guard.policy.lint import LintReport, display_path
from telemetry_guard.policy.surface import Explanation, SurfaceDiff


def _place(file: str, line: int, column: int) -> str:
    return f"{file}:{line}:{column}" if line else file


def lint_text(report: LintReport) -> str:
    lines: list[str] = []
    for f in report.findings:
        ack = f" (acknowledged in {f.acknowledged_in})" if f.acknowledged else ""
        lines.append(f"{_place(f.file, f.line, f.column)}: {f.severity}[{f.rule}] {f.message}{ack}")
        if f.hint and not f.acknowledged:
            lines.append(f"    hint: {f.hint}")
    counts = ", ".join(
        f"{report.count(s)} {s}{'s' if report.count(s) != 1 else ''}" for s in ("error", "warning", "note")
    )
    extra = f", {report.acknowledged} acknowledged" if report.acknowledged else ""
    files = len(report.files)
    lines.append(f"{counts}{extra} in {files} file{'s' if files != 1 else ''}")
    return "\n".join(lines) + "\n"


def diff_text(result: SurfaceDiff) -> str:
    lines = [
        f"old: {display_path(result.old.files[0])} (sha256 {result.old.sha256[:12]})",
        f"new: {display_path(result.new.files[0])} (sha256 {result.new.sha256[:12]})",
    ]
    if not result.changes:
        lines.append("no change to what may leave")
    for direction, title in (
        ("widening", "WIDENING: may leave now, could not before"),
        ("narrowing", "narrowing: can no longer leave"),
        ("changed", "other changes"),
    ):
        changes = result.by_direction(direction)  # type: ignore[arg-type]
        if not changes:
            continue
        lines.append(f"\n{title} ({len(changes)}):")
        for c in changes:
            who = c.who
            lines.append(f"  {who}: {c.area}: {c.subject}: {c.old} -> {c.new}")
    return "\n".join(lines) + "\n"


def explain_text(e: Explanation) -> str:
    lines = [
        f"event type {e.feature}/{e.action} from a {e.kind} caller"
        + (f" matched by overrides.{e.override}" if e.override else "")
        + f", under {e.policy} (sha256 {e.sha256[:12]})",
        f"can it leave at all: {'yes' if e.leaves else 'no'}",
        "",
    ]
    width = max(len(s.topic) for s in e.steps)
    for step in e.steps:
        rule = f"  [{step.rule}]" if step.rule else ""
        lines.append(f"  {step.topic:<{width}}  {step.outcome}{rule}")
        if step.detail:
            lines.append(f"  {'':<{width}}    {step.detail}")
    return "\n".join(lines) + "\n"


def cases_text(results: Sequence[CaseFileResult], *, verbose: bool = False) -> str:
    lines: list[str] = []
    total = failed = 0
    for file_result in results:
        for r in file_result.results:
            total += 1
            where = f"{r.case.file}:{r.case.line}"
            if r.passed:
                if verbose:
                    lines.append(f"PASS {where}: {r.case.name}")
                continue
            failed += 1
            lines.append(f"FAIL {where}: {r.case.name}")
            lines.extend(f"    {failure}" for failure in r.failures)
            lines.extend(f"      {line}" for line in r.diff)
    files = len(results)
    lines.append(f"{total - failed} passed, {failed} failed, {total} cases in {files} file{'s' if files != 1 else ''}")
    return "\n".join(lines) + "\n"
