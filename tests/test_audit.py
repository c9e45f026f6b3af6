"""telemetry-guard audit: the export surface, checked against the engine itself and rendered.

The strongest check here runs the engine: for every policy, kind and Event leaf field,
an event with that field set goes through Engine.record_events, and whether the field
is still there must be what the surface says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from telemetry_guard.policy import Engine, default_policy, load_policy
from telemetry_guard.policy.model import Policy
from telemetry_guard.policy.surface import collapse, event_leaves, surface
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "testdata" / "compliance"
POLICIES = {
    "default": ROOT / "docs" / "examples" / "default.yaml",
    "strict": ROOT / "docs" / "examples" / "strict.yaml",
    "permissive": ROOT / "docs" / "examples" / "permissive.yaml",
    "nuances": DATA / "audit" / "nuances.yaml",
}
IDENTIFIERS = {
    "licensed_instance": {"licensed_instance": {"license_key": "k"}},
    "unlicensed_instance": {"unlicensed_instance": {"instance_id": "i"}},
    "managed_service": {"managed_service": {"service_id": "s"}},
    "workspace": {"workspace": {"workspace_id": "w"}},
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
    )


# -- the surface agrees with the engine ------------------------------------------------------


def _set_leaf(event: dict[str, Any], path: str) -> None:
    """Give the leaf at path a value of its type (protobuf JSON, proto field names)."""
    descriptor = pb.Event.DESCRIPTOR
    node = event
    parts = path.split(".")
    for name in parts[:-1]:
        node = node.setdefault(name, {})
        descriptor = descriptor.fields_by_name[name].message_type
    fd = descriptor.fields_by_name[parts[-1]]
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_type = fd.message_type.fields_by_name["value"].cpp_type
        node[fd.name] = {"probeKey": "1" if value_type == fd.CPPTYPE_STRING else 1}
    elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Struct":
        node[fd.name] = {"probeKey": "probe"}
    elif fd.message_type is not None and fd.message_type.full_name == "google.protobuf.Timestamp":
        node[fd.name] = "2024-05-01T12:00:00Z"
    elif fd.is_repeated:
        node[fd.name] = ["probe"]
    elif fd.cpp_type == fd.CPPTYPE_STRING:
        node[fd.name] = "probe"
    else:
        node[fd.name] = 1


def _has(tree: dict[str, Any], path: str) -> bool:
    for name in path.split("."):
        if not isinstance(tree, dict) or name not in tree:
            return False
        tree = tree[name]
    return True


def _cases() -> list[tuple[str, str, str]]:
    return [(name, kind, leaf) for name in POLICIES for kind in IDENTIFIERS for leaf in event_leaves()]


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[Policy, Engine]]:
    out = {}
    for name, path in POLICIES.items():
        policy = load_policy(path)
        out[name] = (policy, Engine(policy))
    return out


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n in POLICIES for k in IDENTIFIERS])
def test_every_field_the_surface_says_leaves_does_leave(name: str, kind: str, loaded: dict[str, Any]) -> None:
    policy, engine = loaded[name]
    fields = {f.path: f for f in surface(policy).kind(kind).fields}
    identifier = json_format.ParseDict(IDENTIFIERS[kind], pb.Identifier())
    checked = 0
    required = ("id", "timestamp", "feature", "action")
    for leaf in event_leaves():
        event: dict[str, Any] = {"id": "e1", "feature": "cody.chat", "action": "submitted"}
        event["timestamp"] = "2024-05-01T12:00:00Z"
        if leaf not in required:
            _set_leaf(event, leaf)
        request = json_format.ParseDict({"events": {"events": [event]}}, pb.RecordEventsRequest())
        outcome = engine.record_events(request, identifier)
        if outcome.request is None:  # the kind may not call RecordEvents: nothing to compare
            continue
        out = json_format.MessageToDict(outcome.request, preserving_proto_field_name=True)["events"]["events"][0]
        status = fields[leaf].status
        if leaf in required:
            assert _has(out, leaf)
        elif status == "leaves":
            assert _has(out, leaf), f"{leaf} should leave ({fields[leaf]})"
        elif status == "removed":
            assert not _has(out, leaf), f"{leaf} should be removed ({fields[leaf]})"
        elif status == "merged":
            assert not _has(out, leaf) and out["parameters"]["metadata"] == {"probeKey": 1.0}
        else:  # allowlisted keys: no allowlist names probeKey, so it goes
            assert status == "allowlisted keys" and not _has(out, f"{leaf}.probeKey")
        checked += 1
    assert checked in (0, len(event_leaves()))


# -- the surface itself ------------------------------------------------------------------------


def test_default_policy_surface_matches_the_seed_rules() -> None:
    s = surface(default_policy())
    licensed, managed = s.kind("licensed_instance"), s.kind("managed_service")
    assert [(a.rpc, a.allowed, a.rule) for a in licensed.access] == [
        ("RecordEvents", True, "access.RecordEvents"),
        ("RecordEvent", False, ""),  # not served by the gateway: no policy key decides it
        ("PublishInstanceUserMetadata", False, "user_metadata.enabled"),
    ]
    assert [a.served for a in licensed.access] == [True, False, True]
    assert [a.served for a in managed.access] == [True, True, False]
    assert not licensed.credentials_required and managed.credentials_required
    fields = {f.path: f for f in licensed.fields}
    assert fields["marketing_tracking.utm_source"].status == "removed"
    assert fields["marketing_tracking.utm_source"].rule == "kinds.licensed_instance.marketing_tracking"
    assert fields["parameters.private_metadata"].status == "allowlisted keys"
    assert {f.path: f.status for f in managed.fields}["marketing_tracking.url"] == "leaves"
    assert len(licensed.private_metadata.event_types) == 28  # GATEWAY.md's table (cody.fixup.user once)
    assert managed.private_metadata.mode == "keep" and managed.private_metadata.event_types == ()
    assert not any(c.leaves for c in s.user_metadata.user_fields)
    assert s.sha256 == default_policy().sha256 and len(s.files) == 2


def test_nuances_filtered_entries_merged_legacy_and_user_metadata() -> None:
    s = surface(load_policy(POLICIES["nuances"]))
    unlicensed = s.kind("unlicensed_instance")
    filtered = {(e.feature, e.filtered_by) for e in unlicensed.private_metadata.event_types}
    assert ("blob.codeintel", "kinds.unlicensed_instance.events.include") in filtered
    assert ("cody.chat", None) in filtered
    fields = {f.path: f for f in unlicensed.fields}
    # merged legacy metadata would leave as parameters.metadata, which is dropped: removed
    assert (fields["parameters.legacy_metadata"].status, fields["parameters.legacy_metadata"].rule) == (
        "removed",
        "defaults.drop_fields",
    )
    assert fields["source.server.request_client.user_agent"].status == "removed"
    assert s.kind("workspace").private_metadata.mode == "drop"
    assert [(c.name, c.leaves) for c in s.user_metadata.user_fields] == [
        ("id", True),
        ("username", False),
        ("primary_email", False),
        ("assigned_rbac_roles", True),
    ]
    licensed = s.kind("licensed_instance")
    assert [a.allowed for a in licensed.access] == [True, False, True]


def test_collapse_groups_agreeing_leaves_up_to_top_level_fields() -> None:
    fields = surface(load_policy(POLICIES["strict"])).kind("managed_service").fields
    groups = {g.path: g for g in collapse(fields)}
    assert groups["marketing_tracking"].leaves == 11 and groups["marketing_tracking"].status == "removed"
    assert groups["interaction.geolocation"].status == "removed"
    assert groups["interaction.trace_id"].status == "leaves"
    assert "interaction" not in groups  # its leaves disagree
    assert groups["source.server.request_client.user_agent"].status == "removed"
    assert groups["source.server.request_client.api_client_name"].status == "leaves"
    assert sum(g.leaves for g in groups.values()) == len(event_leaves())


# -- the command --------------------------------------------------------------------------------


def test_cli_markdown_names_the_sha256_and_every_file() -> None:
    policy = load_policy(POLICIES["strict"])
    done = cli("audit", "docs/examples/strict.yaml")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("# Export surface of strict.yaml")
    assert f"`{policy.sha256}`" in out
    assert "- file read: `docs/examples/strict.yaml`" in out
    assert "- file read: `docs/examples/allowlists/strict.yaml`" in out
    assert "| `unlicensed_instance` | *allowlist* |" in out
    assert re.search(r"\| `interaction.geolocation` \|( \*\*removed\*\* `defaults.drop_fields` \|){4}\n", out)
    assert "`docs/examples/allowlists/strict.yaml:7`" in out


def test_cli_html_is_one_self_contained_file_with_everything_escaped(tmp_path: Path) -> None:
    out = tmp_path / "audit.html"
    done = cli("audit", str(POLICIES["nuances"]), "--format", "html", "-o", str(out))
    assert done.returncode == 0 and done.stdout == "", done.stderr
    html = out.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "<script" not in html and "<link" not in html and "src=" not in html and "@import" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more." in html
    assert "<table>" in html and "<style>" in html
    assert load_policy(POLICIES["nuances"]).sha256 in html


def test_cli_json_is_the_surface() -> None:
    done = cli("audit", "builtin:default", "--format", "json")
    assert done.returncode == 0
    data = json.loads(done.stdout)
    assert data["format"] == "telemetry-guard.audit/1"
    assert [k["kind"] for k in data["kinds"]] == list(IDENTIFIERS)
    assert data["sha256"] == default_policy().sha256
    workspace = data["kinds"][3]
    assert {
        "rpc": "RecordEvent",
        "allowed": False,
        "rule": "",
        "credentials_required": True,
        "served": False,
    } in workspace["access"]
    assert data["credentials_scopes"] == ["telemetry_gateway::events::write"]
    assert data["verifier"] == "bearer-present"
    assert data["user_metadata"]["enabled"] is False


def test_html_head_shows_date_version_and_fingerprint_and_code_names_wrap_only_at_separators() -> None:
    from datetime import UTC, datetime
    from importlib.metadata import version

    from telemetry_guard.render.html import surface_html

    policy = load_policy(ROOT / "docs" / "examples" / "strict.yaml")
    html = surface_html(surface(policy), generated=datetime(2026, 3, 4, 5, 6, tzinfo=UTC))
    head = html[html.index("<h1>") : html.index("</section>")]
    meta = re.search(r'<div class="meta">(.*?)</div>', head)
    assert meta, "the report's head has the date, the version and the fingerprint"
    text = re.sub(r"<[^>]+>", "", meta[1])
    assert "generated: 2026-03-04 05:06 UTC" in text
    assert f"by: telemetry-guard {version('telemetry-guard')}" in text
    assert f"fingerprint (sha256 of every file read): {policy.sha256}" in text
    # A long code name may wrap after a dot, a slash or a colon, never inside a word.
    assert "<code>interaction.<wbr>parent_interaction_id</code>" in html
    assert "<code>docs/<wbr>examples/<wbr>allowlists/<wbr>strict.<wbr>yaml:<wbr>12</code>" in html
    style = html[html.index("<style>") : html.index("</style>")]
    code_rule = re.search(r"\ncode \{([^}]*)\}", style)
    assert code_rule and "anywhere" not in code_rule[1] and "break-all" not in code_rule[1]
    # Wide tables scroll inside their own box instead of squeezing words on a narrow screen.
    assert html.count('<div class="wide"><table>') == html.count("<table>")


def test_shipped_files_read_by_their_builtin_names_outside_the_checkout(tmp_path: Path) -> None:
    """An installed package's files would show by their site-packages paths: outside the working directory a
    reviewer reads builtin:default and builtin:sourcegraph (with the line of an entry), never the path."""
    for fmt in ("markdown", "html"):
        done = subprocess.run(
            [sys.executable, "-m", "telemetry_guard", "audit", "builtin:default", "--format", fmt],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        out = done.stdout.replace("<wbr>", "")  # where HTML lets a name break
        assert "builtin:default" in out and "builtin:sourcegraph" in out
        assert re.search(r"builtin:sourcegraph:\d+", out)
        assert str(ROOT) not in out and "site-packages" not in out
