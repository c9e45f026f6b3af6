"""Shadow policy on live traffic, end to end: the real `telemetry-guard serve --shadow-policy` in
front of a recording upstream on loopback, a candidate that narrows and one that widens.

Every count is derived from what the test sends; the upstream must receive exactly what the policy
in force lets out (computed by the engine from the same bytes); no removed value may appear in a
log line or a metric. The shadow-report command reads the sidecar's own log.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
from test_sidecar_support import (
    BEARER,
    FORWARD_TAG,
    POLICY,
    ROOT,
    SECRETS,
    TIMEOUT,
    ServedUpstream,
    Sidecar,
    dropped,
    event,
    free_port,
    identifier,
    metadata,
    payload,
    publish_metadata,
    record_event_request,
    record_events,
    unary,
    users,
    wait_for,
)

from telemetry_guard.policy import Engine, load_policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

PAYLOADS = 3  # events payloads per stream
PRIVATE = "parameters.private_metadata"
REMOVES, KEEPS = "candidate_removes", "candidate_keeps"
PRIVATE_RULE, EVENTS_RULE, FIELDS_RULE = "defaults.private_metadata", "defaults.events.exclude", "defaults.drop_fields"

# Narrows: private_metadata dropped whole, search.* events removed, user metadata only from licensed instances
# and without usernames.
NARROW = (
    POLICY.replace("private_metadata: {mode: allowlist, non_string: drop}", "private_metadata: {mode: drop}")
    .replace('exclude: ["internal.*"]', 'exclude: ["internal.*", "search.*"]')
    .replace("Metadata: [licensed_instance, unlicensed_instance]", "Metadata: [licensed_instance]")
    .replace("user_fields: [id, username]", "user_fields: [id]")
)

# Widens: its own allowlist lets `prompt` out, internal.* events pass, user.anonymous_user_id is kept, and
# user metadata is accepted from unlicensed instances too (which LICENSED_PUBLISH_ONLY refuses).
WIDE = (
    POLICY.replace("allowlists: [builtin:sourcegraph]", "allowlists: [wide.yaml]")
    .replace('exclude: ["internal.*"]', "exclude: []")
    .replace("drop_fields: [user.anonymous_user_id]", "drop_fields: []")
)
LICENSED_PUBLISH_ONLY = POLICY.replace(
    "Metadata: [licensed_instance, unlicensed_instance]", "Metadata: [licensed_instance]"
)
WIDE_ALLOWLIST = """\
version: 1
entries:
  - feature: cody.completion
    action: "*"
    keys: [languageId, prompt]
    reason: test of a widening candidate
"""


def completion(event_id: str) -> pb.Event:
    """Allowlisted type: languageId leaves under the policy in force, prompt does not; an anonymous id is dropped."""
    ev = event(event_id, private={"languageId": "go", "prompt": "SECRET-PRIVATE-VALUE"}, marketing=True)
    ev.user.anonymous_user_id = "SECRET-ANONYMOUS-ID"
    return ev


def search(event_id: str) -> pb.Event:
    """Not allowlisted: its private_metadata is removed whole under both policies."""
    return event(event_id, feature="search.results", action="viewed", private={"query": "SECRET-PRIVATE-VALUE"})


def payloads(stream: str) -> list[pb.RecordEventsRequest]:
    """PAYLOADS payloads of three events each: a completion, a search, one the policy in force drops whole."""
    return [
        payload(completion(f"{stream}c{i}"), search(f"{stream}s{i}"), dropped(f"{stream}d{i}")) for i in range(PAYLOADS)
    ]


def _start(
    started: list[Sidecar], tmp: Path, upstream: ServedUpstream, candidate: Path, *args: str, in_force: str = POLICY
) -> Sidecar:
    policy = tmp / "policy.yaml"
    policy.write_text(in_force)
    shadow = ["--shadow-policy", str(candidate)]
    process = Sidecar(["--upstream", upstream.target, "--policy", str(policy), *shadow, *args, *FORWARD_TAG], tmp)
    started.append(process)
    return process


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        text: str = response.read().decode()
    return text


def _samples(text: str, name: str) -> dict[str, float]:
    """name{labels} -> value for one metric family (the labels as exposed)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels[len(name) :]] = float(value)
    return out


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _in_force_output(path: Path, requests: list[pb.RecordEventsRequest]) -> list[pb.RecordEventsRequest]:
    """What the policy in force (at path) lets out of these payloads (licensed_instance), by the engine itself."""
    engine = Engine(load_policy(path))
    out = []
    for request in requests:
        outcome = engine.record_events_bytes(request.SerializeToString(), identifier("licensed_instance"))
        assert outcome.denial is None and outcome.request is not None
        out.append(pb.RecordEventsRequest.FromString(outcome.request))
    return out


