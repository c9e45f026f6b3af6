"""The differential fuzz target of bench/fuzz, run for a bounded number of cases under hypothesis.

Each case is one request of one RPC (generated, re-encoded with tags, lengths and varints of 1 to
10 bytes, mutated byte by byte) for one of the fuzz policies (default, replacement, drop_fields,
events filter, invalid_events drop, legacy merge) and kinds; bench/fuzz/checks.py says what must
hold: both engine paths agree, every output keeps the privacy invariants, refusals are clean.
`python -m bench.fuzz --seconds N` runs the same target for longer (atheris, or a seeded RNG).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import checks, inputs

ROOT = Path(__file__).parent.parent
POLICIES = list(checks.policies())


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))


class Drawn:
    """inputs.Source over hypothesis draws (so that a finding shrinks)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self._draw = draw

    def integer(self, low: int, high: int) -> int:
        return self._draw(st.integers(low, high))

    def raw(self, max_size: int) -> bytes:
        return self._draw(st.binary(max_size=max_size))


@st.composite
def cases(draw: st.DrawFn, rpc: str) -> inputs.Case:
    return inputs.case(Drawn(draw), POLICIES, rpc)


@fuzz(5000)
@given(cases(inputs.RECORD_EVENTS))
def test_record_events_fast_path_and_reference_agree_and_keep_the_invariants(case: inputs.Case) -> None:
    checks.check(case)


@fuzz(1000)
@given(cases(inputs.RECORD_EVENT))
def test_record_event_answers_as_a_one_event_batch_and_keeps_the_invariants(case: inputs.Case) -> None:
    checks.check(case)


@fuzz(1000)
@given(cases(inputs.PUBLISH))
def test_publish_instance_user_metadata_keeps_the_invariants(case: inputs.Case) -> None:
    checks.check(case)


def test_every_policy_family_is_fuzzed_on_the_fast_path() -> None:
    assert set(POLICIES) == {
        "default",
        "replacement",
        "drop_fields",
        "events_filter",
        "invalid_events_drop",
        "legacy_merge",
    }
    for name in POLICIES:
        fast, reference = checks.engines(name)
        assert all(plan.fast is not None for plan in fast._plans.values()), name
        assert all(plan.fast is None for plan in reference._plans.values()), name


def test_bench_fuzz_runs_coverage_guided_for_the_seconds_asked() -> None:
    """The long-run entry point (atheris, installed by the dev extra) runs, stops on time and prints its table."""
    run = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--seconds", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "atheris is not installed" not in run.stdout
    assert "no finding" in run.stdout and "| RecordEvents | passed: fast path |" in run.stdout, run.stdout
