"""python -m bench.fuzz --seconds N: the differential fuzz target for N seconds, then a table.

With atheris (`pip install -e '.[fuzz]'`) the inputs are coverage-guided (Python coverage: the C
extension is built by gcc, without libFuzzer's instrumentation); --random or without atheris they
come from a seeded RNG, which is what the sanitizer run of the test suite uses. A finding prints
the case (its bytes in hex) and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import sys
import time
from types import ModuleType
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default: 60)")
    parser.add_argument("--random", action="store_true", help="a seeded RNG rather than atheris")
    parser.add_argument("--seed", type=int, default=None, help="the RNG's seed (default: from the clock)")
    args = parser.parse_args(argv)
    tally: collections.Counter[tuple[str, str]] = collections.Counter()
    atheris: ModuleType | None = None
    if not args.random:
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            print("# atheris is not installed (pip install -e '.[fuzz]'): a seeded RNG instead")
    if atheris is not None:
        with atheris.instrument_imports(include=["telemetry_guard", "bench.fuzz"]):  # coverage of our code only
            from bench.fuzz import checks, inputs
    else:
        from bench.fuzz import checks, inputs
    from telemetry_guard.policy import fastpath

    extension = getattr(getattr(fastpath, "_wirefilter", None), "__file__", None)
    print(f"# fuzz: C fast path {extension or 'missing (Python path only)'}")
    names = list(checks.policies())
    if atheris is not None:
        return _atheris(atheris, args.seconds, names, tally)
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    print(f"# seeded RNG, seed {seed}")
    source = inputs.RandomSource(seed)
    start = time.monotonic()
    while time.monotonic() - start < args.seconds:
        case = inputs.case(source, names)
        try:
            tally[(case.rpc, checks.check(case))] += 1
        except Exception:
            print(f"# finding with seed {seed} after {sum(tally.values())} cases:\n{case}", file=sys.stderr)
            raise
    _table(tally, time.monotonic() - start)
    return 0


def _atheris(atheris: Any, seconds: float, names: list[str], tally: collections.Counter[tuple[str, str]]) -> int:
    from bench.fuzz import checks, inputs

    start = time.monotonic()

    def one_input(data: bytes) -> None:
        if time.monotonic() - start >= seconds:  # libFuzzer ends the process without running atexit handlers
            _table(tally, time.monotonic() - start)
            sys.stdout.flush()
            os._exit(0)
        case = inputs.case(_Provided(atheris.FuzzedDataProvider(data)), names)
        tally[(case.rpc, checks.check(case))] += 1

    atheris.Setup([sys.argv[0], "-max_len=4096"], one_input)
    atheris.Fuzz()
    return 0


class _Provided:
    """inputs.Source over atheris' FuzzedDataProvider."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider

    def integer(self, low: int, high: int) -> int:
        return int(self._provider.ConsumeIntInRange(low, high))

    def raw(self, max_size: int) -> bytes:
        return bytes(self._provider.ConsumeBytes(self._provider.ConsumeIntInRange(0, max_size)))


def _table(tally: collections.Counter[tuple[str, str]], seconds: float) -> None:
    total = sum(tally.values())
    print(f"\n{total:,} cases in {seconds:.1f} s, no finding\n")
    print("| rpc | outcome | cases |")
    print("|---|---|---:|")
    for (rpc, outcome), count in sorted(tally.items()):
        print(f"| {rpc} | {outcome} | {count:,} |")


if __name__ == "__main__":
    sys.exit(main())
