"""telemetry-guard lint: every rule on named testdata files, the shipped examples, formats, exit codes.

Each file in tests/testdata/compliance/lint/ states the findings it must produce in
`# expect: RULE [FILE:]LINE:COLUMN [acknowledged]` lines; the test compares the whole
set, so a missing finding and an extra one both fail.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from telemetry_guard.policy.lint import RULES, describe, lint_files, sensitive_words, split_key

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "testdata" / "compliance" / "lint"
EXAMPLES = ROOT / "docs" / "examples"

EXPECT = re.compile(r"^# expect: (\S+) (?:(\S+):)?(\d+):(\d+)( acknowledged)?$", re.MULTILINE)

PERMISSIVE_RULES = {
    "record-event-instance",
    "kind-not-served",
    "credentials-not-required",
    "user-metadata-personal",
    "marketing-tracking-single-tenant",
    "private-metadata-keep-single-tenant",
    "unknown-fields-kept",
    "unknown-acknowledgement",
    "entry-without-approval",
    "sensitive-key",
    "shadowed-entry",
}


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def expected(path: Path) -> set[tuple[str, str, int, int, bool]]:
    out = set()
    for rule, file, line, column, ack in EXPECT.findall(path.read_text(encoding="utf-8")):
        target = path.parent / file if file else path
        out.add((rule, str(target.resolve()), int(line), int(column), bool(ack)))
    return out


def found(paths: list[Path]) -> set[tuple[str, str, int, int, bool]]:
    report = lint_files(paths)
    return {(f.rule, str(Path(f.file).resolve()), f.line, f.column, f.acknowledged) for f in report.findings}


CASE_FILES = sorted(p.name for p in DATA.glob("*.yaml"))


@pytest.mark.parametrize("name", CASE_FILES)
def test_each_testdata_file_produces_exactly_the_findings_it_states(name: str) -> None:
    path = DATA / name
    want = expected(path)
    assert want or name == "clean.yaml", f"{name} states no expected finding"
    assert found([path]) == want


def test_every_rule_is_exercised_by_testdata_or_the_permissive_example() -> None:
    stated = {rule for name in CASE_FILES for rule, *_ in expected(DATA / name)}
    assert stated | PERMISSIVE_RULES | {"unreadable"} == set(RULES)


def test_exit_codes_follow_severity_and_strict() -> None:
    clean = lint_files([DATA / "clean.yaml"])
    warnings_only = lint_files([DATA / "unreferenced.yaml"])
    errors = lint_files([DATA / "access_rules.yaml"])
    assert (clean.exit_code(), clean.exit_code(strict=True)) == (0, 0)
    assert (warnings_only.exit_code(), warnings_only.exit_code(strict=True)) == (0, 1)
    assert errors.exit_code() == 1


def test_acknowledged_finding_does_not_fail_but_is_reported() -> None:
    report = lint_files([DATA / "acknowledged.yaml"])
    kept = [f for f in report.findings if f.rule == "unknown-fields-kept"]
    assert len(kept) == 1 and kept[0].acknowledged_in.endswith("acknowledged.yaml:10")
    assert report.count("error") == 0 and report.acknowledged == 1


def test_an_allowlist_linted_alone_and_through_its_policy_is_reported_once() -> None:
    report = lint_files([DATA / "shadowed.yaml", DATA / "shadow" / "list.yaml"])
    shadowed = [f for f in report.findings if f.rule == "shadowed-entry"]
    assert len(shadowed) == 2


def test_a_policy_that_does_not_load_still_gets_its_semantic_findings() -> None:
    rules = {f.rule for f in lint_files([DATA / "drop_fields_bad.yaml"]).findings}
    assert rules == {"load-error", "marketing-tracking-single-tenant"}


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("repoName", ["repo", "name"]),
        ("user_email", ["user", "email"]),
        ("IPAddress", ["ip", "address"]),
        ("filePath", ["file", "path"]),
        ("searchQuery", ["query"]),
        ("searchMode", []),
        ("authToken", ["auth", "token"]),
        ("languageId", []),
        ("chatModel", []),
        ("otherCompletionProviders", []),
        ("url", ["url"]),
    ],
)
def test_sensitive_words_in_key_names(key: str, words: list[str]) -> None:
    assert sensitive_words(key) == words


def test_hints_reuse_the_schema_descriptions() -> None:
    assert split_key("kinds.workspace.drop_fields[0]") == ("kinds", "workspace", "drop_fields", 0)
    assert describe(("defaults", "unknown_fields")).startswith("Field numbers this proto does not know")
    assert describe(("kinds", "workspace", "marketing_tracking")).startswith("Event.marketing_tracking")
    assert describe(("entries", 0, "reason"), "allowlist.schema.json").startswith("Why these keys may leave")
    finding = next(f for f in lint_files([DATA / "acknowledged.yaml"]).findings if f.rule == "unknown-fields-kept")
    assert "Field numbers this proto does not know" in finding.hint


def test_a_yaml_hint_matches_the_yaml_problem() -> None:
    bracket = next(f for f in lint_files([DATA / "syntax_and_more.yaml"]).findings if f.rule == "yaml")
    assert "bracket" in bracket.hint and "anchor" not in bracket.hint.lower()
    assert "is not closed" in bracket.message
    refusals = [f for f in lint_files([DATA / "yaml_refusals.yaml"]).findings if f.rule == "yaml"]
    hints = {f.message.split(":")[-1].strip(): f.hint for f in refusals}
    assert any("tags" in hint.lower() for hint in hints.values())
    assert any("twice" in hint for hint in hints.values())
    assert not any("anchor" in hint.lower() for hint in hints.values())


def test_values_are_echoed_as_written_and_near_misses_named(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\ndefaults:\n  unknown_fields: yes\n  marketing_tracking: dropp\n", encoding="utf-8")
    messages = [f.message for f in lint_files([policy]).findings]
    assert "defaults.unknown_fields: yes is not allowed; use one of: discard, keep" in messages
    assert not any("True" in m for m in messages)
    assert (
        "defaults.marketing_tracking: 'dropp' is not allowed (did you mean drop?); use one of: drop, keep" in messages
    )


# -- through the command line -------------------------------------------------------------


def test_cli_shipped_strict_and_default_examples_pass_even_with_strict() -> None:
    done = cli("lint", "--strict", "docs/examples/strict.yaml", "docs/examples/default.yaml")
    assert done.returncode == 0, done.stdout + done.stderr
    # The default policy acknowledges what lint says about Sourcegraph's published allowlist; every file
    # read is counted: the two policies and the allowlist each of them uses.
    assert done.stdout.strip().endswith("0 errors, 0 warnings, 0 notes, 3 acknowledged in 4 files")


def test_cli_permissive_example_is_rejected_with_the_expected_rules() -> None:
    done = cli("lint", "--format", "json", "docs/examples/permissive.yaml")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["format"] == "telemetry-guard.lint/1"
    assert {f["rule"] for f in report["findings"]} == PERMISSIVE_RULES
    assert report["summary"]["errors"] == 5 and report["summary"]["exit_code"] == 1
    marketing = next(f for f in report["findings"] if f["rule"] == "marketing-tracking-single-tenant")
    assert (marketing["file"], marketing["line"], marketing["column"]) == ("docs/examples/permissive.yaml", 24, 3)
    assert "licensed_instance, unlicensed_instance" in marketing["message"]


def test_cli_text_output_has_place_rule_and_hint() -> None:
    done = cli("lint", str(DATA.relative_to(ROOT) / "access_rules.yaml"))
    assert done.returncode == 1
    first, hint = done.stdout.splitlines()[:2]
    assert first.startswith("tests/testdata/compliance/lint/access_rules.yaml:6:34: error[record-event-instance]")
    assert hint.startswith("    hint: Remove licensed_instance and unlicensed_instance from access.RecordEvent")


def test_cli_unreadable_inputs_exit_2_and_are_named(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe\n")
    done = cli("lint", str(tmp_path / "missing.yaml"), str(tmp_path), str(binary), "docs/examples/strict.yaml")
    assert done.returncode == 2
    assert f"{tmp_path / 'missing.yaml'}: error[unreadable] cannot read: No such file or directory" in done.stdout
    assert f"{tmp_path}: error[unreadable] cannot read: Is a directory" in done.stdout
    assert f"{binary}: error[unreadable] not UTF-8 (byte 11)" in done.stdout
    assert "Traceback" not in done.stderr
    # Only what was read is counted: strict.yaml and its allowlist, not the three unreadable inputs.
    assert done.stdout.strip().endswith("3 errors, 0 warnings, 0 notes in 2 files")


def test_cli_sarif_locations_rules_and_suppressions(tmp_path: Path) -> None:
    out = tmp_path / "lint.sarif"
    rel = DATA.relative_to(ROOT)
    done = cli(
        "lint", "--format", "sarif", "-o", str(out), str(rel / "access_rules.yaml"), str(rel / "acknowledged.yaml")
    )
    assert done.returncode == 1 and done.stdout == ""
    sarif = json.loads(out.read_text(encoding="utf-8"))
    assert sarif["version"] == "2.1.0" and "sarif-2.1.0" in sarif["$schema"]
    run = sarif["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(RULES)
    by_rule = {r["ruleId"]: r for r in run["results"]}
    record = by_rule["record-event-instance"]
    assert record["level"] == "error"
    assert rules[record["ruleIndex"]]["id"] == "record-event-instance"
    location = record["locations"][0]["physicalLocation"]
    assert location["artifactLocation"] == {"uri": f"{rel.as_posix()}/access_rules.yaml", "uriBaseId": "%SRCROOT%"}
    assert location["region"] == {"startLine": 6, "startColumn": 34}
    suppressed = by_rule["unknown-fields-kept"]
    assert suppressed["suppressions"][0]["kind"] == "inSource"
    assert "suppressions" not in record


def test_cli_list_rules_and_no_files() -> None:
    listed = cli("lint", "--list-rules")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == list(RULES)
    empty = cli("lint")
    assert empty.returncode == 2 and "name at least one policy or allowlist file" in empty.stderr


def test_the_compliance_guide_lists_every_rule_with_its_severity() -> None:
    guide = (ROOT / "docs" / "compliance.md").read_text(encoding="utf-8")
    for rule in RULES.values():
        ack = "yes" if rule.acknowledgeable else "no"
        assert re.search(rf"^\| `{re.escape(rule.id)}` \| {rule.severity} \| .+ \| {ack} \|$", guide, re.MULTILINE), (
            rule.id
        )


def test_cli_five_mistakes_of_five_stages_are_five_findings_each_at_its_line() -> None:
    done = cli("lint", "tests/testdata/compliance/lint/five_stages.yaml")
    assert done.returncode == 1, done.stdout + done.stderr
    places = re.findall(
        r"^tests/testdata/compliance/lint/five_stages\.yaml:(\d+):\d+: error\[([\w-]+)\]", done.stdout, re.M
    )
    assert [(int(line), rule) for line, rule in places] == [
        (12, "missing-allowlist"),
        (15, "yaml"),
        (17, "load-error"),
        (18, "load-error"),
        (21, "marketing-tracking-single-tenant"),
    ]
    assert "did you mean marketing_tracking?" in done.stdout
    # The policy and the allowlist it uses were read.
    assert done.stdout.strip().endswith("5 errors, 0 warnings, 0 notes in 2 files")


def test_cli_lint_builtin_default_like_the_other_commands() -> None:
    done = cli("lint", "builtin:default")
    assert done.returncode == 0, done.stdout + done.stderr
    # Sourcegraph's published list as the default policy acknowledges it: shown, and not counted against it
    assert done.stdout.strip().endswith("0 errors, 0 warnings, 0 notes, 3 acknowledged in 2 files")
