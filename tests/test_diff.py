"""telemetry-guard diff: widening and narrowing of the export surface, and the CI gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from telemetry_guard.policy import default_policy, load_policy
from telemetry_guard.policy.surface import Change, SurfaceDiff, diff, surface

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "testdata" / "compliance" / "diff"
EXAMPLES = ROOT / "docs" / "examples"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


def compare(old: Path, new: Path) -> SurfaceDiff:
    return diff(surface(load_policy(old)), surface(load_policy(new)))


def keys(changes: tuple[Change, ...]) -> set[tuple[str, str, str]]:
    return {(c.kind, c.area, c.subject) for c in changes}


def test_the_example_default_is_the_shipped_default() -> None:
    result = diff(surface(default_policy()), surface(load_policy(EXAMPLES / "default.yaml")))
    assert result.changes == ()


def test_widening_lists_each_new_way_out() -> None:
    result = compare(DATA / "base.yaml", DATA / "wider.yaml")
    assert result.narrowing == () and result.by_direction("changed") == ()
    widening = keys(result.widening)
    for kind in ("licensed_instance", "unlicensed_instance", "managed_service", "workspace"):
        assert (kind, "fields", "interaction.geolocation") in widening
        assert (kind, "private_metadata", "blob.codeintel/* (any action)") in widening
        assert (kind, "private_metadata", "cody.completion/* (any action)") in widening
        assert (kind, "invalid_events", "events the gateway would reject") in widening
    assert ("workspace", "access", "RecordEvents") in widening
    assert ("managed_service", "unknown_fields", "field numbers this proto does not know") in widening
    assert ("unlicensed_instance", "events", "feature cody.internal") in widening
    assert ("unlicensed_instance", "events", "any other feature") in widening
    assert len(widening) == 20
    added = next(c for c in result.widening if c.subject == "cody.completion/* (any action)")
    assert (added.old, added.new) == (
        "languageId",
        "languageId, otherCompletionProviders (adds otherCompletionProviders)",
    )
    unknown = next(c for c in result.widening if c.area == "unknown_fields")
    assert (unknown.old, unknown.new) == (
        "discard (strictest-default.unknown_fields)",
        "keep (kinds.managed_service.unknown_fields)",
    )


def test_default_to_permissive_widens_the_single_tenant_protections() -> None:
    result = diff(surface(default_policy()), surface(load_policy(EXAMPLES / "permissive.yaml")))
    widening = keys(result.widening)
    assert ("licensed_instance", "fields", "marketing_tracking (11 fields)") in widening
    assert ("licensed_instance", "private_metadata", "every event type") in widening
    # permissive lists licensed_instance under RecordEvent too: the gateway serves it no such kind, so nothing widens.
    assert ("licensed_instance", "access", "RecordEvent") not in widening
    assert ("licensed_instance", "access", "PublishInstanceUserMetadata") in widening
    assert ("workspace", "credentials", "bearer token") in widening
    assert ("", "user_metadata", "user_fields.primary_email") in widening
    assert ("unlicensed_instance", "private_metadata", "search/submitted") in widening
    # permissive's fixed replacement string says less than the default's marker (which names the value's kind)
    assert ("unlicensed_instance", "private_metadata", "non-string values of allowed keys") in keys(result.narrowing)
    # The permissive allowlist drops Sourcegraph's entries: narrowing for unlicensed instances.
    assert ("unlicensed_instance", "private_metadata", "cody.hoverCommands/visible") in keys(result.narrowing)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (DATA / "base.yaml", DATA / "wider.yaml"),
        (EXAMPLES / "default.yaml", EXAMPLES / "permissive.yaml"),
        (EXAMPLES / "strict.yaml", EXAMPLES / "default.yaml"),
        (EXAMPLES / "strict.yaml", DATA / "wider.yaml"),
    ],
)
def test_diff_is_symmetric(old: Path, new: Path) -> None:
    forward, backward = compare(old, new), compare(new, old)
    assert forward.changes, "a pair that differs"
    assert keys(forward.widening) == keys(backward.narrowing)
    assert keys(forward.narrowing) == keys(backward.widening)
    assert keys(forward.by_direction("changed")) == keys(backward.by_direction("changed"))


def test_strict_is_narrower_than_default_everywhere() -> None:
    result = compare(EXAMPLES / "default.yaml", EXAMPLES / "strict.yaml")
    assert result.widening == ()
    narrowing = keys(result.narrowing)
    assert ("managed_service", "fields", "marketing_tracking (11 fields)") in narrowing
    assert ("unlicensed_instance", "events", "any other feature") in narrowing
    assert ("", "user_metadata", "user_fields.id") not in narrowing  # disabled in both


def test_cli_fail_on_widening_is_a_ci_gate() -> None:
    base, wider = "tests/testdata/compliance/diff/base.yaml", "tests/testdata/compliance/diff/wider.yaml"
    gate = cli("diff", "--fail-on-widening", base, wider)
    assert gate.returncode == 1, gate.stderr
    assert "WIDENING: may leave now, could not before (20):" in gate.stdout
    assert "  workspace: access: RecordEvents: refused (access.RecordEvents) -> allowed (access.RecordEvents)" in (
        gate.stdout
    )
    narrowing_only = cli("diff", "--fail-on-widening", wider, base)
    assert narrowing_only.returncode == 0 and "narrowing: can no longer leave (20):" in narrowing_only.stdout
    plain = cli("diff", base, wider, "--format", "json")
    assert plain.returncode == 0
    data = json.loads(plain.stdout)
    assert data["summary"] == {"widening": 20, "narrowing": 0, "changed": 0}
    assert data["old"]["sha256"] == load_policy(DATA / "base.yaml").sha256


def test_cli_markdown_and_no_change() -> None:
    md = cli("diff", "docs/examples/default.yaml", "docs/examples/strict.yaml", "--format", "markdown")
    assert md.returncode == 0
    assert md.stdout.startswith("# Policy change: what may leave")
    assert "## Narrowing: can no longer leave" in md.stdout and "## Widening" not in md.stdout
    assert "| managed\\_service | fields | `marketing_tracking (11 fields)` | leaves" in md.stdout
    same = cli("diff", "builtin:default", "docs/examples/default.yaml")
    assert same.returncode == 0 and "no change to what may leave" in same.stdout