def _forwarded(upstream: ServedUpstream) -> list[pb.RecordEventsRequest]:
    (call,) = upstream.servicer.received("RecordEvents")
    return [m for m in call.messages if m.WhichOneof("payload") == "events"]


def _no_value_in(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def _report(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "telemetry_guard", "shadow-report", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT, input=stdin)


def test_a_narrowing_candidate_is_counted_exactly_and_decides_nothing(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(NARROW)
    metrics_port = free_port()
    sidecar = _start(started, tmp_path, upstream, candidate, "--metrics-listen", f"127.0.0.1:{metrics_port}")
    sent = payloads("n")
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), *sent])
    assert out.code == grpc.StatusCode.OK, out.details
    in_force = _in_force_output(tmp_path / "policy.yaml", sent)
    assert _forwarded(upstream) == in_force, "the upstream gets what the policy in force lets out"
    published = sidecar.stub().PublishInstanceUserMetadata
    done = unary(lambda r, **kw: published(iter(r), **kw), [publish_metadata("unlicensed_instance"), users()])
    assert done.code == grpc.StatusCode.OK, "the candidate's refusal decides nothing"
    done = unary(lambda r, **kw: published(iter(r), **kw), [publish_metadata("licensed_instance"), users(), users()])
    assert done.code == grpc.StatusCode.OK
    publishes = upstream.servicer.received("PublishInstanceUserMetadata")
    assert [[u.username for m in c.messages[1:] for u in m.user_metadata.users] for c in publishes] == [
        ["alice"],
        ["alice", "alice"],
    ]
    wait_for(lambda: sidecar.logs(audit="shadow_summary", rpc="RecordEvents"), what="the stream's summary")

    text = _metrics(metrics_port)
    differences = _samples(text, "telemetry_guard_shadow_differences_total")
    rpc, kind = "RecordEvents", "licensed_instance"
    publish = "PublishInstanceUserMetadata"
    assert differences == {
        # the username of each of the two users published by the licensed instance
        _labels(area="users.username", direction=REMOVES, kind=kind, rpc=publish, rule="user_metadata.user_fields"): 2,
        # languageId of each completion event: left under the policy in force, removed with all private_metadata
        _labels(area=PRIVATE, direction=REMOVES, kind=kind, rpc=rpc, rule=PRIVATE_RULE): PAYLOADS,
        # each search.results event: left (without its private_metadata), removed whole by the candidate
        _labels(area="event", direction=REMOVES, kind=kind, rpc=rpc, rule=EVENTS_RULE): PAYLOADS,
    }
    assert _samples(text, "telemetry_guard_shadow_compared_total") == {
        _labels(kind=kind, rpc=rpc): PAYLOADS,
        _labels(kind=kind, rpc=publish): 2,
    }
    assert _samples(text, "telemetry_guard_shadow_events_compared_total") == {_labels(kind=kind, rpc=rpc): 3 * PAYLOADS}
    assert _samples(text, "telemetry_guard_shadow_differing_total") == {
        _labels(kind=kind, rpc=rpc): PAYLOADS,
        _labels(kind=kind, rpc=publish): 2,
    }
    refusals = _samples(text, "telemetry_guard_shadow_refusals_total")
    assert refusals == {
        _labels(
            candidate="PERMISSION_DENIED",
            in_force="OK",
            kind="unlicensed_instance",
            rpc=publish,
            rule=f"access.{publish}",
        ): 1,
    }
    lines = sidecar.logs(audit="shadow_difference", rpc=rpc)
    assert [line["message"] for line in lines] == [1, 2, 3]  # the payloads' positions in the stream
    assert all(line["policy_sha256"] != line["candidate_sha256"] for line in lines)
    assert not sidecar.logs(audit="shadow_keys"), "key names only at --log-level debug"
    assert "languageId" not in "\n".join(json.dumps(line) for line in lines)
    _no_value_in(sidecar.log_text(), text)

    report = _report(str(sidecar.log_path), "--format", "json")
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)
    assert summary["summary"] == {
        "calls": 2, "compared_messages": PAYLOADS + 2, "compared_events": 3 * PAYLOADS,
        "differing_messages": PAYLOADS + 2, "widening": False,
    }  # fmt: skip
    assert {(d["area"], d["rule"], d["count"]) for d in summary["candidate_removes"]} == {
        (PRIVATE, PRIVATE_RULE, PAYLOADS),
        ("event", EVENTS_RULE, PAYLOADS),
        ("users.username", "user_metadata.user_fields", 2),
    }
    assert summary["candidate_keeps"] == []
    refused = [(r["in_force"], r["candidate"], r["times"]) for r in summary["refusals"]]
    assert refused == [("OK", "PERMISSION_DENIED", 1)]
    markdown = _report("-", stdin=sidecar.log_text())
    assert markdown.returncode == 0, markdown.stderr
    assert "| RecordEvents | `licensed_instance` | `event` | `defaults.events.exclude` | **3** | 3 |" in markdown.stdout
    html = _report(str(sidecar.log_path), "--format", "html", "--fail-on-widening")
    assert html.returncode == 0 and html.stdout.startswith("<!DOCTYPE html>")


