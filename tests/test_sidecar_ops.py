"""Running the sidecar for real: reload, graceful shutdown, an unreachable upstream, token
introspection, --workers, TLS and usage errors. Each test starts its own `telemetry-guard serve`.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.metadata import version
from pathlib import Path

import grpc
import pytest
from test_sidecar_support import (
    BEARER,
    FORWARD_TAG,
    POLICY,
    ROOT,
    TIMEOUT,
    Lockstep,
    ServedUpstream,
    Sidecar,
    event,
    free_port,
    metadata,
    payload,
    publish_metadata,
    record_event_request,
    record_events,
    serve_upstream,
    unary,
    users,
    wait_for,
)


def _start(started: list[Sidecar], tmp: Path, *args: str, workers: int = 1) -> Sidecar:
    process = Sidecar([*args, *FORWARD_TAG], tmp, workers=workers)
    started.append(process)
    return process


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def _marketing_kept(upstream: ServedUpstream, event_id: str) -> bool:
    (found,) = [e for e in upstream.servicer.events() if e.id == event_id]
    return found.HasField("marketing_tracking")


KEEP_MARKETING = POLICY.replace("marketing_tracking: drop", "marketing_tracking: keep")


# -- reload -------------------------------------------------------------------------------------


def test_sighup_reloads_a_valid_policy_refuses_an_invalid_one_and_streams_keep_theirs(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KEEP_MARKETING)  # lint refuses it: allowed explicitly, to tell the two policies apart
    metrics_port = free_port()
    sidecar = _start(
        started, tmp_path, "--upstream", upstream.target, "--policy", str(policy), "--reload-interval", "0",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--allow-unsafe-policy",
    )  # fmt: skip
    old = Lockstep(sidecar.stub())  # a stream in flight under the first policy
    old.send(metadata("licensed_instance"))
    old.send(payload(event("a", marketing=True)))
    assert list(old.next_response().succeeded_events) == ["a"]
    assert _marketing_kept(upstream, "a")

    policy.write_text(POLICY)  # marketing_tracking: drop
    sidecar.signal(signal.SIGHUP)
    wait_for(lambda: sidecar.logs(message="policy reloaded", trigger="signal"), what="the reload")
    old.send(payload(event("b", marketing=True)))
    assert list(old.next_response().succeeded_events) == ["b"]
    assert _marketing_kept(upstream, "b"), "a stream in flight must keep the policy it started with"
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("c", marketing=True))])
    assert out.code == grpc.StatusCode.OK, out.details
    assert not _marketing_kept(upstream, "c"), "a new stream takes the new policy"

    policy.write_text(KEEP_MARKETING.replace("version: 1", "version: 1\nnot_a_key: true"))
    sidecar.signal(signal.SIGHUP)
    refused = wait_for(lambda: sidecar.logs(message="policy reload refused; the policy in force stays"), what="refusal")
    assert refused[0]["level"] == "error" and refused[0]["trigger"] == "signal"
    assert any("not_a_key" in problem for problem in refused[0]["problems"])
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("d", marketing=True))])
    assert out.code == grpc.StatusCode.OK, out.details
    assert not _marketing_kept(upstream, "d"), "the last valid policy stays in force"
    old.close()
    assert old.rest().code == grpc.StatusCode.OK

    metrics = _metrics(metrics_port)
    assert metrics['telemetry_guard_policy_reloads_total{trigger="signal"}'] == 1
    assert metrics['telemetry_guard_policy_reload_failures_total{trigger="signal"}'] == 1
    in_force = [k for k, v in metrics.items() if k.startswith("telemetry_guard_policy_info{") and v == 1]
    assert len(in_force) == 1 and sidecar.logs(message="policy reloaded")[0]["sha256"] in in_force[0]


ALLOWLIST = """\
version: 1
entries:
  - feature: cody.completion
    action: "*"
    keys: [languageId]
    reason: test
