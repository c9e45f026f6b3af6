"""JSON renderings. Every document carries a "format" name and version so consumers can check it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from telemetry_guard.policy.cases import CaseFileResult
from telemetry_guard.policy.lint import LintReport
from telemetry_guard.policy.surface import Explanation, Surface, SurfaceDiff
from telemetry_guard.shadowlog import ShadowReport


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def _plain(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def lint_json(report: LintReport, *, strict: bool = False) -> str:
    return dumps(
        {
            "format": "telemetry-guard.lint/1",
            "files": list(report.files),
            "summary": {
                "errors": report.count("error"),
                "warnings": report.count("warning"),
                "notes": report.count("note"),
                "acknowledged": report.acknowledged,
                "exit_code": report.exit_code(strict),
            },
            "findings": [{**_plain(f), "acknowledged": f.acknowledged} for f in report.findings],
        }
    )


def surface_dict(surface: Surface) -> dict[str, Any]:
    return {"format": "telemetry-guard.audit/1", **_plain(surface)}


def surface_json(surface: Surface) -> str:
    return dumps(surface_dict(surface))


def diff_json(result: SurfaceDiff) -> str:
    return dumps(
        {
            "format": "telemetry-guard.diff/1",
            "old": {"files": list(result.old.files), "sha256": result.old.sha256},
            "new": {"files": list(result.new.files), "sha256": result.new.sha256},
            "summary": {d: len(result.by_direction(d)) for d in ("widening", "narrowing", "changed")},
            "changes": [_plain(c) for c in result.changes],
        }
    )


def explain_json(e: Explanation) -> str:
    return dumps({"format": "telemetry-guard.explain/1", **_plain(e)})


def cases_json(results: Sequence[CaseFileResult], *, show_keys: bool = False) -> str:
    return dumps(
        {
            "format": "telemetry-guard.test/1",
            "files": [
                {
                    "file": fr.file,
                    "cases": [
                        {
                            "name": r.case.name,
                            "line": r.case.line,
                            "passed": r.passed,
                            "failures": list(r.failures),
                            "diff": list(r.diff),
                            "leaves": r.leaves,
                            "decision": r.decision.to_dict(with_keys=show_keys),
                            "seconds": round(r.seconds, 6),
                        }
                        for r in fr.results
                    ],
                }
                for fr in results
            ],
        }
    )


def shadow_json(report: ShadowReport) -> str:
    def difference(row: Any) -> dict[str, Any]:
        out = {k: v for k, v in _plain(row).items() if k != "keys"}
        if report.with_keys:
            out["keys"] = sorted(row.keys)
        return out

    return dumps(
        {
            "format": "telemetry-guard.shadow-report/1",
            "logs": list(report.sources),
            "from": report.first,
            "to": report.last,
            "policies": [
                {"in_force_sha256": a, "candidate_sha256": b, "messages": n}
                for (a, b), n in sorted(report.policies.items())
            ],
            "summary": {
                "calls": report.calls,
                "compared_messages": report.compared_messages,
                "compared_events": report.compared_events,
                "differing_messages": report.differing_messages,
                "widening": report.widening,
            },
            "candidate_removes": [difference(r) for r in report.rows("candidate_removes")],
            "candidate_keeps": [difference(r) for r in report.rows("candidate_keeps")],
            "refusals": [_plain(r) for r in report.refusal_rows()],
        }
    )