def test_a_widening_candidate_is_counted_exactly_names_keys_only_at_debug_and_fails_the_gate(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    (tmp_path / "wide.yaml").write_text(WIDE_ALLOWLIST)
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(WIDE)
    metrics_port = free_port()
    sidecar = _start(
        started,
        tmp_path,
        upstream,
        candidate,
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--log-level",
        "debug",
        in_force=LICENSED_PUBLISH_ONLY,
    )
    sent = payloads("w")
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), *sent])
    assert out.code == grpc.StatusCode.OK, out.details
    in_force = _in_force_output(tmp_path / "policy.yaml", sent)
    assert _forwarded(upstream) == in_force, "nothing the candidate would let out is forwarded"
    single = unary(sidecar.stub().RecordEvent, record_event_request("managed_service", completion("u1")), BEARER)
    assert single.code == grpc.StatusCode.OK
    published = sidecar.stub().PublishInstanceUserMetadata
    refused = unary(lambda r, **kw: published(iter(r), **kw), [publish_metadata("unlicensed_instance"), users()])
    assert refused.code == grpc.StatusCode.PERMISSION_DENIED, "the policy in force decides"
    assert not upstream.servicer.received("PublishInstanceUserMetadata")
    (forwarded_single,) = upstream.servicer.received("RecordEvent")
    assert set(forwarded_single.messages[0].event.parameters.private_metadata) == {"languageId"}
    wait_for(lambda: sidecar.logs(audit="shadow_summary", rpc="RecordEvents"), what="the stream's summary")
    # grpc.aio sends a refusal's status before the handler ends, and the shadow judges the call after: wait for it
    wait_for(
        lambda: sidecar.logs(audit="shadow_refusal", rpc="PublishInstanceUserMetadata"),
        what="the refused call's shadow",
    )

    text = _metrics(metrics_port)
    kind = "licensed_instance"
    stream, single_call, service = "RecordEvents", "RecordEvent", "managed_service"
    assert _samples(text, "telemetry_guard_shadow_differences_total") == {
        # prompt of each completion event, its anonymous user id, and each internal.* event
        _labels(area=PRIVATE, direction=KEEPS, kind=kind, rpc=stream, rule=PRIVATE_RULE): PAYLOADS,
        _labels(area="user.anonymous_user_id", direction=KEEPS, kind=kind, rpc=stream, rule=FIELDS_RULE): PAYLOADS,
        _labels(area="event", direction=KEEPS, kind=kind, rpc=stream, rule=EVENTS_RULE): PAYLOADS,
        # the same completion event once through RecordEvent
        _labels(area=PRIVATE, direction=KEEPS, kind=service, rpc=single_call, rule=PRIVATE_RULE): 1,
        _labels(area="user.anonymous_user_id", direction=KEEPS, kind=service, rpc=single_call, rule=FIELDS_RULE): 1,
    }
    assert _samples(text, "telemetry_guard_shadow_refusals_total") == {
        _labels(
            candidate="OK",
            in_force="PERMISSION_DENIED",
            kind="unlicensed_instance",
            rpc="PublishInstanceUserMetadata",
            rule="access.PublishInstanceUserMetadata",
        ): 1,
    }
    keys = sidecar.logs(audit="shadow_keys", rpc="RecordEvents")
    assert len(keys) == PAYLOADS
    assert {"direction": KEEPS, "area": PRIVATE, "rule": PRIVATE_RULE, "keys": ["prompt"]} in keys[0]["differences"]
    assert all(line["level"] == "debug" for line in keys)
    assert all("keys" not in d for line in sidecar.logs(audit="shadow_difference") for d in line["differences"])
    _no_value_in(sidecar.log_text(), text)

    gate = _report(str(sidecar.log_path), "--fail-on-widening", "--with-keys", "--format", "json")
    assert gate.returncode == 1, gate.stderr
    report = json.loads(gate.stdout)
    assert report["summary"]["widening"] is True
    assert report["summary"]["compared_messages"] == PAYLOADS + 1
    private = [d for d in report["candidate_keeps"] if d["area"] == PRIVATE and d["rpc"] == stream]
    assert private == [
        {"direction": KEEPS, "rpc": stream, "kind": kind, "area": PRIVATE, "rule": PRIVATE_RULE,
         "count": PAYLOADS, "messages": PAYLOADS, "keys": ["prompt"]},
    ]  # fmt: skip


