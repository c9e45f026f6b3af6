"""`telemetry-guard demo` (the README's main command): runs by itself, quickly, and shows the filtering."""

from __future__ import annotations

import subprocess
import sys
import time

from test_sidecar_support import ROOT


def test_demo_runs_the_sidecar_and_shows_what_the_policy_removed() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "telemetry_guard", "demo"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    out = done.stdout
    assert "sidecar on 127.0.0.1:" in out and "embedded gateway on 127.0.0.1:" in out
    # every identifier kind, both RPC shapes that pass, the refusals
    for kind in ("licensed_instance", "unlicensed_instance", "managed_service", "workspace"):
        assert f"as {kind}" in out
    assert "UNAUTHENTICATED" in out and "PERMISSION_DENIED" in out
    # what the default policy removes, and the rule that removed it
    assert "removed marketing_tracking by kinds.licensed_instance.marketing_tracking" in out
    assert "- parameters.private_metadata.promptText" in out
    assert "- unknown field 99" in out
    # removed values appear only on the lines of what came in, never on what left
    leaving = [line for line in out.splitlines() if line.strip().startswith(("out:", "why:"))]
    assert leaving
    for secret in ("fix the bug in auth.go", "secret-project", "repo:acme/payroll salary"):
        assert secret in out
        assert not any(secret in line for line in leaving)
    # stderr carries no traceback and no removed value (grpc's C core may log a line there under load)
    assert "Traceback" not in done.stderr
    assert not any(secret in done.stderr for secret in ("fix the bug in auth.go", "secret-project", "payroll"))
