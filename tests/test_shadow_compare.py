"""policy.compare: where two policies' decisions about the same message disagree on what leaves.

The sidecar compares the fast path's decisions, naming the keys of a private_metadata removed
whole from the payload (sidecar.shadow._PrivateKeys); the reference is the comparison of the
detailed decisions of the Python path. Both must give the same differences on mixed payloads.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_sidecar_shadow import NARROW, WIDE, WIDE_ALLOWLIST, completion, search
from test_sidecar_support import POLICY, dropped, event, invalid, payload, sensitive

from telemetry_guard.policy import Decision, Denial, Engine, EventRecord, Removal, load_policy
from telemetry_guard.policy.compare import Difference, compare, compare_refusals
from telemetry_guard.sidecar.shadow import Sampler, _PrivateKeys

PRIVATE = "parameters.private_metadata"
KINDS = ("licensed_instance", "managed_service")


def _engines(tmp_path: Path) -> dict[str, Engine]:
    (tmp_path / "wide.yaml").write_text(WIDE_ALLOWLIST)
    texts = {
        "in_force": POLICY,
        "narrow": NARROW,
        "wide": WIDE,
        "keep": POLICY.replace(
            "private_metadata: {mode: allowlist, non_string: drop}", "private_metadata: {mode: keep}"
        ),
        "replace": POLICY.replace("non_string: drop", "non_string: replace, replacement: redacted"),
    }
    engines = {}
    for name, text in texts.items():
        path = tmp_path / f"{name}-policy.yaml"
        path.write_text(text)
        engines[name] = Engine(load_policy(path))
    return engines


# replace: non-string values replaced by a string instead of removed; the values leave under neither policy
@pytest.mark.parametrize(("candidate", "differing"), [("narrow", 4), ("wide", 4), ("keep", 4), ("replace", 0)])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_decisions_with_keys_from_the_payload_compare_as_the_detailed_reference(
    tmp_path: Path, candidate: str, differing: int, kind: str
) -> None:
    engines = _engines(tmp_path)
    ours, theirs = engines["in_force"], engines[candidate]
    found = 0
    for seed in range(4):
        data = _mixed(seed).SerializeToString()
        fast = compare(
            ours.record_events_admitted(data, kind).decision,
            theirs.record_events_admitted(data, kind).decision,
            _PrivateKeys(data),
        )
        reference = compare(
            ours.record_events_admitted(data, kind, detailed=True).decision,
            theirs.record_events_admitted(data, kind, detailed=True).decision,
        )
        assert fast == reference
        found += bool(reference)
    assert found == differing


def _mixed(seed: int) -> Any:
    """A payload with something for every rule: allowlisted and other types, non-string values, empty and
    absent private_metadata, marketing, unknown fields, legacy metadata, events removed whole."""
    events = [
        sensitive(f"s{seed}"),
        completion(f"c{seed}"),
        search(f"q{seed}"),
        dropped(f"d{seed}"),
        invalid(f"i{seed}"),
        event(f"n{seed}", private={"languageId": 3.0, "otherCompletionProviders": "x"}),
        event(f"e{seed}", feature="repo.page", action="viewed", private={}),
        event(f"a{seed}", feature="search.results", action="viewed", unknown=True),
    ]
    return payload(*events[seed:], *events[:seed])


def _decision(*events: EventRecord, removals: list[Removal] | None = None) -> Decision:
    return Decision("RecordEvents", "licensed_instance", events=list(events), removals=removals)


def test_a_replaced_value_counts_as_removed_and_a_merge_is_no_difference() -> None:
    replaced = Removal("kinds.x.non_string", PRIVATE, ("n",), "replaced")
    removed = Removal("defaults.non_string", PRIVATE, ("n",))
    merged = Removal("defaults.legacy_metadata", "parameters.legacy_metadata", ("legacy",), "merged")
    a = _decision(EventRecord(0, "e0", "f", "a", [replaced, merged]))
    b = _decision(EventRecord(0, "e0", "f", "a", [removed]))
    assert compare(a, b) == []
    assert compare(a, _decision()) == [Difference("candidate_keeps", PRIVATE, "kinds.x.non_string", 1, ("n",))]


def test_an_event_removed_whole_is_one_difference_whatever_else_is_removed_in_it() -> None:
    inside = [Removal("defaults.marketing_tracking", "marketing_tracking"), Removal("r", PRIVATE, ("k1", "k2"))]
    kept = _decision(EventRecord(3, "e3", "f", "a", inside))
    gone = _decision(EventRecord(3, "e3", "f", "a", [], dropped_by="defaults.events.exclude"))
    assert compare(kept, gone) == [Difference("candidate_removes", "event", "defaults.events.exclude", 1)]
    assert compare(gone, kept) == [Difference("candidate_keeps", "event", "defaults.events.exclude", 1)]
    assert compare(gone, gone) == []


def test_user_metadata_fields_count_once_per_user() -> None:
    three = Removal("user_metadata.user_fields", "users.primary_email", ("primary_email",) * 3)
    one = Removal("user_metadata.user_fields", "users.primary_email", ("primary_email",))
    assert compare(_decision(removals=[one]), _decision(removals=[three])) == [
        Difference("candidate_removes", "users.primary_email", "user_metadata.user_fields", 2, ("primary_email",))
    ]


def test_refusals_differ_by_status_not_by_rule_name() -> None:
    denied = Denial(grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvent", "no")
    renamed = Denial(grpc.StatusCode.PERMISSION_DENIED, "strictest-default.access", "no")
    assert compare_refusals(denied, renamed) is None
    assert compare_refusals(None, None) is None
    found = compare_refusals(None, denied)
    assert found is not None and (found.in_force, found.candidate, found.rule) == (
        "OK",
        "PERMISSION_DENIED",
        denied.rule,
    )


@pytest.mark.parametrize(("rate", "taken"), [(1.0, 20), (0.5, 10), (0.25, 5), (0.1, 2)])
def test_sampling_takes_an_exact_even_share(rate: float, taken: int) -> None:
    sampler = Sampler(rate)
    picks = [i for i in range(20) if sampler.take()]
    assert len(picks) == taken
    if taken > 1:
        gaps = {b - a for a, b in itertools.pairwise(picks)}
        assert gaps == {round(1 / rate)}
    with pytest.raises(ValueError):
        Sampler(0)