def test_a_refused_candidate_is_ignored_until_a_valid_one_is_reloaded_and_sampling_is_exact(
    tmp_path: Path, upstream: ServedUpstream, started: list[Sidecar]
) -> None:
    candidate = tmp_path / "candidate.yaml"
    # lint refuses this with an error that cannot be acknowledged (marketing tracking kept for instances)
    candidate.write_text(NARROW.replace("marketing_tracking: drop", "marketing_tracking: keep"))
    metrics_port = free_port()
    sidecar = _start(
        started, tmp_path, upstream, candidate, "--metrics-listen", f"127.0.0.1:{metrics_port}",
        "--shadow-sample", "0.5", "--reload-interval", "0",
    )  # fmt: skip
    (refused,) = sidecar.logs(message="shadow candidate refused and ignored; the policy in force is untouched")
    assert refused["level"] == "error" and refused["trigger"] == "start"
    assert any("marketing-tracking-single-tenant" in p for p in refused["problems"])
    assert sidecar.logs(message="serving")[0]["shadow_sha256"] is None
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), *payloads("a")])
    assert out.code == grpc.StatusCode.OK, out.details
    assert not sidecar.logs(audit="shadow_summary") and not sidecar.logs(audit="shadow_difference")

    candidate.write_text("version: 1\nnot_a_key: true\n")  # does not load
    sidecar.signal(signal.SIGHUP)
    wait_for(lambda: sidecar.logs(trigger="signal", candidate=str(candidate)), what="the refusal of the change")
    candidate.write_text(NARROW)
    sidecar.signal(signal.SIGHUP)
    wait_for(lambda: sidecar.logs(message="shadow candidate loaded", trigger="signal"), what="the candidate")
    text = _metrics(metrics_port)
    failures = _samples(text, "telemetry_guard_shadow_candidate_failures_total")
    assert failures == {'{trigger="start"}': 1, '{trigger="signal"}': 1}
    assert _samples(text, "telemetry_guard_policy_reload_failures_total") == {}, "the policy in force is untouched"
    in_force = sidecar.logs(message="serving")[0]["sha256"]
    assert [k for k, v in _samples(text, "telemetry_guard_policy_info").items() if v == 1] == [
        _labels(name="policy.yaml", sha256=in_force)
    ]

    sent = [payload(completion(f"s{i}")) for i in range(10)]
    out = record_events(sidecar.stub(), [metadata("licensed_instance"), *sent])
    assert out.code == grpc.StatusCode.OK, out.details
    (summary,) = wait_for(lambda: sidecar.logs(audit="shadow_summary"), what="the summary")
    assert summary["compared_messages"] == 5, "rate 0.5: every second payload"
    assert summary["differing_messages"] == 5


# -- the README's roll-out, run as written ------------------------------------------------------------


CURL = "-c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())'"


