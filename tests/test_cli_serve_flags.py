"""The command line a newcomer meets: --version, and every flag of `serve` refused cleanly.

A flag that cannot work (a busy port, an unknown host, an unreadable or wrong file, a number
out of range) is one line on stderr naming the flag, and exit 2, before anything serves:
never a traceback, never gRPC's own words. Each case runs the real command.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from test_sidecar_support import HOST, ROOT, TIMEOUT, Sidecar, free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "telemetry_guard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run("serve", "--listen", f"{HOST}:0", *args, env=env)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_version_is_the_installed_distributions() -> None:
    done = run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"telemetry-guard {metadata.version('telemetry-guard')}"


def _one_clean_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "serving" not in done.stderr
    return lines[0]


def test_a_busy_serving_port_and_a_busy_metrics_port_are_one_line_and_exit_2(busy_port: int) -> None:
    line = _one_clean_line(run("serve", "--listen", f"{HOST}:{busy_port}"))
    assert line == f"telemetry-guard serve: --listen {HOST}:{busy_port}: cannot listen: address already in use"
    line = _one_clean_line(serve("--metrics-listen", f"{HOST}:{busy_port}"))
    assert line == f"telemetry-guard serve: --metrics-listen {HOST}:{busy_port}: cannot listen: address already in use"
    line = _one_clean_line(serve("--workers", "2", "--metrics-listen", f"{HOST}:{busy_port}"))
    assert "--metrics-listen" in line and "address already in use" in line


def test_bad_files_addresses_and_numbers_are_one_line_naming_the_flag(tmp_path: Path) -> None:
    text = tmp_path / "not-pem.txt"
    text.write_text("not a certificate\n")
    port = free_port()
    cases = [
        (["--listen", "nowhere"], "--listen 'nowhere' is not HOST:PORT"),
        (["--listen", "no-such-host.invalid:1"], "--listen no-such-host.invalid:1: cannot listen: unknown host"),
        (["--metrics-listen", f"{HOST}:{port}", "--listen", f"{HOST}:{port}"], "is the --listen address"),
        (["--gateway-output", str(tmp_path / "no-dir" / "out.jsonl")], "--gateway-output"),
        (["--tls-cert", str(text), "--tls-key", str(text)], "not a PEM certificate chain"),
        (["--upstream", f"{HOST}:1", "--upstream-ca", str(text)], f"--upstream-ca {text}: not a PEM CA bundle"),
        (["--introspection-url", "gateway.internal/introspect"], "--introspection-url"),
        (["--introspection-client-id", "sidecar"], "--introspection-client-id needs --introspection-url"),
        (["--reload-interval", "soon"], "argument --reload-interval: must be a number of seconds, not 'soon'"),
        (["--grace", "inf"], "argument --grace: must be a finite number of seconds"),
        (["--workers", "two"], "argument --workers: must be a whole number, not 'two'"),
        (["--max-message-bytes", str(2**31)], "argument --max-message-bytes: must be at most 2147483647"),
        (["--forward-metadata", "X-Tenant"], "argument --forward-metadata: 'X-Tenant' is not a gRPC metadata key"),
    ]
    for args, words in cases:
        done = serve(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and "serving" not in done.stderr, (args, done.stderr)
        if not words.startswith("argument"):  # argparse adds its usage lines; ours are one line
            assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)


def test_serving_logs_the_version_and_metrics_answer_on_metrics_only(tmp_path: Path) -> None:
    metrics_port = free_port()
    sidecar = Sidecar(["--metrics-listen", f"{HOST}:{metrics_port}", "--reload-interval", "0"], tmp_path)
    try:
        installed = metadata.version("telemetry-guard")
        assert sidecar.logs(message="serving")[0]["version"] == installed
        with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=TIMEOUT) as response:
            text = response.read().decode()
        assert f'telemetry_guard_build_info{{version="{installed}"}} 1.0' in text.splitlines()
        for path in ("/", "/metricsx", "/favicon.ico", "/metrics/more"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://{HOST}:{metrics_port}{path}", timeout=TIMEOUT)
            assert refused.value.code == 404, path
    finally:
        sidecar.kill()