"""


def _watching(tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]) -> tuple[Sidecar, Path, Path]:
    """A sidecar polling its files every 0.1 s; its policy on allow.yaml. (sidecar, policy, allow.yaml)"""
    allow = tmp_path / "allow.yaml"
    allow.write_text(ALLOWLIST)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("allowlists: [builtin:sourcegraph]", "allowlists: [allow.yaml]"))
    sidecar = _start(
        started, tmp_path, "--upstream", upstream.target, "--policy", str(policy), "--reload-interval", "0.1"
    )
    return sidecar, policy, allow


def test_a_change_of_an_allowlist_file_is_picked_up_and_an_invalid_one_refused(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    sidecar, _policy, allow = _watching(tmp_path, upstream, started)

    def kept_keys(event_id: str) -> set[str]:
        private = {"languageId": "go", "triggerKind": "auto"}
        out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event(event_id, private=private))])
        assert out.code == grpc.StatusCode.OK, out.details
        (found,) = [e for e in upstream.servicer.events() if e.id == event_id]
        return set(found.parameters.private_metadata)

    assert kept_keys("k1") == {"languageId"}
    allow.write_text(ALLOWLIST.replace("keys: [languageId]", "keys: [languageId, triggerKind]"))
    wait_for(lambda: sidecar.logs(message="policy reloaded", trigger="file"), what="the reload")
    assert kept_keys("k2") == {"languageId", "triggerKind"}
    allow.write_text(ALLOWLIST.replace("    reason: test\n", ""))  # every entry needs a reason
    wait_for(lambda: sidecar.logs(message="policy reload refused; the policy in force stays"), what="refusal")
    assert kept_keys("k3") == {"languageId", "triggerKind"}


def test_an_allowlist_named_before_it_exists_is_picked_up_when_it_appears(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    """A reload refused because a newly named allowlist is missing is tried again when it appears."""
    sidecar, policy, _allow = _watching(tmp_path, upstream, started)
    policy.write_text(POLICY.replace("allowlists: [builtin:sourcegraph]", "allowlists: [allow.yaml, more.yaml]"))
    refused = wait_for(lambda: sidecar.logs(message="policy reload refused; the policy in force stays"), what="refusal")
    assert any("more.yaml" in problem and "not found" in problem for problem in refused[0]["problems"])
    assert not sidecar.logs(message="policy reloaded")
    (tmp_path / "more.yaml").write_text(ALLOWLIST.replace("cody.completion", "cody.chat"))  # nothing else changes
    reloaded = wait_for(lambda: sidecar.logs(message="policy reloaded", trigger="file"), what="the reload")
    assert str(tmp_path / "more.yaml") in reloaded[0]["files"]
    assert len(sidecar.logs(message="policy reload refused; the policy in force stays")) == 1


# -- graceful shutdown ----------------------------------------------------------------------------


def test_sigterm_mid_stream_lets_the_stream_finish_and_loses_no_acknowledged_event(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    sidecar = _start(started, tmp_path, "--upstream", upstream.target, "--grace", "5")
    stream = Lockstep(sidecar.stub())
    stream.send(metadata("licensed_instance"))
    acked: set[str] = set()
    for i in range(10):
        if i == 4:
            sidecar.signal(signal.SIGTERM)
            wait_for(lambda: sidecar.logs(message="shutting down"), what="shutdown to begin")
            # No new call is accepted once shutdown began.
            late = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("late"))])
            assert late.code == grpc.StatusCode.UNAVAILABLE
        stream.send(payload(event(f"t{i}")))
        acked.update(stream.next_response().succeeded_events)
    stream.close()
    end = stream.rest()
    assert end.code == grpc.StatusCode.OK, end.details
    assert sidecar.wait() == 0
    assert acked == {f"t{i}" for i in range(10)}
    assert acked <= {e.id for e in upstream.servicer.events()}


def test_a_stream_longer_than_the_grace_is_cancelled_and_no_acknowledged_event_is_lost(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    sidecar = _start(started, tmp_path, "--upstream", upstream.target, "--grace", "0.5")
    stream = Lockstep(sidecar.stub())
    stream.send(metadata("licensed_instance"))
    acked: set[str] = set()
    sent = 0
    ended = None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if sent == 3:
            sidecar.signal(signal.SIGTERM)
        stream.send(payload(event(f"g{sent}")))
        sent += 1
        try:
            acked.update(stream.next_response().succeeded_events)
        except grpc.RpcError as exc:
            ended = exc.code()
            break
        time.sleep(0.1)
    stream.close()
    assert ended in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), ended
    assert sidecar.wait() == 0
    assert acked and acked <= {e.id for e in upstream.servicer.events()}


# -- unreachable upstream, token introspection -------------------------------------------------------


class _Introspection(BaseHTTPRequestHandler):
    """RFC 7662 endpoint: tok-good is active with the scope, tok-noscope lacks it, tok-bad is inactive."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()
        token = urllib.parse.parse_qs(body).get("token", [""])[0]
        if token == "tok-down":
            self.send_response(500)
            self.end_headers()
            return
        answer: dict[str, object] = {"active": token in ("tok-good", "tok-noscope")}
        if token == "tok-good":
            answer["scope"] = "telemetry_gateway::events::write"
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def introspection() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/introspect"
    server.shutdown()
    server.server_close()


