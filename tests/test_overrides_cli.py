"""Overrides end to end: the compliance commands on the example gateway policy, and a real sidecar."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_cli_errors import cli
from test_sidecar_support import (
    FORWARD_TAG,
    ServedUpstream,
    Sidecar,
    event,
    module_upstream,  # noqa: F401 (the module's `upstream` fixture)
    payload,
    record_events,
)

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
GATEWAY = EXAMPLES / "gateway.yaml"
ACME = "5a3c9e52-acme-0000-0000-000000000001"


# -- the compliance commands ------------------------------------------------------------------------


def test_lint_lists_the_override_rules_and_flags_a_spoofable_widening(tmp_path: Path) -> None:
    rules = cli("lint", "--list-rules")
    assert rules.returncode == 0
    (unverified,) = [line for line in rules.stdout.splitlines() if line.startswith("override-widening-unverified")]
    assert "error" in unverified and "cannot be acknowledged" in unverified
    assert any(line.startswith("override-widening ") for line in rules.stdout.splitlines())

    assert cli("lint", str(GATEWAY)).returncode == 0
    spoofable = tmp_path / "spoofable.yaml"
    spoofable.write_text(
        GATEWAY.read_text().replace(
            'license_key_sha256: "0000000000000000000000000000000000000000000000000000000000000000"',
            'external_url: "https://sourcegraph.com"',
        )
    )
    found = cli("lint", str(spoofable), "--format", "json")
    assert found.returncode == 1
    (finding,) = [f for f in json.loads(found.stdout)["findings"] if f["severity"] == "error"]
    assert finding["rule"] == "override-widening-unverified" and finding["line"] == 46


def test_audit_and_diff_show_the_overrides() -> None:
    audit = cli("audit", str(GATEWAY), "--format", "markdown")
    assert audit.returncode == 0, audit.stderr
    section = audit.stdout[audit.stdout.index("## Overrides: single identifiers") :]
    dotcom = next(line for line in section.splitlines() if "`overrides.sourcegraph-com`" in line)
    assert "**license key fingerprint**" in dotcom and "marketing\\_tracking" in dotcom
    acme = next(line for line in section.splitlines() if "`overrides.acme-cody-only`" in line)
    assert "self-reported fields only" in acme and f"`instance_id = {ACME}`" in acme

    as_json = json.loads(cli("audit", str(GATEWAY), "--format", "json").stdout)
    assert [(o["name"], o["verified"]) for o in as_json["overrides"]] == [
        ("sourcegraph-com", True),
        ("acme-cody-only", False),
    ]

    changed = cli("diff", str(EXAMPLES / "default.yaml"), str(GATEWAY), "--fail-on-widening")
    assert changed.returncode == 1, changed.stderr
    widening = changed.stdout[changed.stdout.index("WIDENING") : changed.stdout.index("narrowing")]
    assert "licensed_instance matched by overrides.sourcegraph-com: fields: marketing_tracking" in widening
    assert "acme-cody-only" not in widening


def test_explain_and_apply_take_an_override() -> None:
    explained = cli(
        "explain", str(GATEWAY), "--kind", "licensed_instance", "--override", "sourcegraph-com",
        "--feature", "search", "--action", "submitted",
    )  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert "matched by overrides.sourcegraph-com" in explained.stdout
    assert "every key leaves  [overrides.sourcegraph-com.private_metadata]" in explained.stdout
    wrong = cli(
        "explain", str(GATEWAY), "--kind", "workspace", "--override", "sourcegraph-com",
        "--feature", "search", "--action", "submitted",
    )  # fmt: skip
    assert wrong.returncode == 2 and "matches licensed_instance identifiers, not --kind workspace" in wrong.stderr

    line = json.dumps(
        {
            "events": {
                "events": [
                    {
                        "id": "x1",
                        "feature": "search",
                        "action": "submitted",
                        "timestamp": "2024-05-01T00:00:00Z",
                        "marketingTracking": {"url": "https://sourcegraph.com/search"},
                    }
                ]
            }
        }
    )
    applied = cli("apply", str(GATEWAY), "--kind", "licensed_instance", "--override", "sourcegraph-com", stdin=line)
    assert applied.returncode == 0, applied.stderr
    record = json.loads(applied.stdout)
    assert record["decision"]["override"] == "sourcegraph-com"
    assert record["leaves"]["events"]["events"][0]["marketing_tracking"]["url"] == "https://sourcegraph.com/search"
    plain = json.loads(cli("apply", str(GATEWAY), "--kind", "licensed_instance", stdin=line).stdout)
    assert "override" not in plain["decision"] and "marketing_tracking" not in plain["leaves"]["events"]["events"][0]


def test_cases_name_the_override_they_exercise(tmp_path: Path) -> None:
    passed = cli("test", str(GATEWAY), str(EXAMPLES / "cases" / "gateway.yaml"))
    assert passed.returncode == 0, passed.stdout
    assert "5 passed, 0 failed" in passed.stdout
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "version: 1\ncases:\n"
        "  - name: expects an override that does not apply\n"
        "    identifier: {unlicensed_instance: {instance_id: someone-else}}\n"
        "    request: {events: {events: []}}\n"
        "    expect: {override: acme-cody-only}\n"
        "  - name: names an override the policy does not have\n"
        "    override: nope\n"
        "    identifier: {unlicensed_instance: {instance_id: i}}\n"
        "    request: {events: {events: []}}\n"
        "    expect: {denial: null}\n"
    )
    failed = cli("test", str(GATEWAY), str(wrong))
    assert failed.returncode == 1
    assert "expected acme-cody-only to apply, got no override" in failed.stdout
    assert "the policy has no override 'nope' (it has: sourcegraph-com, acme-cody-only)" in failed.stdout


# -- a real sidecar ------------------------------------------------------------------------------------------

DOTCOM_KEY = "sidecar-test-dotcom-key"


@pytest.fixture(scope="module")
def sidecar(upstream: ServedUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("overrides")
    policy = tmp / "gateway.yaml"
    fingerprint = hashlib.sha256(DOTCOM_KEY.encode()).hexdigest()
    policy.write_text(GATEWAY.read_text().replace("0" * 64, fingerprint))
    process = Sidecar(["--upstream", upstream.target, "--policy", str(policy), *FORWARD_TAG], tmp)
    yield process
    process.kill()


def opening(identifier: pb.Identifier) -> pb.RecordEventsRequest:
    request = pb.RecordEventsRequest()
    request.metadata.request_id = "r-override"
    request.metadata.identifier.CopyFrom(identifier)
    return request


def test_the_sidecar_applies_an_override_per_stream(sidecar: Sidecar, upstream: ServedUpstream) -> None:
    def send(tag: str, identifier: pb.Identifier, *events: pb.Event) -> list[pb.Event]:
        upstream.servicer.reset(tag=tag)
        out = record_events(sidecar.stub(), [opening(identifier), payload(*events)])
        assert out.code == grpc.StatusCode.OK, out.details
        assert out.acked == {e.id for e in events}  # removed whole or forwarded, every event is acknowledged
        (call,) = upstream.servicer.received("RecordEvents")
        return call.events()

    dotcom = pb.Identifier()
    dotcom.licensed_instance.license_key = DOTCOM_KEY
    (kept,) = send("dotcom", dotcom, event("d1", private={"prompt": "kept for dotcom"}, marketing=True))
    assert kept.HasField("marketing_tracking") and dict(kept.parameters.private_metadata) == {
        "prompt": "kept for dotcom"
    }

    claimed = pb.Identifier()
    claimed.licensed_instance.license_key = "another-key"
    claimed.licensed_instance.external_url = "https://sourcegraph.com"
    (redacted,) = send("claimed", claimed, event("c1", private={"prompt": "removed"}, marketing=True))
    assert not redacted.HasField("marketing_tracking") and not redacted.parameters.private_metadata

    acme = pb.Identifier()
    acme.unlicensed_instance.instance_id = ACME
    forwarded = send("acme", acme, event("a1", feature="cody.chat"), event("a2", feature="search", action="submitted"))
    assert [e.id for e in forwarded] == ["a1"]

    # The audit trail says which override's rules applied to each payload, and only for its streams.
    payloads = [r for r in sidecar.logs(audit="decision") if r.get("events_in")]
    assert sorted((r.get("override", ""), r["events_in"], r["events_out"]) for r in payloads) == [
        ("", 1, 1),
        ("acme-cody-only", 2, 1),
        ("sourcegraph-com", 1, 1),
    ], payloads
    assert DOTCOM_KEY not in sidecar.log_text()
