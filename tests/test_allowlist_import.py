"""telemetry-guard allowlist import: Sourcegraph's SRC_TELEMETRY_SENSITIVEMETADATA_ADDITIONAL_ALLOWED_EVENT_TYPES
as an allowlist file awaiting review, through the command line (real subprocesses, real files)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from telemetry_guard.policy import load_policy
from telemetry_guard.policy.sourcegraph_env import MalformedValue, parse

ROOT = Path(__file__).resolve().parents[1]
VARIABLE = "SRC_TELEMETRY_SENSITIVEMETADATA_ADDITIONAL_ALLOWED_EVENT_TYPES"


def cli(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


def _policy(tmp_path: Path, *allowlists: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"version: 1\nallowlists: [{', '.join(allowlists)}]\n"
        "kinds:\n  licensed_instance: {private_metadata: {mode: allowlist}}\n",
        encoding="utf-8",
    )
    return path


def test_a_value_becomes_an_allowlist_that_loads_and_that_lint_holds_until_reviewed(tmp_path: Path) -> None:
    out = tmp_path / "additions.yaml"
    done = cli("allowlist", "import", "cody.foo::used::model::languageId,search::*::lang", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and f"wrote 2 entries awaiting review to {out}" in done.stderr
    text = out.read_text(encoding="utf-8")
    assert re.search(rf"^# Imported by .* on \d{{4}}-\d\d-\d\d from the value of Sourcegraph's\n# {VARIABLE}\n", text)
    policy = load_policy(_policy(tmp_path, "additions.yaml"))
    assert {k: set(e.keys) for k, e in policy.allowlist.entries.items()} == {
        ("cody.foo", "used"): {"model", "languageId"},
        ("search", "*"): {"lang"},
    }

    held = cli("lint", str(tmp_path / "policy.yaml"))
    assert held.returncode == 1
    assert held.stdout.count("error[entry-awaiting-review]") == 2, held.stdout
    assert f"{out}:10:5: error[entry-awaiting-review] entry for cody.foo/used was imported and awaits review" in (
        held.stdout
    )

    # a reviewer writes the reason only: still held; then the approver too: clean
    reason_only = text.replace('"AWAITING REVIEW: say why these keys may leave (the use they serve)"', "Why.")
    out.write_text(reason_only, encoding="utf-8")
    assert cli("lint", str(tmp_path / "policy.yaml")).stdout.count("error[entry-awaiting-review]") == 2
    out.write_text(reason_only.replace('"AWAITING REVIEW"', "data team"), encoding="utf-8")
    reviewed = cli("lint", "--strict", str(tmp_path / "policy.yaml"))
    assert reviewed.returncode == 0, reviewed.stdout


def test_stdin_as_printenv_gives_it_and_stdout_gets_the_file(tmp_path: Path) -> None:
    done = cli("allowlist", "import", stdin=f"{VARIABLE}=cody.bar::*::model\n")
    assert done.returncode == 0, done.stderr
    (tmp_path / "from-stdin.yaml").write_text(done.stdout, encoding="utf-8")
    policy = load_policy(_policy(tmp_path, "from-stdin.yaml"))
    entry = policy.allowlist.lookup("cody.bar", "anything")
    assert entry is not None and entry.keys == {"model"} and entry.reason.startswith("AWAITING REVIEW")
    assert entry.approved_by == "AWAITING REVIEW"


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("foo.bar::baz", 'entry 1 "foo.bar::baz": missing allowlisted keys'),
        ("cody.a::b.c::k,,cody.d::e.f::k", 'entry 2 "": empty'),
        ("cody.a::x.y::k,", 'entry 2 "": empty'),
        ("Cody::use.d::k", "entry 1 \"Cody::use.d::k\": feature 'Cody' is not a valid event feature"),
        ("cody.a::use d::k", "entry 1 \"cody.a::use d::k\": action 'use d' is not a valid event action"),
        # Sourcegraph splits on "," alone: a space after a comma is part of the feature, which no event has
        ("cody.b::used::k, cody.a::used::k", "entry 2 \" cody.a::used::k\": feature ' cody.a' is not a valid"),
        ("cody.a::used::k::", 'entry 1 "cody.a::used::k::": an empty key'),
        ("cody.a::used::k::k", "entry 1 \"cody.a::used::k::k\": key 'k' given twice"),
        (
            "cody.a::used::k,cody.a::used::j",
            'entry 2 "cody.a::used::j": conflicts with entry 1 "cody.a::used::k" (one event type, different keys)',
        ),
        ("  \n", f"the value of {VARIABLE} is empty"),
    ],
)
def test_malformed_entries_are_named(value: str, named: str) -> None:
    with pytest.raises(MalformedValue) as refused:
        parse(value)
    assert [problem for problem in refused.value.problems if problem.startswith(named)]


def test_every_malformed_entry_is_named_at_once_exit_2_and_nothing_is_written(tmp_path: Path) -> None:
    out = tmp_path / "additions.yaml"
    done = cli("allowlist", "import", "-o", str(out), stdin="a.b::c.d::k,bad,x.y::Z::k,ok.ok::ok.ok::k\n")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"telemetry-guard allowlist import: cannot import the value of {VARIABLE}:",
        '  entry 2 "bad": missing allowlisted keys (expected feature::action::key1[::key2...])',
        "  entry 3 \"x.y::Z::k\": action 'Z' is not a valid event action (^[a-z][a-zA-Z.-]+$, at most 64 characters)",
    ]
    assert not out.exists() and done.stdout == ""


def test_an_identical_repeat_is_kept_and_lint_warns(tmp_path: Path) -> None:
    out = tmp_path / "additions.yaml"
    done = cli("allowlist", "import", "cody.a::used::k::j,cody.a::used::j::k", "-o", str(out))
    assert done.returncode == 0, done.stderr
    policy = load_policy(_policy(tmp_path, "additions.yaml"))
    assert len(policy.allowlist) == 1
    findings = cli("lint", str(out)).stdout
    assert f"{out}:15:5: warning[duplicate-entry]" in findings


def test_an_existing_file_is_kept_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "additions.yaml"
    out.write_text("keep me\n", encoding="utf-8")
    refused = cli("allowlist", "import", "cody.a::used::k", "-o", str(out))
    assert refused.returncode == 2 and f"{out} exists; use --force to overwrite it" in refused.stderr
    assert out.read_text(encoding="utf-8") == "keep me\n"
    forced = cli("allowlist", "import", "cody.a::used::k", "-o", str(out), "--force")
    assert forced.returncode == 0 and 'feature: "cody.a"' in out.read_text(encoding="utf-8")