def test_unreachable_upstream_is_unavailable_and_rejected_tokens_are_refused(
    tmp_path: Path, started: list[Sidecar], introspection: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    dead = f"127.0.0.1:{free_port()}"
    sidecar = _start(
        started, tmp_path, "--upstream", dead, "--policy", str(policy), "--introspection-url", introspection
    )
    stub = sidecar.stub()
    out = record_events(stub, [metadata("licensed_instance"), payload(event("u1"))])
    assert out.code == grpc.StatusCode.UNAVAILABLE and not out.acked
    assert unary(stub.RecordEvent, record_event_request("managed_service", event("u2")), BEARER).code == (
        grpc.StatusCode.UNAVAILABLE
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.PublishInstanceUserMetadata(iter([publish_metadata("licensed_instance"), users()]), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    def with_token(token: str) -> tuple[grpc.StatusCode, str]:
        md = (("authorization", f"Bearer {token}"),)
        result = record_events(stub, [metadata("managed_service"), payload(event("t"))], metadata=md)
        return result.code, result.details

    # The gateway's answers: opaque to the caller, the reason in the audit log.
    assert with_token("tok-bad") == (grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    assert with_token("tok-noscope") == (grpc.StatusCode.PERMISSION_DENIED, "permission denied")
    assert with_token("tok-down") == (grpc.StatusCode.INTERNAL, "unable to validate token")
    reasons = [r["refused"]["reason"] for r in sidecar.logs() if "reason" in r.get("refused", {})]
    assert any("not active" in r for r in reasons) and any("credentials.scope" in r for r in reasons)
    assert any("token introspection" in r for r in reasons)
    code, _ = with_token("tok-good")
    assert code == grpc.StatusCode.UNAVAILABLE  # admitted; then the upstream is down
    assert "tok-bad" not in sidecar.log_text() and "tok-good" not in sidecar.log_text()


# -- workers, TLS ------------------------------------------------------------------------------------


def test_workers_share_the_port_and_the_supervisor_serves_their_metrics(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    metrics_port = free_port()
    sidecar = _start(
        started, tmp_path, "--upstream", upstream.target, "--workers", "2",
        "--metrics-listen", f"127.0.0.1:{metrics_port}", "--reload-interval", "0", workers=2,
    )  # fmt: skip
    serving = {record["pid"] for record in sidecar.logs(message="serving")}
    assert len(serving) == 2 and sidecar.process.pid not in serving
    calls = 24
    for i in range(calls):  # one connection per call: the kernel spreads connections, not streams
        stub = sidecar.stub()
        out = record_events(stub, [metadata("licensed_instance"), payload(event(f"w{i}"))])
        assert out.code == grpc.StatusCode.OK, out.details
    decided = {r["pid"] for r in sidecar.logs(audit="decision") if r.get("events_in")}
    assert decided == serving, "both workers served"
    metrics = wait_for(
        lambda: (
            (m := _metrics(metrics_port)).get(
                'telemetry_guard_events_received_total{kind="licensed_instance",rpc="RecordEvents"}'
            )
            == calls
            and m
        ),
        what="the summed metrics",
    )
    assert any(k.startswith("telemetry_guard_policy_info{") and v == 1 for k, v in metrics.items())
    assert metrics[f'telemetry_guard_build_info{{version="{version("telemetry-guard")}"}}'] == 1
    sidecar.signal(signal.SIGTERM)
    assert sidecar.wait() == 0
    assert len(sidecar.logs(message="stopped")) == 3  # two workers and the supervisor


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_on_both_sides(tmp_path: Path, started: list[Sidecar]) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pair = [(key.read_bytes(), cert.read_bytes())]
    upstream = serve_upstream(grpc.ssl_server_credentials(pair))
    try:
        upstream.servicer.reset(tag="tls")
        sidecar = _start(
            started, tmp_path, "--upstream", upstream.target, "--upstream-ca", str(cert),
            "--tls-cert", str(cert), "--tls-key", str(key),
        )  # fmt: skip
        assert sidecar.logs(message="serving")[0]["tls"] is True
        secure = sidecar.channel(grpc.ssl_channel_credentials(cert.read_bytes()))
        from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

        out = record_events(
            pb_grpc.TelemeteryGatewayServiceStub(secure), [metadata("licensed_instance"), payload(event("s1"))]
        )
        assert out.code == grpc.StatusCode.OK, out.details
        assert [e.id for e in upstream.servicer.events()] == ["s1"]
        plain = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("s2"))], timeout=3)
        assert plain.code == grpc.StatusCode.UNAVAILABLE
    finally:
        upstream.stop()


# -- usage errors ---------------------------------------------------------------------------------------


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "telemetry_guard", "serve", "--listen", "127.0.0.1:0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_usage_errors_exit_2_before_serving(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\naccess: {RecordEvents: [no_such_kind]}\n")
    done = _serve("--policy", str(broken))
    assert done.returncode == 2 and "no_such_kind" in done.stderr and "serving" not in done.stderr
    done = _serve("--tls-cert", str(broken))
    assert done.returncode == 2 and "--tls-key" in done.stderr
    done = _serve("--upstream", "no-port-here")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    done = _serve("--policy", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2 and f"--policy {tmp_path / 'missing.yaml'}: cannot read" in done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr


def test_sighup_while_workers_start_does_not_kill_them(tmp_path: Path) -> None:
    """Operators reload with SIGHUP at any time, also while the workers are still loading the policy."""
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "telemetry_guard", "serve", "--listen", "127.0.0.1:0"]
    command += ["--workers", "2", "--reload-interval", "0"]
    with open(log, "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while b'"workers started"' not in log.read_bytes():  # forked; their servers not up yet
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.005)
        while log.read_bytes().count(b'"serving"') < 2:
            assert process.poll() is None, f"sidecar died (exit {process.returncode}):\n{log.read_text()}"
            assert b'"worker died' not in log.read_bytes(), log.read_text()
            assert time.monotonic() < deadline, "workers did not start"
            process.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        time.sleep(0.5)
        assert process.poll() is None and b'"worker died' not in log.read_bytes(), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
