"""Lint findings as SARIF 2.1.0, for code-scanning UIs (GitHub, GitLab, IDEs).

Acknowledged findings are kept, with an "inSource" suppression pointing at the
policy's acknowledged: entry, so a reviewer still sees what was accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from telemetry_guard.policy.lint import RULES, LintReport

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {"error": "error", "warning": "warning", "note": "note"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("telemetry-guard")
    except PackageNotFoundError:
        return "0"


def _uri(file: str) -> dict[str, str]:
    path = Path(file)
    if path.is_absolute():
        return {"uri": path.as_uri()}
    return {"uri": path.as_posix(), "uriBaseId": "%SRCROOT%"}


def lint_sarif(report: LintReport) -> dict[str, Any]:
    rule_ids = list(RULES)
    results: list[dict[str, Any]] = []
    for f in report.findings:
        location: dict[str, Any] = {"artifactLocation": _uri(f.file)}
        if f.line:
            location["region"] = {"startLine": f.line, "startColumn": max(f.column, 1)}
        result: dict[str, Any] = {
            "ruleId": f.rule,
            "ruleIndex": rule_ids.index(f.rule),
            "level": _LEVEL[f.severity],
            "message": {"text": f"{f.message}. {f.hint}" if f.hint else f.message},
            "locations": [{"physicalLocation": location}],
        }
        if f.acknowledged:
            result["suppressions"] = [{"kind": "inSource", "justification": f"acknowledged in {f.acknowledged_in}"}]
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "telemetry-guard",
                        "version": _version(),
                        "rules": [
                            {
                                "id": rule.id,
                                "name": "".join(part.capitalize() for part in rule.id.split("-")),
                                "shortDescription": {"text": rule.summary},
                                "help": {"text": rule.help},
                                "defaultConfiguration": {"level": _LEVEL[rule.severity]},
                            }
                            for rule in RULES.values()
                        ],
                    }
                },
                "originalUriBaseIds": {"%SRCROOT%": {"uri": Path.cwd().as_uri() + "/"}},
                "results": results,
            }
        ],
    }
