"""deploy/: what can be checked without Docker or a cluster.

The manifests parse; the sidecar container's arguments and the Dockerfile's CMD are accepted by
`telemetry-guard serve`; probes, Service and Prometheus annotations point at the ports those
arguments open; the policy of the ConfigMap loads; the Dockerfile copies every package root; and
the Dockerfile's steps, replayed outside Docker (its COPY lines, its wheel build, the install of
that wheel alone, its checks, its CMD and its HEALTHCHECK), give a sidecar that serves.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml
from test_sidecar_support import HOST, ROOT, free_port, serve_upstream

from telemetry_guard.cli import build_parser
from telemetry_guard.policy import default_policy, load_policy

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


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
    assert template["spec"]["terminationGracePeriodSeconds"] > args.grace
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
    argv = [local.get(previous, value) for previous, value in zip(["", *args[:-1]], args, strict=True)]
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
