"""telemetry-guard apply (protobuf JSON lines through the engine, streamed) and explain."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from telemetry_guard.commands.apply import read_lines
from telemetry_guard.policy import default_policy, load_policy
from telemetry_guard.policy.cases import parse_error_text
from telemetry_guard.policy.surface import explain
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "testdata" / "compliance" / "apply"
EXAMPLES = ROOT / "docs" / "examples"
COMMAND = [sys.executable, "-m", "telemetry_guard"]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, cwd=ROOT, timeout=60, input=stdin)


# -- apply ----------------------------------------------------------------------------------------


def test_apply_writes_what_leaves_and_the_decision_per_line() -> None:
    done = cli("apply", "builtin:default", "--kind", "licensed_instance", "-i", str(DATA / "requests.jsonl"))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 4]  # line 3 is blank
    metadata, cody, search = records
    assert metadata["leaves"]["metadata"]["request_id"] == "r-1"
    event = cody["leaves"]["events"]["events"][0]
    assert "marketing_tracking" not in event
    assert event["parameters"]["private_metadata"] == {"languageId": "go"}
    assert cody["decision"]["removed_per_rule"] == {
        "kinds.licensed_instance.marketing_tracking": 1,
        "kinds.licensed_instance.private_metadata": 1,
    }
    assert "private_metadata" not in search["leaves"]["events"]["events"][0]["parameters"]
    assert "SECRET" not in done.stdout and "SECRET" not in done.stderr
    assert done.stderr.startswith("telemetry-guard apply: 3 messages, 0 refused, 0 lines rejected, events 2 in / 2 out")


def test_apply_names_removed_keys_only_with_show_keys() -> None:
    done = cli("apply", "builtin:default", "--kind", "licensed_instance", "-i", str(DATA / "requests.jsonl"), "-q")
    keyed = cli(
        "apply", "builtin:default", "--kind", "licensed_instance", "-i", str(DATA / "requests.jsonl"), "--show-keys"
    )
    assert done.stderr == ""
    assert "SECRETKEYNAME" not in done.stdout
    removal = json.loads(keyed.stdout.splitlines()[1])["decision"]["events"][0]["removals"][1]
    assert removal["keys"] == ["SECRETKEYNAME"]
    assert "SECRET-value" not in keyed.stdout and "SECRET-url" not in keyed.stdout


def test_apply_reports_bad_lines_by_number_without_their_values_and_goes_on() -> None:
    done = cli("apply", "builtin:default", "--kind", "licensed_instance", "-i", str(DATA / "bad.jsonl"))
    assert done.returncode == 2
    assert [json.loads(line)["line"] for line in done.stdout.splitlines()] == [1, 6]
    name = str(DATA / "bad.jsonl")
    assert f"{name}:2: not a RecordEventsRequest: field timestamp has a value of the wrong type or form at " in (
        done.stderr
    )
    assert f"{name}:3: not JSON (Expecting value: line 1 column 1 (char 0))" in done.stderr
    assert f"{name}:4: not a RecordEventsRequest: field userId has a value of the wrong type or form" in done.stderr
    assert f"{name}:5: the message's identifier is a workspace, not --kind licensed_instance" in done.stderr
    assert "SECRET" not in done.stderr and "Traceback" not in done.stderr


def test_apply_record_event_refusal_and_placeholder_identifier() -> None:
    lines = "\n".join(
        [
            json.dumps({"event": {"id": "u1", "feature": "cody.chat", "action": "submitted"}}),
            json.dumps({"metadata": {"identifier": {"managedService": {"serviceId": "svc"}}}, "event": {"id": "u2"}}),
        ]
    )
    refused = cli("apply", "builtin:default", "--kind", "licensed_instance", "--rpc", "RecordEvent", stdin=lines)
    assert refused.returncode == 2  # line 2 is a managed_service, not a licensed_instance
    first = json.loads(refused.stdout.splitlines()[0])
    assert first["leaves"] is None
    assert first["decision"]["denial"]["code"] == "UNIMPLEMENTED"  # the gateway serves managed services only
    assert first["decision"]["denial"]["rule"] == "identifier"
    assert first["decision"]["denial"]["message"] == "unsupported identifier type"
    allowed = cli("apply", "builtin:default", "--kind", "managed_service", "--rpc", "RecordEvent", "-q", stdin=lines)
    assert allowed.returncode == 0, allowed.stderr
    placeheld, own = (json.loads(line) for line in allowed.stdout.splitlines())
    assert placeheld["leaves"]["metadata"]["identifier"] == {"managed_service": {"service_id": "telemetry-guard-apply"}}
    assert own["leaves"]["metadata"]["identifier"] == {"managed_service": {"service_id": "svc"}}


def test_apply_streams_each_result_before_the_input_ends_and_reports_progress() -> None:
    line = json.dumps({"events": {"events": [{"id": "s1", "feature": "cody.chat", "action": "submitted"}]}}) + "\n"
    with subprocess.Popen(
        [*COMMAND, "apply", "builtin:default", "--kind", "workspace", "--progress"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(line)
        proc.stdin.flush()
        first = proc.stdout.readline()  # arrives while stdin is still open
        assert json.loads(first)["line"] == 1
        time.sleep(1.1)
        proc.stdin.write(line)
        proc.stdin.close()
        rest = proc.stdout.read()
        errors = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    assert json.loads(rest)["line"] == 2
    assert "telemetry-guard apply: 2 lines, 1 messages" in errors
    assert errors.rstrip().splitlines()[-1].startswith("telemetry-guard apply: 2 messages")


def test_read_lines_skips_an_over_long_line_without_holding_it() -> None:
    stream = io.BytesIO(b"short\n" + b"x" * 100 + b"\nafter\nlast")
    assert list(read_lines(stream, limit=10)) == [(1, b"short\n"), (2, None), (3, b"after\n"), (4, b"last")]


def test_parse_errors_name_places_but_never_values() -> None:
    from google.protobuf import json_format

    for text in (
        '{"events": {"events": [{"timestamp": "SECRET"}]}}',
        '{"events": {"events": [{"user": {"userId": "SECRET"}}]}}',
        '{"SECRET": 1}',
        "SECRET",
        '{"events": {"events": [{"parameters": {"version": "SECRET"}}]}}',
    ):
        try:
            json_format.Parse(text, pb.RecordEventsRequest())
        except json_format.ParseError as exc:
            message = parse_error_text(exc, "RecordEventsRequest")
        else:
            raise AssertionError(f"{text} parsed")
        assert message.startswith(("not a RecordEventsRequest", "not JSON"))
        if "no field named" not in message:  # an unknown field name is a key, named on purpose
            assert "SECRET" not in message, message


# -- explain --------------------------------------------------------------------------------------


def test_explain_allowlisted_event_type_names_the_entry_and_why() -> None:
    done = cli(
        "explain", "builtin:default", "--kind", "licensed_instance", "--feature", "cody.completion", "--action", "x"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("event type cody.completion/x from a licensed_instance caller, under default.yaml")
    assert "can it leave at all: yes" in out
    assert (
        "only these keys leave: languageId, otherCompletionProviders, providerModel, resolvedModel  "
        "[kinds.licensed_instance.private_metadata]" in out
    )
    assert " at allowlists/sourcegraph.yaml:16; reason: Completion usage per language (languageId)" in out
    assert re.search(r"\n  marketing_tracking +removed  \[kinds.licensed_instance.marketing_tracking\]\n", out)
    assert re.search(r"\n  validity +forwarded; the gateway will reject it  \[defaults.invalid_events\]\n", out)
    as_json = cli(
        "explain",
        "docs/examples/strict.yaml",
        "--kind",
        "unlicensed_instance",
        "--feature",
        "search",
        "--action",
        "submitted",
        "--format",
        "json",
    )
    data = json.loads(as_json.stdout)
    assert data["format"] == "telemetry-guard.explain/1" and data["leaves"] is False
    step = next(s for s in data["steps"] if s["topic"] == "event filter")
    assert (step["outcome"], step["rule"]) == ("the whole event is removed", "kinds.unlicensed_instance.events.include")


def test_explain_steps_for_each_situation() -> None:
    strict = load_policy(EXAMPLES / "strict.yaml")

    def step(e: object, topic: str) -> tuple[str, str]:
        found = next(s for s in e.steps if s.topic == topic)  # type: ignore[attr-defined]
        return found.outcome, found.rule

    invalid = explain(strict, "licensed_instance", "Bad_Name", "x")
    assert step(invalid, "validity") == ("the whole event is removed", "defaults.invalid_events")
    assert not invalid.leaves
    unlisted = explain(strict, "managed_service", "search", "submitted")
    assert step(unlisted, "private_metadata") == (
        "removed: no allowlist entry for this event type",
        "defaults.private_metadata",
    )
    assert step(unlisted, "drop_fields interaction.geolocation") == ("removed", "defaults.drop_fields")
    assert step(unlisted, "legacy_metadata") == ("merged into parameters.metadata", "defaults.legacy_metadata")
    assert step(unlisted, "access RecordEvent") == ("allowed", "access.RecordEvent")
    kept = explain(default_policy(), "managed_service", "search", "submitted")
    assert step(kept, "private_metadata") == ("every key leaves", "defaults.private_metadata")
    assert step(kept, "validity")[1] == "defaults.invalid_events" and kept.leaves
    refused = explain(default_policy(), "workspace", "cody.chat", "submitted")
    assert step(refused, "access RecordEvent") == ("refused by the gateway", "")
    narrowed = explain(
        load_policy(ROOT / "tests" / "testdata" / "policies" / "access.yaml"),
        "managed_service",
        "cody.chat",
        "submitted",
    )
    assert step(narrowed, "access RecordEvent") == ("refused", "access.RecordEvent")
