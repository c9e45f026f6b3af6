"""A policy that lint refuses never enforces, unless the operator says so.

Loading for enforcement (the sidecar at start and on every reload, the interceptors) runs lint
on the policy's files: any lint error the policy does not acknowledge (`acknowledged:`; the
single-tenant rules cannot be) refuses the policy with UnsafePolicyError, a PolicyError whose
problems are the findings (file, line, column, rule). An operator who means it passes
allow_unsafe_policy=True (`serve --allow-unsafe-policy`): the policy is then used, and the
findings are logged at ERROR every time it is loaded.

Lint reads the files again; the policy is refused if they changed between the load and the
check, so that the findings are always about the bytes in force.
"""

from __future__ import annotations

import logging

from telemetry_guard.policy import lint
from telemetry_guard.policy.errors import PolicyError, Problem
from telemetry_guard.policy.loader import files_sha256
from telemetry_guard.policy.model import Policy

LOG = logging.getLogger("telemetry_guard.policy")

UNSAFE_HINT = "fix the policy (telemetry-guard lint names each rule), or allow it explicitly: --allow-unsafe-policy"


class UnsafePolicyError(PolicyError):
    """The policy loads, but lint finds errors in it that it does not acknowledge."""

    def __init__(self, findings: tuple[lint.Finding, ...], files: tuple[str, ...] = ()) -> None:
        self.findings = findings
        super().__init__([_problem(f) for f in findings], files)


class PolicyChangedError(PolicyError):
    """The policy's files changed between loading them and linting them: load again."""


def _problem(finding: lint.Finding) -> Problem:
    return Problem(finding.file, finding.line, finding.column, finding.rule, f"lint error: {finding.message}")


def unsafe_findings(policy: Policy) -> tuple[lint.Finding, ...]:
    """The lint errors of a loaded policy that it does not acknowledge (empty: safe to enforce).

    Raises PolicyChangedError when the files changed since the policy was loaded (lint judged other bytes).
    """
    report = lint.lint_files([policy.files[0]])
    if files_sha256(policy.files) != policy.sha256:
        raise PolicyChangedError(
            [
                Problem(
                    policy.files[0], 0, 0, "", "the policy's files changed while it was being checked; load it again"
                )
            ],
            policy.files,
        )
    return tuple(f for f in report.findings if f.severity == "error" and not f.acknowledged)


def check_enforceable(policy: Policy, *, allow_unsafe_policy: bool = False) -> tuple[lint.Finding, ...]:
    """Refuse (UnsafePolicyError) a policy lint refuses, unless allowed; allowed, log its findings at ERROR.

    Returns the findings that were allowed (empty for a policy lint accepts).
    """
    findings = unsafe_findings(policy)
    if not findings:
        return ()
    if not allow_unsafe_policy:
        raise UnsafePolicyError(findings, policy.files)
    problems = [str(_problem(f)) for f in findings]
    LOG.error(
        "enforcing a policy that lint refuses, as allowed explicitly: %s",
        "; ".join(problems),
        # the structured fields, in the convention of interceptors/audit.py (the sidecar's JSON logs)
        extra={"telemetry_guard": {"policy": policy.name, "sha256": policy.sha256, "findings": problems}},
    )
    return findings
