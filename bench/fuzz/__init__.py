"""Differential fuzzing of the engine: the C fast path against the Python reference, with invariants.

inputs makes cases from a source of choices, checks runs one through both paths; the test suite
drives them with hypothesis for a bounded time (tests/test_fuzz.py), `python -m bench.fuzz
--seconds N` for as long as one likes (atheris where installed, else a seeded RNG).
"""
