"""Counters are exact: the same traffic gives the same removal counts at every log level, equal to
what `telemetry-guard apply` reports for the same request messages, one count per removal as the
metric's help says (whole events 1, private_metadata keys 1 each)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from test_sidecar_support import (
    POLICY,
    ROOT,
    TIMEOUT,
    Sidecar,
    dropped,
    event,
    free_port,
    invalid,
    metadata,
    payload,
    record_events,
    sensitive,
)

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# Two streams, one of each kind: apply reads protobuf JSON, which cannot carry unknown fields, so the
# stream compared with apply has none; the other has them too (counted per event under unknown_fields).
KIND = "licensed_instance"
UNKNOWNS_KIND = "unlicensed_instance"
RULE = "defaults"  # the test policy sets every rule under defaults:
LABELS = re.compile(r'(\w+)="([^"]*)"')


def _payloads(unknowns: bool) -> list[pb.RecordEventsRequest]:
    """Something for every rule: a private_metadata removed whole with three keys (3), keys and a
    non-string value removed from an allowlisted one, marketing, a dropped field, legacy metadata merged,
    unknown fields (if asked), events removed whole by the feature filter and as invalid."""
    whole = event("w1", feature="search", action="submitted", private={"a": "1", "b": "2", "c": "3"}, marketing=True)
    payloads = [
        payload(sensitive("s1"), whole, dropped("d1")),
        payload(invalid("i1"), event("u1", unknown=True), sensitive("s2")),
        payload(event("plain")),
    ]
    if not unknowns:
        for message in payloads:
            message.DiscardUnknownFields()
    return payloads


def _removals(metrics_port: int, kind: str) -> dict[str, float]:
    """telemetry_guard_removals_total per rule, for the kind's RecordEvents."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("telemetry_guard_removals_total{"):
            labels = dict(LABELS.findall(line))
            if labels["rpc"] == "RecordEvents" and labels["kind"] == kind:
                out[labels["rule"]] = float(line.rsplit(" ", 1)[1])
    return out


def _served_counts(tmp_path: Path, level: str) -> tuple[dict[str, float], dict[str, float]]:
    """Removal counts of a sidecar at this log level: (KIND's stream, UNKNOWNS_KIND's stream)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    metrics_port = free_port()
    sidecar = Sidecar(
        ["--policy", str(policy), "--log-level", level, "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--gateway-output", str(tmp_path / f"gateway-{level}.jsonl")],
        tmp_path,
    )  # fmt: skip
    try:
        for kind, unknowns in ((KIND, False), (UNKNOWNS_KIND, True)):
            out = record_events(sidecar.stub(), [metadata(kind), *_payloads(unknowns)])
            assert out.code == grpc.StatusCode.OK, out.details
        # a stream publishes its counts when it ends, before its status
        return _removals(metrics_port, KIND), _removals(metrics_port, UNKNOWNS_KIND)
    finally:
        sidecar.kill()


def _applied_counts(tmp_path: Path) -> dict[str, float]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    lines = tmp_path / "requests.jsonl"
    lines.write_text("".join(json.dumps(json_format.MessageToDict(p)) + "\n" for p in _payloads(False)))
    done = subprocess.run(
        [sys.executable, "-m", "telemetry_guard", "apply", str(policy), "--kind", KIND, "-i", str(lines), "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    total: Counter[str] = Counter()
    for line in done.stdout.splitlines():
        total.update(json.loads(line)["decision"]["removed_per_rule"])
    return {rule: float(count) for rule, count in total.items()}


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    return _applied_counts(tmp_path_factory.mktemp("apply"))


def test_apply_counts_one_per_removal_as_documented(applied: dict[str, float]) -> None:
    assert applied == {
        f"{RULE}.events.exclude": 1,  # d1, removed whole by the feature filter
        f"{RULE}.invalid_events": 1,  # i1
        f"{RULE}.marketing_tracking": 3,  # s1, w1, s2
        f"{RULE}.private_metadata": 3 + 1 + 1,  # w1's three keys (removed whole); s1's and s2's prompt
        f"{RULE}.private_metadata.non_string": 2,  # s1's and s2's otherCompletionProviders
        f"{RULE}.drop_fields": 2,  # s1's and s2's user.anonymous_user_id
        f"{RULE}.legacy_metadata": 2,  # s1's and s2's legacy metadata, merged
    }


@pytest.mark.parametrize("level", ["info", "debug"])
def test_removal_counts_are_the_same_at_every_log_level_and_equal_to_apply(
    tmp_path: Path, applied: dict[str, float], level: str
) -> None:
    served, with_unknowns = _served_counts(tmp_path, level)
    assert served == applied
    # The same payloads with unknown fields: one more count per event that had them (s1, u1, s2).
    assert with_unknowns == {**applied, f"{RULE}.unknown_fields": 3}
