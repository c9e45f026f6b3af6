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
    assert "why:  removed marketing_tracking by kinds.licensed_instance.marketing_tracking" in out
    assert "- parameters.private_metadata.promptText" in out
    assert "- unknown field 99" in out
    # each event compactly: what the policy decides about, then only the names of the other fields
    assert 'in:   private_metadata: chatModel="claude-sonnet", promptText="fix the bug in auth.go"' in out
    assert "marketing_tracking: url, referrer, utm_campaign" in out
    assert (
        "also: timestamp, source, parameters.version, parameters.metadata, user, interaction; unknown field 99" in out
    )
    assert max(len(line) for line in out.splitlines() if not line.startswith("  ")) <= 120
    assert max(len(line) for line in out.splitlines() if "in:" in line or "also:" in line) <= 120
    # counts say what they count
    assert "client got:    OK, 5 of 5 events acknowledged" in out
    assert "gateway got:   5 events in 2 messages" in out
    assert "client sent:   1 message (PublishInstanceUserMetadata as licensed_instance)" in out
    assert "summary: 10 events sent; 8 reached the gateway, 0 removed whole, 8 acknowledged." in out
    assert "3 calls refused (1 PERMISSION_DENIED, 1 UNAUTHENTICATED, 1 UNIMPLEMENTED)." in out
    # removed values appear only on the lines of what came in, never on what left
    leaving = [line for line in out.splitlines() if line.strip().startswith(("out:", "why:"))]
    assert leaving
    for secret in ("fix the bug in auth.go", "repo:acme/payroll salary"):
        assert secret in out
        assert not any(secret in line for line in leaving)
    assert "secret-project" not in out  # a marketing URL is shown by its field name only
    # stderr carries no traceback and no removed value (grpc's C core may log a line there under load)
    assert "Traceback" not in done.stderr
    assert not any(secret in done.stderr for secret in ("fix the bug in auth.go", "secret-project", "payroll"))
