"""A policy that lint refuses never serves: not at start, not on reload, not in the interceptors,
unless the operator allows it explicitly (then its findings are logged at error on every load)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from test_sidecar_support import (
    FORWARD_TAG,
    POLICY,
    ROOT,
    TIMEOUT,
    ServedUpstream,
    Sidecar,
    event,
    free_port,
    metadata,
    payload,
    record_events,
    wait_for,
)

from telemetry_guard.interceptors import AsyncGuardServerInterceptor, GuardServerInterceptor, wrap_channel
from telemetry_guard.policy import load_policy
from telemetry_guard.policy.safety import UnsafePolicyError, check_enforceable

PERMISSIVE = ROOT / "docs" / "examples" / "permissive.yaml"
KEEP_MARKETING = POLICY.replace("marketing_tracking: drop", "marketing_tracking: keep")
MARKETING_RULE = "marketing-tracking-single-tenant"


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def _marketing_kept(upstream: ServedUpstream, event_id: str) -> bool:
    (found,) = [e for e in upstream.servicer.events() if e.id == event_id]
    return found.HasField("marketing_tracking")


# -- the library ---------------------------------------------------------------------------------


def test_a_policy_lint_refuses_is_refused_for_enforcement_with_its_findings() -> None:
    policy = load_policy(PERMISSIVE)  # loads: audit, diff and test read it
    with pytest.raises(UnsafePolicyError) as refused:
        check_enforceable(policy)
    text = str(refused.value)
    # file:line:column and the rule of each finding; line 24 is `marketing_tracking: keep`
    assert f"permissive.yaml:24:3: {MARKETING_RULE}: lint error" in text
    rules = {finding.rule for finding in refused.value.findings}
    assert {MARKETING_RULE, "private-metadata-keep-single-tenant", "unknown-fields-kept"} <= rules
    assert all(finding.severity == "error" and not finding.acknowledged for finding in refused.value.findings)


@pytest.mark.parametrize(
    "build",
    [
        GuardServerInterceptor,
        AsyncGuardServerInterceptor,
        lambda policy, **kw: wrap_channel(grpc.insecure_channel("127.0.0.1:1"), policy, **kw),
    ],
    ids=["server", "aio-server", "client"],
)
def test_interceptors_refuse_an_unsafe_policy_unless_allowed(build: object, caplog: pytest.LogCaptureFixture) -> None:
    policy = load_policy(PERMISSIVE)
    with pytest.raises(UnsafePolicyError, match=MARKETING_RULE):
        build(policy)  # type: ignore[operator]
    with caplog.at_level(logging.ERROR, logger="telemetry_guard.policy"):
        assert build(policy, allow_unsafe_policy=True) is not None  # type: ignore[operator]
    (logged,) = [r for r in caplog.records if r.name == "telemetry_guard.policy"]
    assert logged.levelno == logging.ERROR and MARKETING_RULE in logged.getMessage()


def test_an_acknowledged_finding_does_not_refuse(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("unknown_fields: discard", "unknown_fields: keep"))
    with pytest.raises(UnsafePolicyError, match="unknown-fields-kept"):
        check_enforceable(load_policy(path))
    path.write_text(path.read_text() + "acknowledged: [unknown-fields-kept]\n")
    assert check_enforceable(load_policy(path)) == ()


# -- the sidecar ---------------------------------------------------------------------------------


def test_serve_refuses_to_start_with_an_unsafe_policy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "telemetry_guard", "serve", "--listen", "127.0.0.1:0", "--policy", str(PERMISSIVE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"docs/examples/permissive.yaml:24:3: {MARKETING_RULE}: lint error" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reload_to_an_unsafe_policy_is_refused_and_the_policy_in_force_stays(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    metrics_port = free_port()
    sidecar = Sidecar(
        ["--upstream", upstream.target, "--policy", str(policy), "--reload-interval", "0",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", *FORWARD_TAG],
        tmp_path,
    )  # fmt: skip
    started.append(sidecar)
    policy.write_text(KEEP_MARKETING)
    sidecar.signal(signal.SIGHUP)
    (refused,) = wait_for(lambda: sidecar.logs(message="policy reload refused; the policy in force stays"))
    assert refused["level"] == "error"
    assert any(f"policy.yaml:14:3: {MARKETING_RULE}: lint error" in problem for problem in refused["problems"])
    assert _metric(metrics_port, 'telemetry_guard_policy_reload_failures_total{trigger="signal"}') == 1
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("m", marketing=True))])
    assert out.code == grpc.StatusCode.OK, out.details
    assert not _marketing_kept(upstream, "m"), "the policy in force stays: marketing is still removed"


def test_allow_unsafe_policy_serves_it_and_logs_its_findings_at_error_on_every_load(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KEEP_MARKETING)
    sidecar = Sidecar(
        ["--upstream", upstream.target, "--policy", str(policy), "--reload-interval", "0", "--allow-unsafe-policy",
         *FORWARD_TAG],
        tmp_path,
    )  # fmt: skip
    started.append(sidecar)

    def unsafe() -> list[dict[str, object]]:
        return [r for r in sidecar.logs(level="error") if str(r["message"]).startswith("enforcing a policy that lint")]

    (first,) = unsafe()
    assert any(MARKETING_RULE in str(f) for f in first["findings"])  # type: ignore[union-attr]
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("k", marketing=True))])
    assert out.code == grpc.StatusCode.OK, out.details
    assert _marketing_kept(upstream, "k"), "allowed explicitly: the policy is what it says"
    policy.write_text(KEEP_MARKETING + "# touched\n")
    sidecar.signal(signal.SIGHUP)
    wait_for(lambda: sidecar.logs(message="policy reloaded"), what="the reload")
    assert len(unsafe()) == 2, "logged again on the reload"
