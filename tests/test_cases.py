"""telemetry-guard test: YAML policy cases, their failures, diffs and JUnit output.

Files under tests/testdata/compliance/cases/bad_*.yaml each state the problem they must
raise (`# expect-problem: LINE:COLUMN text`); failing.yaml holds cases that fail, with
values marked SECRET that the policy removes and no output may print.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from telemetry_guard.policy import Engine, default_policy, load_policy
from telemetry_guard.policy.cases import CaseFileError, load_cases, output_diff, run_case, run_cases

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "testdata" / "compliance" / "cases"
EXAMPLES = ROOT / "docs" / "examples"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


@pytest.mark.parametrize("name", ["default", "strict", "permissive"])
def test_shipped_example_cases_pass(name: str) -> None:
    cases = load_cases(EXAMPLES / "cases" / f"{name}.yaml")
    results = run_cases(Engine(load_policy(EXAMPLES / f"{name}.yaml")), [(name, cases)])
    assert len(cases) >= 4
    assert [(r.case.name, r.failures) for r in results[0].results if not r.passed] == []


def test_default_cases_also_pass_on_the_builtin_default() -> None:
    results = run_cases(Engine(default_policy()), [("d", load_cases(EXAMPLES / "cases" / "default.yaml"))])
    assert results[0].failed == 0


def test_the_same_cases_fail_under_a_different_policy() -> None:
    # The default cases assert the seed's rules: the permissive policy must break several of them.
    results = run_cases(
        Engine(load_policy(EXAMPLES / "permissive.yaml")), [("d", load_cases(EXAMPLES / "cases" / "default.yaml"))]
    )
    failed = {r.case.name for r in results[0].results if not r.passed}
    assert "a licensed instance loses marketing_tracking and non-allowlisted private_metadata keys" in failed
    # RecordEvent from an instance is the gateway's refusal (UNIMPLEMENTED), whatever a policy lists.
    assert not any(name.startswith("RecordEvent is refused to instances") for name in failed)
    assert "user metadata is refused until enabled" in failed


def test_each_failing_case_says_why() -> None:
    engine = Engine(default_policy())
    results = {c.name: run_case(engine, c) for c in load_cases(DATA / "failing.yaml")}
    first = results["expects a removed value to leave"]
    assert first.failures[0] == "the message that leaves differs from expect.output"
    assert first.failures[1].startswith("expected nothing removed (removed: []); removed: event 0 marketing_tracking")
    assert first.diff == (
        "--- expected (values not shown)",
        "+++ leaves",
        "- events.events[0].marketing_tracking.url",
        "- events.events[0].parameters.private_metadata.languageId",
        '+ events.events[0].parameters.private_metadata.languageId = "go"',
        "- events.events[0].parameters.private_metadata.{key}",
    )
    denial = results["expects a denial that does not happen"]
    assert denial.failures == ("expected denial PERMISSION_DENIED, but the request was let through",)
    third = results["expects a removal by the wrong rule, and a dropped event"]
    assert third.failures == (
        "expected a removal (path parameters.private_metadata, rule defaults.private_metadata); removed: "
        "event 0 parameters.private_metadata by kinds.unlicensed_instance.private_metadata (removed) (1 key)",
        "expected dropped events [f3], got []",
    )
    assert results["passes"].passed


def test_removal_specs_match_by_event_id_index_keys_and_action() -> None:
    engine = Engine(load_policy(EXAMPLES / "permissive.yaml"))
    case = next(c for c in load_cases(EXAMPLES / "cases" / "permissive.yaml") if "replacement" in c.name)
    assert run_case(engine, case).passed
    from dataclasses import replace

    from telemetry_guard.policy.cases import RemovalSpec

    def passes(*specs: RemovalSpec) -> bool:
        return run_case(engine, replace(case, removed=specs, expects_output=False)).passed

    assert passes(RemovalSpec("parameters.private_metadata", event=0, keys=("extra",)))
    assert passes(RemovalSpec("parameters.private_metadata", event="p2", action="replaced", keys=("chatModel",)))
    assert not passes(RemovalSpec("parameters.private_metadata", event=1))
    assert not passes(RemovalSpec("parameters.private_metadata", event="other"))
    assert not passes(RemovalSpec("parameters.private_metadata", keys=("userEmail",)))
    assert not passes(RemovalSpec("parameters.private_metadata", keys=("extra",), action="replaced"))
    assert not passes(RemovalSpec("marketing_tracking"))


def test_output_diff_hides_expected_values_and_map_keys_unless_asked() -> None:
    expected = {"events": {"events": [{"id": "e", "parameters": {"private_metadata": {"email": "x@y"}}}]}}
    actual = {"events": {"events": [{"id": "e2"}]}}
    hidden = output_diff(expected, actual)
    assert "- events.events[0].parameters.private_metadata.{key}" in hidden
    assert "- events.events[0].id" in hidden and '+ events.events[0].id = "e2"' in hidden
    assert not any("x@y" in line or "email" in line for line in hidden)
    shown = output_diff(expected, actual, show_keys=True)
    assert "- events.events[0].parameters.private_metadata.email" in shown
    assert not any("x@y" in line for line in shown)


BAD = sorted(p.name for p in DATA.glob("bad_*.yaml"))


@pytest.mark.parametrize("name", BAD)
def test_bad_cases_files_are_refused_at_the_stated_place(name: str) -> None:
    path = DATA / name
    header = re.match(r"# expect-problem: (\d+):(\d+) (.+)", path.read_text(encoding="utf-8"))
    assert header, f"{name} states no expected problem"
    line, column, text = int(header[1]), int(header[2]), header[3]
    with pytest.raises(CaseFileError) as raised:
        load_cases(path)
    places = [(p.line, p.column) for p in raised.value.problems if text in p.message]
    assert (line, column) in places, [str(p) for p in raised.value.problems]


# -- through the command line -----------------------------------------------------------------


def test_cli_examples_pass_with_junit(tmp_path: Path) -> None:
    junit = tmp_path / "results.xml"
    done = cli("test", "docs/examples/strict.yaml", "docs/examples/cases/strict.yaml", "--junit", str(junit), "-v")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("6 passed, 0 failed, 6 cases in 1 file")
    assert done.stdout.startswith("PASS docs/examples/cases/strict.yaml:7: a managed service loses")
    root = ET.parse(junit).getroot()
    assert (root.tag, root.get("tests"), root.get("failures")) == ("testsuites", "6", "0")


def test_cli_failures_exit_1_print_diffs_and_never_a_removed_value(tmp_path: Path) -> None:
    junit = tmp_path / "results.xml"
    done = cli("test", "builtin:default", "tests/testdata/compliance/cases/failing.yaml", "--junit", str(junit))
    assert done.returncode == 1
    assert "FAIL tests/testdata/compliance/cases/failing.yaml:5: expects a removed value to leave" in done.stdout
    assert "      - events.events[0].parameters.private_metadata.{key}" in done.stdout
    assert done.stdout.strip().endswith("1 passed, 3 failed, 4 cases in 1 file")
    xml = junit.read_text(encoding="utf-8")
    root = ET.fromstring(xml)
    assert (root.get("tests"), root.get("failures")) == ("4", "3")
    failures = root.findall(".//testcase/failure")
    assert failures[0].get("message") == "the message that leaves differs from expect.output"
    keyed = cli("test", "builtin:default", "tests/testdata/compliance/cases/failing.yaml", "--show-keys")
    assert "- events.events[0].parameters.private_metadata.userEmail" in keyed.stdout
    for output in (done.stdout, done.stderr, xml, keyed.stdout):
        assert "SECRET" not in output


def test_cli_bad_cases_file_exits_2_with_place() -> None:
    done = cli("test", "builtin:default", "tests/testdata/compliance/cases/bad_request.yaml")
    assert done.returncode == 2
    assert "the cases file tests/testdata/compliance/cases/bad_request.yaml cannot be loaded" in done.stderr
    assert "bad_request.yaml:7:34: cases[0].request.events.events[0].colour: Event has no field 'colour'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_json_report_per_case_without_removed_values() -> None:
    done = cli("test", "builtin:default", "tests/testdata/compliance/cases/failing.yaml", "--format", "json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["format"] == "telemetry-guard.test/1"
    cases = report["files"][0]["cases"]
    assert [c["passed"] for c in cases] == [False, False, False, True]
    assert cases[0]["leaves"]["events"]["events"][0]["parameters"]["private_metadata"] == {"languageId": "go"}
    assert cases[0]["decision"]["removed_per_rule"]["kinds.licensed_instance.marketing_tracking"] == 1
    assert "SECRET" not in done.stdout


def test_cli_a_directory_runs_only_the_cases_files_for_the_policy() -> None:
    done = cli("test", "docs/examples/strict.yaml", "docs/examples/cases/")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(f"{len(load_cases(EXAMPLES / 'cases' / 'strict.yaml'))} cases in 1 file")
    assert done.stderr.splitlines() == [
        "telemetry-guard test: skipped docs/examples/cases/default.yaml: its cases are for "
        "docs/examples/default.yaml or builtin:default",
        "telemetry-guard test: skipped docs/examples/cases/gateway.yaml: its cases are for docs/examples/gateway.yaml",
        "telemetry-guard test: skipped docs/examples/cases/permissive.yaml: its cases are for "
        "docs/examples/permissive.yaml",
    ]
    done = cli("test", "builtin:default", "docs/examples/cases/")
    assert done.returncode == 0 and "cases in 1 file" in done.stdout, done.stdout + done.stderr


def test_cli_a_cases_file_named_for_another_policy_is_an_error_that_says_which() -> None:
    done = cli("test", "docs/examples/strict.yaml", "docs/examples/cases/permissive.yaml")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "telemetry-guard test: docs/examples/cases/permissive.yaml is for the policy docs/examples/permissive.yaml "
        "(its policy: key), not docs/examples/strict.yaml; name that policy, or list this one under policy: too"
    )