def _readme_steps() -> list[str]:
    """The commands of the README's shadow roll-out, one per logical line (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n##+ ", readme.split("### A policy change, rolled out in shadow", 1)[1], maxsplit=1)[0]
    (block,) = re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)
    joined = block.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_roll_out_runs_as_written(tmp_path: Path, upstream: ServedUpstream) -> None:
    """Every step of the README, verbatim but for the addresses (loopback, free ports) and the command
    (this interpreter's telemetry_guard); traffic is sent between starting the sidecar and watching it."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "candidate.yaml").write_text(NARROW)
    metrics_port = free_port()
    steps = _readme_steps()
    assert [step.split()[0] for step in steps] == ["telemetry-guard"] * 3 + ["curl"] + ["telemetry-guard"] * 2 + ["cp"]
    here = f"{sys.executable} -m telemetry_guard "

    def run(step: str) -> subprocess.CompletedProcess[str]:
        command = step.replace("telemetry-guard ", here).replace("localhost:9090", f"127.0.0.1:{metrics_port}")
        if shutil.which("curl") is None:  # a machine without curl: the same GET by Python
            command = command.replace("curl -s ", f"{sys.executable} {CURL} ")
        return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    for step in steps[:2]:  # lint and diff
        done = run(step)
        assert done.returncode == 0, (step, done.stdout, done.stderr)
    serve = steps[2]
    assert serve.endswith(" 2>> sidecar.log &")
    serve = (
        serve.removesuffix(" &")
        .replace("telemetry-guard ", "exec " + here)
        .replace("--listen 0.0.0.0:10085", "--listen 127.0.0.1:0")
        .replace("--upstream gateway.internal:10080", f"--upstream {upstream.target}")
        .replace("0.0.0.0:9090", f"127.0.0.1:{metrics_port}")
    )
    process = subprocess.Popen(["bash", "-c", serve], cwd=tmp_path)
    try:
        log = tmp_path / "sidecar.log"
        port = wait_for(
            lambda: log.exists() and [json.loads(x)["port"] for x in log.read_text().splitlines() if '"serving"' in x],
            what="the sidecar to serve",
        )[0]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
        requests = [metadata("licensed_instance"), *payloads("r")]
        responses = list(stub.RecordEvents(iter(requests), timeout=TIMEOUT))
        assert len(responses) == PAYLOADS
        channel.close()
        wait_for(lambda: '"shadow_summary"' in log.read_text(), what="the stream's summary")
        watched = run(steps[3])
        assert watched.returncode == 0, watched.stderr
        compared = _labels(kind="licensed_instance", rpc="RecordEvents")
        assert f"telemetry_guard_shadow_compared_total{compared} {float(PAYLOADS)}" in watched.stdout
        html = run(steps[4])
        assert html.returncode == 0, html.stderr
        assert "<table>" in (tmp_path / "shadow-report.html").read_text()
        gate = run(steps[5])
        assert gate.returncode == 0, "the narrowing candidate lets nothing more out"
        assert "Would be removed: leaves under the policy in force" in gate.stdout
        (tmp_path / "candidate.yaml").write_text(WIDE.replace("allowlists: [wide.yaml]", "allowlists: []"))
        wait_for(lambda: '"shadow candidate reloaded"' in log.read_text(), what="the candidate's change to be seen")
        assert run(steps[6]).returncode == 0
        wait_for(lambda: '"policy reloaded"' in log.read_text(), what="the promoted policy to be reloaded")
        _no_value_in(log.read_text())
    finally:
        process.terminate()
        process.wait(TIMEOUT)


def test_usage_errors_are_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "telemetry_guard", "serve", "--listen", "127.0.0.1:0", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    out_of_range = serve("--shadow-policy", "candidate.yaml", "--shadow-sample", "1.5")
    assert out_of_range.returncode == 2 and "--shadow-sample: must be more than 0 and at most 1" in out_of_range.stderr
    alone = serve("--shadow-sample", "0.5")
    assert alone.returncode == 2 and "--shadow-sample needs --shadow-policy" in alone.stderr
    missing = _report(str(tmp_path / "missing.log"))
    assert missing.returncode == 2 and f"cannot read {tmp_path / 'missing.log'}" in missing.stderr
    unrelated = _report("-", stdin='{"message": "serving"}\nnot json\n')
    assert unrelated.returncode == 2 and "no shadow record in -" in unrelated.stderr
    broken = '{"audit": "shadow_summary", "compared_messages": "3"}\n{"audit": "shadow_difference", "differences": 7}\n'
    mangled = _report("-", stdin=broken)
    assert mangled.returncode == 0, mangled.stderr
    assert "0 messages (0 events) in 1 call" in mangled.stdout, "counts it cannot read are 0"
    for done in (out_of_range, alone, missing, unrelated, mangled):
        assert "Traceback" not in done.stderr
