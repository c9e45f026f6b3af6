"""The C fast path built with AddressSanitizer and UndefinedBehaviorSanitizer, under its own tests and a fuzz run.

The extension is compiled with gcc -fsanitize=address,undefined into a temporary folder and loaded in
place of the installed build (a sitecustomize on PYTHONPATH points the import of
telemetry_guard.policy._wirefilter at it) by a Python process that preloads libasan. PYTHONMALLOC=malloc
gives every Python object its own allocation, so that a read or write past a payload's bytes lands in
ASan's red zone; any error report ends the process with a non-zero status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SOURCE = ROOT / "policy" / "_wirefilter.c"
FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
LOADER = """\
import importlib.abc, importlib.util, sys

class _Sanitized(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "telemetry_guard.policy._wirefilter":
            return importlib.util.spec_from_file_location(name, {path!r})
        return None

sys.meta_path.insert(0, _Sanitized())
"""


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the sanitized build, the environment of a process that loads it)."""
    folder = tmp_path_factory.mktemp("asan")
    built = folder / f"_wirefilter{sysconfig.get_config_var('EXT_SUFFIX')}"
    include = sysconfig.get_paths()["include"]
    compile_ = ["gcc", "-shared", "-fPIC", "-std=c11", *FLAGS, f"-I{include}", str(SOURCE), "-o", str(built)]
    subprocess.run(compile_, check=True, capture_output=True, timeout=120)
    (folder / "sitecustomize.py").write_text(LOADER.format(path=str(built)))
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    env = {
        **os.environ,
        "LD_PRELOAD": libasan.stdout.strip(),
        "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]),
        "PYTHONMALLOC": "malloc",
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=86",  # CPython keeps objects until exit
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=87",
    }
    return built, env


def run(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean(done: subprocess.CompletedProcess[str]) -> None:
    """Exit status 0; else what went wrong is printed (pytest shows it in full): a sanitizer's report
    from its first line, or the ends of the output."""
    if done.returncode == 0:
        return
    shown = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for marker in ("ERROR: AddressSanitizer", "runtime error:"):
        if marker in done.stderr:
            shown = done.stderr[max(0, done.stderr.index(marker) - 300) :][:6000]
    print(shown)
    raise AssertionError(f"exit status {done.returncode} (86: AddressSanitizer, 87: UndefinedBehaviorSanitizer)")


def test_the_sanitized_build_is_the_one_loaded(sanitized: tuple[Path, dict[str, str]]) -> None:
    built, env = sanitized
    probe = run(env, "-c", "from telemetry_guard.policy import fastpath; print(fastpath._wirefilter.__file__)")
    assert_clean(probe)
    assert probe.stdout.strip() == str(built)
    assert b"__asan_" in built.read_bytes() and b"__ubsan_" in built.read_bytes()


def test_the_fast_path_tests_pass_under_asan_and_ubsan(sanitized: tuple[Path, dict[str, str]]) -> None:
    _built, env = sanitized
    # --capture=sys: a sanitizer report, written to file descriptor 2, reaches this test
    files = ("tests/test_fastpath.py", "tests/test_fastpath_unary.py")  # RecordEvents, RecordEvent, user metadata
    tests = run(env, "-m", "pytest", "-q", "-x", "--capture=sys", "-p", "no:cacheprovider", *files)
    assert_clean(tests)
    assert " passed" in tests.stdout


def test_a_fuzz_run_passes_under_asan_and_ubsan(sanitized: tuple[Path, dict[str, str]]) -> None:
    built, env = sanitized
    seed = ["--seed", "20261201"] if os.environ.get("CI") == "true" else []  # CI replays (README)
    fuzz = run(env, "-m", "bench.fuzz", "--random", *seed, "--seconds", "10")
    assert_clean(fuzz)
    assert f"C fast path {built}" in fuzz.stdout
    assert "no finding" in fuzz.stdout and "| RecordEvents | passed: fast path |" in fuzz.stdout
    assert "| PublishInstanceUserMetadata | passed: both paths |" in fuzz.stdout  # user metadata on the walk
