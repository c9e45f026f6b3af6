"""Regenerate the Python code for telemetrygateway.v1 from its .proto.

    python proto/generate.py           # rewrite the committed stubs
    python proto/generate.py --check   # exit 1 if they differ from a fresh generation

The generator versions are pinned in pyproject.toml's `dev` extra (grpcio-tools,
mypy-protobuf) so that every machine produces the same bytes; the runtime lower
bounds (grpcio, protobuf) are the versions this output checks for at import.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "telemetrygateway/v1/telemetrygateway.proto"
OUTPUTS = (
    "telemetrygateway_pb2.py",
    "telemetrygateway_pb2.pyi",
    "telemetrygateway_pb2_grpc.py",
    "telemetrygateway_pb2_grpc.pyi",
)


def generate(out_dir: Path) -> None:
    """Run protoc (from grpcio-tools) with the Python, gRPC and mypy plugins."""
    from grpc_tools import protoc  # dev dependency: imported only when generating

    include = Path(protoc.__file__).resolve().parent / "_proto"
    plugins = [f"--plugin=protoc-gen-{name}={_script(f'protoc-gen-{name}')}" for name in ("mypy", "mypy_grpc")]
    args = [
        "grpc_tools.protoc",
        *plugins,
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        str(PROTO_ROOT / PROTO_FILE),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_FILE}")


def _script(name: str) -> str:
    """A console script of this interpreter's environment (mypy-protobuf's plugins), found without PATH."""
    found = Path(sysconfig.get_path("scripts")) / name
    if found.exists():
        return str(found)
    on_path = shutil.which(name)
    if on_path is None:
        raise SystemExit(f"{name} not found: pip install -e '.[dev]' installs mypy-protobuf")
    return on_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    package = PROTO_ROOT / "telemetrygateway" / "v1"
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "telemetrygateway" / "v1"
        if args.check:
            stale = [
                name
                for name in OUTPUTS
                if not (package / name).exists() or not filecmp.cmp(fresh / name, package / name, shallow=False)
            ]
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run python proto/generate.py", file=sys.stderr)
                return 1
            print("generated code is up to date")
            return 0
        for name in OUTPUTS:
            shutil.copyfile(fresh / name, package / name)
            print(f"wrote {package / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
