"""bench.sidecar --shadow's candidate: it must pass the gate serve applies, and differ from the default policy
in the one allowlist key the benchmark says (a candidate that no longer loads made the shadow judge nothing)."""

from __future__ import annotations

from pathlib import Path

from bench.sidecar import SHADOW_KEY, shadow_candidate
from telemetry_guard.policy import default_policy, load_policy
from telemetry_guard.policy.safety import check_enforceable


def test_the_shadow_candidate_serves_and_adds_one_allowlist_key(tmp_path: Path) -> None:
    candidate = load_policy(shadow_candidate(tmp_path))
    check_enforceable(candidate, allow_unsafe_policy=False)  # raises UnsafePolicyError, as serve refuses it
    default = default_policy()
    feature, key = SHADOW_KEY
    assert candidate.kinds == default.kinds and candidate.access == default.access
    assert candidate.credentials_scopes == default.credentials_scopes
    wider, base = candidate.allowlist.entries, default.allowlist.entries
    assert set(wider) == set(base)
    assert wider[(feature, "*")].keys - base[(feature, "*")].keys == {key}
    assert all(wider[t].keys == base[t].keys for t in base if t != (feature, "*"))
