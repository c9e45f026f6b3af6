"""deploy/: what can be checked without Docker or a cluster.

The manifests parse; the sidecar container's arguments and the Dockerfile's CMD are accepted by
`telemetry-guard serve`; probes, Service and Prometheus annotations point at the ports those
arguments open; the policy of the ConfigMap loads; the Dockerfile copies every package root.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from test_sidecar_support import ROOT

from policy import default_policy, load_policy
from telemetry_guard.cli import build_parser

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
