"""Every compliance command: --help with examples, bad arguments, bad and unreadable files.

Errors exit 2 with a clear message (file:line:column where there is one) and never a
traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD_YAML = "tests/testdata/compliance/lint/bad_yaml.yaml"
BAD_SCHEMA = "tests/testdata/compliance/lint/bad_schema.yaml"
COMMANDS = ("lint", "audit", "diff", "test", "apply", "explain")


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        input=stdin,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples(command: str) -> None:
    done = cli(command, "--help")
    assert done.returncode == 0
    assert f"usage: telemetry-guard {command}" in done.stdout
    examples = done.stdout.split("examples:\n", 1)[1].splitlines()
    assert len(examples) >= 2
    assert all(f"telemetry-guard {command} " in line for line in examples)


def test_top_level_help_lists_every_command() -> None:
    done = cli("--help")
    assert done.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["audit"], "the following arguments are required: POLICY"),
        (["audit", "builtin:default", "--format", "pdf"], "invalid choice: 'pdf'"),
        (["diff", "builtin:default"], "the following arguments are required: NEW"),
        (["test", "builtin:default"], "the following arguments are required: CASES"),
        (["apply", "builtin:default"], "the following arguments are required: --kind"),
        (["apply", "builtin:default", "--kind", "galaxy"], "invalid choice: 'galaxy'"),
        (["apply", "builtin:default", "--kind", "workspace", "--progress", "--quiet"], "not allowed with argument"),
        (["explain", "builtin:default", "--kind", "workspace", "--feature", "f"], "required: --action"),
        (["lint", "--format", "xml", "x.yaml"], "invalid choice: 'xml'"),
    ],
)
def test_bad_arguments_exit_2_with_usage(args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert "usage: telemetry-guard" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr


EXPLAIN = ["--kind", "workspace", "--feature", "cody.chat", "--action", "submitted"]


@pytest.mark.parametrize(
    "args",
    [
        ["audit", BAD_YAML],
        ["diff", "builtin:default", BAD_YAML],
        ["explain", BAD_YAML, *EXPLAIN],
        ["test", BAD_YAML, "docs/examples/cases/default.yaml"],
        ["apply", BAD_YAML, "--kind", "workspace"],
    ],
)
def test_a_policy_that_is_not_yaml_exits_2_with_its_place(args: list[str]) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert f"telemetry-guard {args[0]}: cannot load the input:" in done.stderr
    assert f"  {BAD_YAML}:5:17: invalid YAML: the [ opened here is not closed (line 6: expected ',' or ']'" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_policy_with_schema_errors_lists_every_problem() -> None:
    done = cli("audit", BAD_SCHEMA)
    assert done.returncode == 2
    first = next(line for line in done.stderr.splitlines() if f"{BAD_SCHEMA}:4:1: " in line)
    assert "colour" in first and "allowed keys: access, acknowledged" in first
    assert f"{BAD_SCHEMA}:6:3: defaults.marketing_tracking: 'sometimes' is not allowed; use one of: drop, keep" in (
        done.stderr
    )


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = cli("explain", str(tmp_path / "nope.yaml"), *EXPLAIN)
    assert missing.returncode == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory" in missing.stderr
    no_input = cli("apply", "builtin:default", "--kind", "workspace", "-i", str(tmp_path / "none.jsonl"))
    assert no_input.returncode == 2
    assert f"telemetry-guard apply: cannot read {tmp_path / 'none.jsonl'}: No such file or directory" in no_input.stderr
    no_cases = cli("test", "builtin:default", str(tmp_path))
    assert no_cases.returncode == 2 and "no *.yaml cases files in this directory" in no_cases.stderr
    missing_cases = cli("test", "builtin:default", str(tmp_path / "cases.yaml"))
    assert missing_cases.returncode == 2
    assert f"{tmp_path / 'cases.yaml'}: cannot read: No such file or directory" in missing_cases.stderr
    for done in (missing, no_input, no_cases, missing_cases):
        assert "Traceback" not in done.stderr


def test_unwritable_outputs_exit_2(tmp_path: Path) -> None:
    target = str(tmp_path / "no-such-dir" / "out")
    audit = cli("audit", "builtin:default", "-o", target)
    assert audit.returncode == 2
    assert f"telemetry-guard audit: cannot write {target}: No such file or directory" in audit.stderr
    junit = cli("test", "builtin:default", "docs/examples/cases/default.yaml", "--junit", target)
    assert junit.returncode == 2 and f"cannot write {target}" in junit.stderr
    apply = cli("apply", "builtin:default", "--kind", "workspace", "-o", target, stdin="{}\n")
    assert apply.returncode == 2 and f"cannot write {target}" in apply.stderr
    for done in (audit, junit, apply):
        assert "Traceback" not in done.stderr
