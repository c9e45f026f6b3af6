"""docs/interceptors.md and the README: their two examples (a guarded server, a wrapped exporter channel) run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "interceptors.md"
BLOCKS = re.findall(r"```python\n(.*?)\n```", DOC.read_text(), flags=re.S)
README = (ROOT / "README.md").read_text()

EXPECTED = {
    "server": [
        "servicer got e1 -",  # the marketing tracking was removed before the servicer
        "acknowledged ['e1']",
        "INVALID_ARGUMENT RecordEvents: got events when metadata not yet received",
    ],
    "exporter": [
        "gateway got e2",
        "sent e2",
        "UNIMPLEMENTED unsupported identifier type",
    ],
}


def test_the_doc_has_exactly_the_two_examples() -> None:
    assert len(BLOCKS) == len(EXPECTED)


def test_the_readme_shows_the_same_two_examples() -> None:
    section = README.split("## On live gRPC traffic: interceptors", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```python\n(.*?)\n```", section, flags=re.S) == BLOCKS


@pytest.mark.parametrize(("name", "block"), list(zip(EXPECTED, BLOCKS, strict=True)), ids=list(EXPECTED))
def test_example_runs(name: str, block: str, tmp_path: Path) -> None:
    script = tmp_path / f"{name}.py"
    script.write_text(block)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for line in EXPECTED[name]:
        assert line in done.stdout, (line, done.stdout)
    assert "private-page" not in done.stdout + done.stderr
    if name == "exporter":
        assert done.stdout.count("gateway got") == 1  # the refused call never reached the gateway
