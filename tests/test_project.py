"""The project's own promises: the README's commands are the ones CI runs, and its example runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [
        line
        for line in (ROOT / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert len(ci_lines) == 1
    assert ci_lines[0] in _sh_blocks(), "the README's test command and .ci/run differ"


def test_readme_main_command_runs_the_demo() -> None:
    assert any(block.endswith("telemetry-guard demo") for block in _sh_blocks())


def test_readme_engine_example_runs(tmp_path: Path) -> None:
    block = re.search(r"## Using the engine\n\n```python\n(.*?)\n```", README, flags=re.S)
    assert block is not None
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "kinds.licensed_instance.marketing_tracking" in done.stdout
    assert "secret" not in done.stdout and "example.com/private" not in done.stdout


def test_generated_stubs_are_fresh() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "proto/generate.py"), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_stubs_import_from_any_directory(tmp_path: Path) -> None:
    code = (
        "from telemetrygateway.v1 import telemetrygateway_pb2, telemetrygateway_pb2_grpc as g;"
        "print(g.TelemeteryGatewayServiceStub.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "TelemeteryGatewayServiceStub"


def test_runtime_lower_bounds_match_the_generated_code() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    pb2 = (ROOT / "proto/telemetrygateway/v1/telemetrygateway_pb2.py").read_text()
    grpc_stub = (ROOT / "proto/telemetrygateway/v1/telemetrygateway_pb2_grpc.py").read_text()
    major, minor, patch = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+)", pb2).groups()  # type: ignore[union-attr]
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub).group(1)  # type: ignore[union-attr]
    assert f'"protobuf>={major}.{minor}.{patch}"' in pyproject
    assert f'"grpcio>={grpc_version}"' in pyproject


def test_policy_reference_page_is_generated_from_the_schemas() -> None:
    from telemetry_guard.policy import reference

    page = (ROOT / "docs/policy-reference.md").read_text()
    assert page == reference.render(), "run: python -m telemetry_guard.policy.reference > docs/policy-reference.md"
    assert "`defaults.private_metadata.mode`" in page and "`entries[].reason`" in page


def test_the_wheel_ships_every_package_and_its_data(tmp_path: Path) -> None:
    """An installed (non-editable) telemetry-guard has its subcommands, schemas, policies and stubs."""
    import shutil
    import zipfile

    # Build from a clean copy: setuptools reuses a build/ folder left in the tree.
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "*.so"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("telemetry_guard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "telemetry_guard/policy/default.yaml",
        "telemetry_guard/policy/schema/policy.schema.json",
        "telemetry_guard/policy/schema/allowlist.schema.json",
        "telemetry_guard/allowlists/sourcegraph.yaml",
        "telemetrygateway/v1/telemetrygateway_pb2.py",
        "telemetrygateway/v1/telemetrygateway_pb2.pyi",
        "telemetrygateway/v1/telemetrygateway_pb2_grpc.pyi",
        "telemetry_guard/commands/serve.py",
        "telemetry_guard/commands/lint.py",
        "telemetry_guard/render/sarif.py",
        "telemetry_guard/sidecar/server.py",
        "telemetry_guard/interceptors/server.py",
        "telemetry_guard/policy/_wirefilter.pyi",
        "telemetry_guard/py.typed",
    ):
        assert required in names, required
    # The C fast path, compiled by the build (a C compiler is on this project's machines).
    assert any(n.startswith("telemetry_guard/policy/_wirefilter.") and n.endswith(".so") for n in names), sorted(names)
    # One namespace: nothing at the top level of site-packages but ours and protobuf's package path.
    top = {name.split("/")[0] for name in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and top - dist_info == {"telemetry_guard", "telemetrygateway"}, sorted(top)
    # Every source package is shipped under telemetry_guard/.
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench", "telemetry_guard"}
    shipped = {name.split("/")[1] for name in names if name.startswith("telemetry_guard/") and name.endswith(".py")}
    assert on_disk <= shipped, on_disk - shipped


def test_no_code_imports_a_package_outside_the_namespace() -> None:
    """`import policy` would load a second copy of the engine from a checkout (and nothing when installed)."""
    bare = re.compile(r"^\s*(?:from|import) (?:policy|interceptors|sidecar|allowlists)\b", flags=re.M)
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "build"} & set(p.relative_to(ROOT).parts)]
    sources += [ROOT / "README.md", ROOT / "deploy/Dockerfile", *ROOT.glob("docs/**/*.md")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if bare.search(p.read_text())]
    assert not offenders


def test_the_namespace_links_point_at_the_top_level_folders() -> None:
    for name in ("policy", "interceptors", "sidecar", "allowlists"):
        link = ROOT / "telemetry_guard" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name
