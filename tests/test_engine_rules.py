"""The engine, rule by rule and kind by kind, with whole expected messages.

Each case builds its input afresh (a function, called once per run), runs it through
an engine made from one of the policies in testdata/policies/, and compares the whole
output message with a whole expected message (==, which in protobuf also compares
unknown fields), plus the decision record. Every rule is covered for every identifier
kind; the policies give each kind a different setting of the rule under test.

Every test runs twice: on the C fast path (where it applies) and on the Python path alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from telemetry_guard.policy import Decision, Denial, Engine, EventRecord, Removal, default_policy, load_policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

POLICIES = Path(__file__).parent / "testdata" / "policies"
KINDS = ("licensed_instance", "unlicensed_instance", "managed_service", "workspace")
PM = "parameters.private_metadata"
# What Sourcegraph's redact.go writes for a number under an allowlisted key (the default policy's marker).
NUMBER_MARKER = "ERROR: value of allowlisted key was not a string, got: *structpb.Value_NumberValue"


ACCELERATE = [True]  # set per test by the fixture below


@pytest.fixture(autouse=True, params=[True, False], ids=["fast-path", "python-path"])
def engine_path(request: pytest.FixtureRequest) -> None:
    ACCELERATE[0] = request.param


def make_engine(name: str) -> Engine:
    """A fresh engine for one case ('default' = the shipped default policy), on the path under test."""
    policy = default_policy() if name == "default" else load_policy(POLICIES / f"{name}.yaml")
    return Engine(policy, accelerate=ACCELERATE[0])


def identifier(kind: str, value: str = "id-1") -> pb.Identifier:
    """An identifier of `kind` whose required field is `value` ('' = empty)."""
    if kind == "licensed_instance":
        return pb.Identifier(
            licensed_instance=pb.Identifier.LicensedInstanceIdentifier(
                license_key=value, instance_id="instance-1", external_url="https://sg.example.com"
            )
        )
    if kind == "unlicensed_instance":
        return pb.Identifier(
            unlicensed_instance=pb.Identifier.UnlicensedInstanceIdentifier(
                instance_id=value, external_url="https://sg.example.com"
            )
        )
    if kind == "managed_service":
        return pb.Identifier(
            managed_service=pb.Identifier.ManagedServiceIdentifier(service_id=value, service_environment="prod")
        )
    return pb.Identifier(
        workspace=pb.Identifier.WorkspaceIdentifier(workspace_id=value, external_url="https://ws.example.com")
    )


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def event(
    feature: str = "cody.chat",
    action: str = "submitted",
    *,
    id: str = "ev-1",
    private: dict[str, Any] | None = None,
) -> pb.Event:
    """An event with every field set, so that a comparison shows what else was touched."""
    ev = pb.Event(
        id=id,
        feature=feature,
        action=action,
        source=pb.EventSource(
            server=pb.EventSource.Server(
                version="5.9.0",
                request_client=pb.EventSource.Server.RequestClient(
                    user_agent="Mozilla/5.0 (X11; Linux)",
                    api_client_name="vscode",
                    api_client_version="1.90",
                    requested_with="Sourcegraph",
                    api_client_feature="chat",
                ),
            ),
            client=pb.EventSource.Client(name="VSCODE_CODY_EXTENSION", version="1.2.3"),
        ),
        parameters=pb.EventParameters(
            version=2,
            metadata={"tokens": 12.0, "durationMs": 340.5},
            billing_metadata=pb.EventBillingMetadata(product="cody", category="core"),
        ),
        user=pb.EventUser(user_id=42, anonymous_user_id="anon-7f3a", sams_external_id="sams-123"),
        feature_flags=pb.EventFeatureFlags(flags={"new-chat": "true"}),
        marketing_tracking=pb.EventMarketingTracking(
            url="https://sourcegraph.com/pricing?utm_source=x",
            cohort_id="cohort-9",
            referrer="https://news.example.com",
            utm_source="newsletter",
        ),
        interaction=pb.EventInteraction(
            trace_id="trace-1",
            interaction_id="int-1",
            geolocation=pb.EventInteraction.Geolocation(country_code="NL"),
            session_id="session-1",
        ),
    )
    ev.timestamp.FromSeconds(1_700_000_000)
    if private is not None:
        ev.parameters.private_metadata.CopyFrom(struct(private))
    return ev


def edit(ev: pb.Event, change: Callable[[pb.Event], object]) -> pb.Event:
    change(ev)
    return ev


def batch(events: list[pb.Event]) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(events=pb.RecordEventsRequest.EventsPayload(events=events))


def normalized(records: list[EventRecord]) -> list[EventRecord]:
    """Records with the removals in a fixed order and their keys sorted (map order is not defined)."""
    return [
        EventRecord(
            r.index,
            r.event_id,
            r.feature,
            r.action,
            sorted((Removal(m.rule, m.path, tuple(sorted(m.keys)), m.action) for m in r.removals), key=repr),
            r.dropped_by,
        )
        for r in records
    ]


def rec(index: int, ev: pb.Event, *removals: Removal, dropped_by: str | None = None) -> EventRecord:
    return EventRecord(index, ev.id, ev.feature, ev.action, list(removals), dropped_by)


@dataclass
class Case:
    id: str
    policy: str
    kind: str
    given: Callable[[], list[pb.Event]]
    expected: Callable[[], list[pb.Event]]
    records: Callable[[], list[EventRecord]] = list
    param: Any = field(default=None)

    def __str__(self) -> str:
        return self.id


def run_record_events(case: Case) -> Decision:
    given = case.given()
    assert given, "a case must have input"
    request = batch(given)
    outcome = make_engine(case.policy).record_events(request, identifier(case.kind))
    assert outcome.denial is None, outcome.denial
    assert outcome.request is request  # filtered in place
    expected = case.expected()
    assert outcome.request == batch(expected)
    decision = outcome.decision
    assert normalized(decision.events) == normalized(case.records())
    assert (decision.rpc, decision.kind) == ("RecordEvents", case.kind)
    assert (decision.events_in, decision.events_out) == (len(given), len(expected))
    assert decision.dropped_event_ids == [r.event_id for r in case.records() if r.dropped_by]
    return decision


def run_record_event(case: Case) -> None:
    """The same single-event case through the unary RecordEvent RPC."""
    (given,) = case.given()
    request = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="req-1", identifier=identifier(case.kind)), event=given
    )
    outcome = make_engine(case.policy).record_event(request)
    assert outcome.denial is None, outcome.denial
    assert outcome.request is request
    expected_events = case.expected()
    expected = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="req-1", identifier=identifier(case.kind))
    )
    if expected_events:
        expected.event.CopyFrom(expected_events[0])
    assert outcome.request == expected
    assert normalized(outcome.decision.events) == normalized(case.records())
    assert (outcome.decision.rpc, outcome.decision.request_id) == ("RecordEvent", "req-1")


# --- marketing_tracking ------------------------------------------------------------------------

MARKETING = [
    Case(
        "licensed-drops",
        "marketing",
        "licensed_instance",
        lambda: [event()],
        lambda: [edit(event(), lambda e: e.ClearField("marketing_tracking"))],
        lambda: [rec(0, event(), Removal("defaults.marketing_tracking", "marketing_tracking"))],
    ),
    Case("unlicensed-keeps", "marketing", "unlicensed_instance", lambda: [event()], lambda: [event()]),
    Case(
        "managed-service-drops",
        "marketing",
        "managed_service",
        lambda: [event()],
        lambda: [edit(event(), lambda e: e.ClearField("marketing_tracking"))],
        lambda: [rec(0, event(), Removal("defaults.marketing_tracking", "marketing_tracking"))],
    ),
    Case("workspace-keeps", "marketing", "workspace", lambda: [event()], lambda: [event()]),
    Case(
        "drop-without-marketing-records-nothing",
        "marketing",
        "licensed_instance",
        lambda: [edit(event(), lambda e: e.ClearField("marketing_tracking"))],
        lambda: [edit(event(), lambda e: e.ClearField("marketing_tracking"))],
    ),
    Case(
        "drop-empty-but-present-marketing",
        "marketing",
        "managed_service",
        lambda: [edit(event(), lambda e: e.marketing_tracking.Clear())],  # present, no fields
        lambda: [edit(event(), lambda e: e.ClearField("marketing_tracking"))],
        lambda: [rec(0, event(), Removal("defaults.marketing_tracking", "marketing_tracking"))],
    ),
    Case(
        "batch-records-only-the-events-touched",
        "marketing",
        "licensed_instance",
        lambda: [
            event(id="a"),
            edit(event(id="b"), lambda e: e.ClearField("marketing_tracking")),
            event(id="c", feature="blob.view", action="viewed"),
        ],
        lambda: [
            edit(event(id=i, feature=f, action=a), lambda e: e.ClearField("marketing_tracking"))
            for i, f, a in [
                ("a", "cody.chat", "submitted"),
                ("b", "cody.chat", "submitted"),
                ("c", "blob.view", "viewed"),
            ]
        ],
        lambda: [
            rec(0, event(id="a"), Removal("defaults.marketing_tracking", "marketing_tracking")),
            rec(
                2,
                event(id="c", feature="blob.view", action="viewed"),
                Removal("defaults.marketing_tracking", "marketing_tracking"),
            ),
        ],
    ),
]


# --- private_metadata --------------------------------------------------------------------------

PM_L = "kinds.licensed_instance.private_metadata"
PM_U = "kinds.unlicensed_instance.private_metadata"
PM_W = "kinds.workspace.private_metadata"
SECRET = {"model": "gpt-4", "languageId": "go", "prompt": "def secret(): return 'hunter2'"}


def pm_case(
    id: str,
    kind: str,
    feature: str,
    action: str,
    given: dict[str, Any] | None,
    expected: dict[str, Any] | None,
    removals: list[Removal],
) -> Case:
    def expected_events() -> list[pb.Event]:
        ev = event(feature, action, private=expected)
        return [ev]

    return Case(
        id,
        "private_metadata",
        kind,
        lambda: [event(feature, action, private=given)],
        expected_events,
        lambda: [rec(0, event(feature, action), *removals)] if removals else [],
    )


PRIVATE = [
    pm_case(
        "licensed-exact-entry-beats-star",
        "licensed_instance",
        "cody.chat",
        "submitted",
        SECRET,
        {"model": "gpt-4"},
        [Removal(PM_L, PM, ("languageId", "prompt"))],
    ),
    pm_case(
        "licensed-star-entry",
        "licensed_instance",
        "cody.chat",
        "opened",
        SECRET,
        {"model": "gpt-4", "languageId": "go"},
        [Removal(PM_L, PM, ("prompt",))],
    ),
    pm_case(
        "licensed-not-listed-removes-it-whole",
        "licensed_instance",
        "search",
        "submitted",
        SECRET,
        None,
        [Removal(PM_L, PM, ("languageId", "model", "prompt"))],
    ),
    pm_case(
        "licensed-listed-feature-other-action-without-star",
        "licensed_instance",
        "blob.codeintel",
        "clicked",
        {"languageId": "go"},
        None,
        [Removal(PM_L, PM, ("languageId",))],
    ),
    pm_case(
        "licensed-feature-is-matched-exactly",
        "licensed_instance",
        "cody.chat.panel",
        "submitted",
        {"model": "m"},
        None,
        [Removal(PM_L, PM, ("model",))],
    ),
    pm_case(
        "licensed-only-string-keys-listed-pass-untouched",
        "licensed_instance",
        "blob.codeintel",
        "hovered",
        {"languageId": "rust"},
        {"languageId": "rust"},
        [],
    ),
    pm_case(
        "licensed-non-string-number-dropped",
        "licensed_instance",
        "cody.chat",
        "opened",
        {"model": 4.0, "languageId": "go", "prompt": "p"},
        {"languageId": "go"},
        [Removal(PM_L, PM, ("prompt",)), Removal(f"{PM_L}.non_string", PM, ("model",))],
    ),
    pm_case(
        "licensed-non-string-struct-dropped",
        "licensed_instance",
        "cody.chat",
        "opened",
        {"model": {"nested": {"deep": "secret"}}, "languageId": "go"},
        {"languageId": "go"},
        [Removal(f"{PM_L}.non_string", PM, ("model",))],
    ),
    pm_case(
        "licensed-non-string-list-dropped",
        "licensed_instance",
        "cody.chat",
        "opened",
        {"model": "m", "languageId": ["go", 1]},
        {"model": "m"},
        [Removal(f"{PM_L}.non_string", PM, ("languageId",))],
    ),
    pm_case(
        "licensed-non-string-bool-and-null-dropped",
        "licensed_instance",
        "cody.chat",
        "opened",
        {"model": True, "languageId": None, "x": "y"},
        {},
        [Removal(PM_L, PM, ("x",)), Removal(f"{PM_L}.non_string", PM, ("languageId", "model"))],
    ),
    pm_case(
        "licensed-no-private-metadata-nothing-recorded", "licensed_instance", "search", "submitted", None, None, []
    ),
    pm_case(
        "unlicensed-non-string-replaced",
        "unlicensed_instance",
        "cody.chat",
        "opened",
        {"model": {"n": [1, 2]}, "languageId": True, "prompt": "p"},
        {"model": "<non-string>", "languageId": "<non-string>"},
        [Removal(PM_U, PM, ("prompt",)), Removal(f"{PM_U}.non_string", PM, ("languageId", "model"), "replaced")],
    ),
    pm_case(
        "unlicensed-exact-entry-null-replaced",
        "unlicensed_instance",
        "cody.chat",
        "submitted",
        {"model": None, "languageId": "go"},
        {"model": "<non-string>"},
        [Removal(PM_U, PM, ("languageId",)), Removal(f"{PM_U}.non_string", PM, ("model",), "replaced")],
    ),
    pm_case(
        "unlicensed-strings-pass",
        "unlicensed_instance",
        "blob.codeintel",
        "hovered",
        {"languageId": "go"},
        {"languageId": "go"},
        [],
    ),
    pm_case(
        "unlicensed-not-listed-removes-it-whole",
        "unlicensed_instance",
        "blob.view",
        "viewed",
        {"languageId": "go"},
        None,
        [Removal(PM_U, PM, ("languageId",))],
    ),
    pm_case(
        "managed-service-keeps-everything",
        "managed_service",
        "search",
        "submitted",
        {"prompt": "p", "n": {"x": [1, None, True]}},
        {"prompt": "p", "n": {"x": [1, None, True]}},
        [],
    ),
    pm_case(
        "workspace-drops-it",
        "workspace",
        "cody.chat",
        "submitted",
        {"model": "gpt-4"},
        None,
        [Removal(PM_W, PM, ("model",))],
    ),
    pm_case("workspace-drops-an-empty-one", "workspace", "cody.chat", "submitted", {}, None, [Removal(PM_W, PM)]),
]


# --- whole-event feature filter ----------------------------------------------------------------

FEATURES = ["cody", "cody.chat", "codyx", "search", "searching", "internal", "internal.debug", "blob.view"]


def filter_case(kind: str, passing: list[str], rule: str | None) -> Case:
    def given() -> list[pb.Event]:
        return [event(f, "used", id=f"e{i}") for i, f in enumerate(FEATURES)]

    return Case(
        f"{kind}-{rule or 'all'}",
        "events_filter",
        kind,
        given,
        lambda: [event(f, "used", id=f"e{i}") for i, f in enumerate(FEATURES) if f in passing],
        lambda: [
            rec(i, event(f, "used", id=f"e{i}"), dropped_by=rule) for i, f in enumerate(FEATURES) if f not in passing
        ],
    )


FILTERS = [
    filter_case("licensed_instance", FEATURES, None),  # include ["*"]: all
    filter_case("unlicensed_instance", ["cody", "cody.chat"], "kinds.unlicensed_instance.events.include"),
    filter_case("managed_service", [], "kinds.managed_service.events.include"),  # include []: disabled
    filter_case(
        "workspace",
        ["cody", "cody.chat", "codyx", "searching", "internal", "blob.view"],
        "kinds.workspace.events.exclude",
    ),
]


# --- drop_fields -------------------------------------------------------------------------------


def drop_case(
    id: str, kind: str, given: Callable[[], pb.Event], change: Callable[[pb.Event], object], paths: list[str]
) -> Case:
    return Case(
        id,
        "drop_fields",
        kind,
        lambda: [given()],
        lambda: [edit(given(), change)],
        lambda: [rec(0, given(), *(Removal(f"kinds.{kind}.drop_fields", p) for p in paths))] if paths else [],
    )


def _clear(*steps: str) -> Callable[[pb.Event], None]:
    """Clear the field at a dotted path (written out, not via policy.fieldpaths)."""

    def change(ev: pb.Event) -> None:
        msg: Message = ev
        for step in steps[:-1]:
            msg = getattr(msg, step)
        msg.ClearField(steps[-1])

    return change


def _both(*changes: Callable[[pb.Event], None]) -> Callable[[pb.Event], None]:
    def change(ev: pb.Event) -> None:
        for one in changes:
            one(ev)

    return change


DROPS = [
    drop_case(
        "licensed-geolocation-and-user-agent",
        "licensed_instance",
        event,
        _both(_clear("interaction", "geolocation"), _clear("source", "server", "request_client", "user_agent")),
        ["interaction.geolocation", "source.server.request_client.user_agent"],
    ),
    drop_case(
        "licensed-nothing-to-drop",
        "licensed_instance",
        lambda: edit(event(), _both(_clear("interaction"), _clear("source", "server", "request_client", "user_agent"))),
        lambda e: None,
        [],
    ),
    drop_case(
        "unlicensed-anonymous-user-id-and-feature-flags",
        "unlicensed_instance",
        event,
        _both(_clear("user", "anonymous_user_id"), _clear("feature_flags")),
        ["user.anonymous_user_id", "feature_flags"],
    ),
    drop_case(
        "unlicensed-empty-anonymous-user-id-is-still-set",
        "unlicensed_instance",
        lambda: edit(event(), lambda e: setattr(e.user, "anonymous_user_id", "")),
        _both(_clear("user", "anonymous_user_id"), _clear("feature_flags")),
        ["user.anonymous_user_id", "feature_flags"],
    ),
    drop_case(
        "managed-service-parameters-metadata",
        "managed_service",
        event,
        _clear("parameters", "metadata"),
        ["parameters.metadata"],
    ),
    drop_case(
        "managed-service-empty-metadata-nothing-recorded",
        "managed_service",
        lambda: edit(event(), _clear("parameters", "metadata")),
        lambda e: None,
        [],
    ),
    drop_case(
        "workspace-whole-user-session-and-client-version",
        "workspace",
        event,
        _both(_clear("user"), _clear("interaction", "session_id"), _clear("source", "client", "version")),
        ["user", "interaction.session_id", "source.client.version"],
    ),
]


# --- invalid events ----------------------------------------------------------------------------


def _invalid_events() -> list[pb.Event]:
    no_timestamp = event(id="no-timestamp")
    no_timestamp.ClearField("timestamp")
    return [
        event(id="valid"),
        event(id=""),
        no_timestamp,
        event("Cody.chat", "submitted", id="feature-uppercase"),
        event("", "submitted", id="feature-empty"),
        event("cody.chat", "", id="action-empty"),
        event("cody.chat", "x", id="action-one-char"),
        event("cody.chat", "page view", id="action-space"),
        event("cody_chat", "submitted", id="feature-underscore"),
        event("9lives", "submitted", id="feature-digit"),
        event("a" * 64, "b" * 64, id="names-64-chars"),
        event("a" * 65, "submitted", id="feature-65-chars"),
        event("cody.chat", "b" * 65, id="action-65-chars"),
    ]


VALID_IDS = {"valid", "names-64-chars"}


def invalid_case(kind: str, rule: str | None) -> Case:
    def kept() -> list[pb.Event]:
        return [e for e in _invalid_events() if rule is None or e.id in VALID_IDS]

    return Case(
        f"{kind}-{'drop' if rule else 'forward'}",
        "invalid_events",
        kind,
        _invalid_events,
        kept,
        lambda: [
            rec(i, e, dropped_by=rule)
            for i, e in enumerate(_invalid_events())
            if rule is not None and e.id not in VALID_IDS
        ],
    )


INVALID = [
    invalid_case("licensed_instance", "defaults.invalid_events"),
    invalid_case("unlicensed_instance", None),
    invalid_case("managed_service", "defaults.invalid_events"),
    invalid_case("workspace", None),
]


# --- legacy_metadata ---------------------------------------------------------------------------


def _with_legacy(legacy: dict[str, int]) -> pb.Event:
    ev = event()
    ev.parameters.metadata.clear()
    ev.parameters.metadata.update({"a": 1.5, "b": 2.0})
    ev.parameters.legacy_metadata.update(legacy)
    return ev


def _merged(metadata: dict[str, float]) -> pb.Event:
    ev = event()
    ev.parameters.metadata.clear()
    ev.parameters.metadata.update(metadata)
    return ev


LEGACY = [
    Case(
        "licensed-merges-overwriting-equal-keys",
        "legacy_metadata",
        "licensed_instance",
        lambda: [_with_legacy({"b": 7, "c": -3})],
        lambda: [_merged({"a": 1.5, "b": 7.0, "c": -3.0})],
        lambda: [
            rec(0, event(), Removal("defaults.legacy_metadata", "parameters.legacy_metadata", ("b", "c"), "merged"))
        ],
    ),
    Case(
        "unlicensed-keeps",
        "legacy_metadata",
        "unlicensed_instance",
        lambda: [_with_legacy({"b": 7, "c": -3})],
        lambda: [_with_legacy({"b": 7, "c": -3})],
    ),
    Case(
        "managed-service-merges-as-doubles",
        "legacy_metadata",
        "managed_service",
        lambda: [_with_legacy({"big": 2**53 + 1})],
        lambda: [_merged({"a": 1.5, "b": 2.0, "big": float(2**53 + 1)})],
        lambda: [
            rec(0, event(), Removal("defaults.legacy_metadata", "parameters.legacy_metadata", ("big",), "merged"))
        ],
    ),
    Case(
        "workspace-keeps",
        "legacy_metadata",
        "workspace",
        lambda: [_with_legacy({"z": 1})],
        lambda: [_with_legacy({"z": 1})],
    ),
    Case(
        "licensed-nothing-to-merge",
        "legacy_metadata",
        "licensed_instance",
        lambda: [_with_legacy({})],
        lambda: [_with_legacy({})],
    ),
]


# --- the default policy: the seed's rules -------------------------------------------------------

COMPLETION_PM = {"languageId": "go", "otherCompletionProviders": "copilot", "prompt": "secret code"}


def _seed_single_tenant(kind: str) -> list[Case]:
    rule = f"kinds.{kind}"
    return [
        Case(
            f"{kind}-allowlisted-type-keeps-listed-keys",
            "default",
            kind,
            lambda: [event("cody.completion", "accepted", private=COMPLETION_PM)],
            lambda: [
                edit(
                    event(
                        "cody.completion",
                        "accepted",
                        private={"languageId": "go", "otherCompletionProviders": "copilot"},
                    ),
                    lambda e: e.ClearField("marketing_tracking"),
                )
            ],
            lambda: [
                rec(
                    0,
                    event("cody.completion", "accepted"),
                    Removal(f"{rule}.marketing_tracking", "marketing_tracking"),
                    Removal(f"{rule}.private_metadata", PM, ("prompt",)),
                )
            ],
        ),
        Case(
            f"{kind}-other-type-loses-marketing-and-private-metadata",
            "default",
            kind,
            lambda: [event("search", "submitted", private={"query": "repo:secret"})],
            lambda: [edit(event("search", "submitted"), lambda e: e.ClearField("marketing_tracking"))],
            lambda: [
                rec(
                    0,
                    event("search", "submitted"),
                    Removal(f"{rule}.marketing_tracking", "marketing_tracking"),
                    Removal(f"{rule}.private_metadata", PM, ("query",)),
                )
            ],
        ),
        Case(
            f"{kind}-allowlisted-key-with-non-string-value-gets-sourcegraph-marker",
            "default",
            kind,
            lambda: [event("cody.hoverCommands", "visible", private={"languageId": 3})],
            lambda: [
                edit(
                    event("cody.hoverCommands", "visible", private={"languageId": NUMBER_MARKER}),
                    lambda e: e.ClearField("marketing_tracking"),
                )
            ],
            lambda: [
                rec(
                    0,
                    event("cody.hoverCommands", "visible"),
                    Removal(f"{rule}.marketing_tracking", "marketing_tracking"),
                    Removal(f"{rule}.private_metadata.non_string", PM, ("languageId",), "replaced"),
                )
            ],
        ),
        Case(
            f"{kind}-invalid-event-and-legacy-metadata-forwarded",
            "default",
            kind,
            lambda: [edit(event("Bad Feature", "x", id=""), lambda e: e.parameters.legacy_metadata.update({"n": 1}))],
            lambda: [
                edit(
                    event("Bad Feature", "x", id=""),
                    _both(lambda e: e.parameters.legacy_metadata.update({"n": 1}), _clear("marketing_tracking")),
                )
            ],
            lambda: [
                rec(0, event("Bad Feature", "x", id=""), Removal(f"{rule}.marketing_tracking", "marketing_tracking"))
            ],
        ),
    ]


SEED = [
    *_seed_single_tenant("licensed_instance"),
    *_seed_single_tenant("unlicensed_instance"),
    *[
        Case(
            f"{kind}-untouched",
            "default",
            kind,
            lambda: [event("search", "submitted", private={"query": "q", "n": {"x": 1}})],
            lambda: [event("search", "submitted", private={"query": "q", "n": {"x": 1}})],
        )
        for kind in ("managed_service", "workspace")
    ],
]

ALL_CASES = {
    "marketing_tracking": MARKETING,
    "private_metadata": PRIVATE,
    "events": FILTERS,
    "drop_fields": DROPS,
    "invalid_events": INVALID,
    "legacy_metadata": LEGACY,
    "default_policy": SEED,
}
CASES = [pytest.param(case, id=f"{rule}-{case.id}") for rule, cases in ALL_CASES.items() for case in cases]


def test_every_rule_is_covered_for_every_kind() -> None:
    for rule, cases in ALL_CASES.items():
        assert {case.kind for case in cases} == set(KINDS), rule


@pytest.mark.parametrize("case", CASES)
def test_record_events(case: Case) -> None:
    run_record_events(case)


UNARY = [
    pytest.param(case, id=f"{rule}-{case.id}")
    for rule, cases in ALL_CASES.items()
    for case in cases
    if rule != "default_policy" and case.kind == "managed_service" and len(case.given()) == 1  # the only kind served
]


@pytest.mark.parametrize("case", UNARY)
def test_record_event_applies_the_same_rules(case: Case) -> None:
    run_record_event(case)


def test_the_cases_use_their_input() -> None:
    """Style anchor 7: a case whose input is ignored tests nothing. Run one case with its
    input swapped for another's: the comparison must fail."""
    case = PRIVATE[0]
    swapped = Case(case.id, case.policy, case.kind, PRIVATE[1].given, case.expected, case.records)
    with pytest.raises(AssertionError):
        run_record_events(swapped)


def test_record_event_removed_event_leaves_no_event() -> None:
    request = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(identifier=identifier("managed_service")), event=event("search", "ran")
    )
    outcome = make_engine("events_filter").record_event(request)  # managed_service: include []
    assert outcome.denial is None
    assert outcome.request == pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(identifier=identifier("managed_service"))
    )
    assert outcome.decision.dropped_event_ids == ["ev-1"]
    assert outcome.decision.counts() == {"kinds.managed_service.events.include": 1}


def test_decision_counts_and_dict_for_a_mixed_batch() -> None:
    request = batch(
        [
            event("search", "submitted", id="s1", private=SECRET),
            event("cody.completion", "accepted", id="c1", private=COMPLETION_PM),
            event("blob.view", "viewed", id="b1"),
        ]
    )
    outcome = make_engine("default").record_events(request, identifier("licensed_instance"))
    decision = outcome.decision
    # a removed private_metadata key counts 1, whether the whole private_metadata went or only the key
    assert decision.counts() == {
        "kinds.licensed_instance.marketing_tracking": 3,
        "kinds.licensed_instance.private_metadata": 4,
    }
    summary = decision.to_dict()
    assert summary["rpc"] == "RecordEvents"
    assert summary["kind"] == "licensed_instance"
    assert (summary["events_in"], summary["events_out"]) == (3, 3)
    assert summary["dropped_event_ids"] == []
    assert [e["id"] for e in summary["events"]] == ["s1", "c1", "b1"]
    assert summary["unknown_fields"] == "discarded"
    assert summary["removed_per_rule"] == decision.counts()
    assert "denial" not in summary
    assert all("keys" not in r for e in summary["events"] for r in e["removals"])  # names only with_keys
    with_keys = decision.to_dict(with_keys=True)
    assert [r.get("keys") for r in with_keys["events"][1]["removals"]] == [None, ["prompt"]]


# --- unknown fields ------------------------------------------------------------------------------


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field, encoded by hand (numbers < 16, short payloads)."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def long_ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field with a two-byte tag (16 <= number < 2048)."""
    assert 16 <= number < 2048 and len(payload) < 128
    key = number << 3 | 2
    return bytes([key & 0x7F | 0x80, key >> 7, len(payload)]) + payload


def fixed32(number: int, value: bytes) -> bytes:
    assert number < 16 and len(value) == 4
    return bytes([number << 3 | 5]) + value


def append_unknown(message: Message, raw: bytes) -> None:
    """Append hand-encoded bytes to a message's serialization and parse it back in place."""
    message.ParseFromString(message.SerializeToString() + raw)


# (path inside the RecordEventsRequest, field number) of every unknown field added below.
EVENT_UNKNOWNS = {
    ("events.events[0]", 99): "event",
    ("events.events[0].timestamp", 15): "timestamp",
    ("events.events[0].source.server.request_client", 31): "request client",
    ("events.events[0].parameters", 40): "parameters",
    ("events.events[0].parameters.private_metadata", 2): "struct",
    ("events.events[0].parameters.private_metadata.fields[model]", 9): "value",
    ("events.events[0].parameters.private_metadata.fields[list].list_value", 7): "list",
    ("events.events[0].marketing_tracking", 2): "marketing (reserved number)",
    ("events.events[0].interaction.geolocation", 5): "geolocation",
    ("events.events[0].feature_flags", 3): "feature flags",
}
REQUEST_UNKNOWNS = {("", 3): "request", ("events", 2): "payload"}


def event_with_unknowns(feature: str = "cody.chat", action: str = "opened") -> pb.Event:
    ev = event(feature, action, private={"model": "gpt-4", "prompt": "p", "list": ["a"]})
    append_unknown(ev.timestamp, ld(15, b"t"))
    append_unknown(ev.source.server.request_client, long_ld(31, b"unknown-in-request-client"))
    append_unknown(ev.parameters.private_metadata.fields["model"], ld(9, b"unknown-in-value"))
    append_unknown(ev.parameters.private_metadata.fields["list"].list_value, ld(7, b"unknown-in-list"))
    append_unknown(ev.parameters.private_metadata, ld(2, b"unknown-in-struct"))
    append_unknown(ev.parameters, long_ld(40, b"unknown-in-parameters"))
    append_unknown(ev.marketing_tracking, ld(2, b"https://first-source.example"))
    append_unknown(ev.interaction.geolocation, fixed32(5, b"\x01\x02\x03\x04"))
    append_unknown(ev.feature_flags, ld(3, b"unknown-in-flags"))
    append_unknown(ev, long_ld(99, b"unknown-in-event"))
    return ev


def request_with_unknowns(*events: pb.Event) -> pb.RecordEventsRequest:
    request = batch(list(events))
    append_unknown(request.events, ld(2, b"unknown-in-payload"))
    append_unknown(request, ld(3, b"unknown-in-request"))
    return request


def unknowns(message: Message, path: str = "") -> set[tuple[str, int]]:
    """(path, number) of every unknown field in a message tree, found with UnknownFieldSet."""
    found = {(path, f.field_number) for f in UnknownFieldSet(message)}
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    found |= unknowns(item, f"{name}[{key}]")
        elif fd.is_repeated:
            for i, item in enumerate(value):
                found |= unknowns(item, f"{name}[{i}]")
        else:
            found |= unknowns(value, name)
    return found


def test_unknown_fields_are_really_built() -> None:
    request = request_with_unknowns(event_with_unknowns())
    assert unknowns(request) == set(EVENT_UNKNOWNS) | set(REQUEST_UNKNOWNS)


def test_unknown_fields_discarded_by_default_at_every_depth() -> None:
    request = request_with_unknowns(event_with_unknowns())
    outcome = make_engine("unknown_fields").record_events(request, identifier("licensed_instance"))
    expected = batch([event("cody.chat", "opened", private={"model": "gpt-4", "prompt": "p", "list": ["a"]})])
    assert outcome.request == expected
    assert unknowns(outcome.request) == set()
    assert outcome.decision.unknown_fields == "discarded"
    # the event they were left out of is recorded and counted once, as its rule's removal
    (record,) = outcome.decision.events
    assert record.removals == [Removal("strictest-default.unknown_fields", "(unknown fields)")]
    assert outcome.decision.counts() == {"strictest-default.unknown_fields": 1}


def test_unknown_fields_kept_when_the_policy_says_keep() -> None:
    request = request_with_unknowns(event_with_unknowns())
    before = request.SerializeToString(deterministic=True)
    outcome = make_engine("unknown_fields").record_events(request, identifier("unlicensed_instance"))
    assert outcome.request is not None
    assert outcome.request.SerializeToString(deterministic=True) == before
    assert outcome.request == request_with_unknowns(event_with_unknowns())
    assert unknowns(outcome.request) == set(EVENT_UNKNOWNS) | set(REQUEST_UNKNOWNS)
    assert outcome.decision.unknown_fields == "kept"


def test_unknown_fields_discarded_inside_filtered_fields() -> None:
    """managed_service: discard, marketing dropped, private_metadata allowlisted (cody.chat/*)."""
    request = request_with_unknowns(event_with_unknowns())
    outcome = make_engine("unknown_fields").record_events(request, identifier("managed_service"))
    expected = edit(event("cody.chat", "opened", private={"model": "gpt-4"}), _clear("marketing_tracking"))
    assert outcome.request == batch([expected])
    assert unknowns(outcome.request) == set()


def test_unknown_fields_kept_inside_what_the_filters_keep() -> None:
    """workspace: keep, marketing dropped (its unknown fields go with it), private_metadata allowlisted."""
    request = request_with_unknowns(event_with_unknowns())
    outcome = make_engine("unknown_fields").record_events(request, identifier("workspace"))
    assert outcome.request is not None
    gone = {
        ("events.events[0].marketing_tracking", 2),
        ("events.events[0].parameters.private_metadata.fields[list].list_value", 7),  # key "list" not listed
    }
    assert unknowns(outcome.request) == (set(EVENT_UNKNOWNS) | set(REQUEST_UNKNOWNS)) - gone
    ev = outcome.request.events.events[0]
    assert not ev.HasField("marketing_tracking")
    assert sorted(ev.parameters.private_metadata.fields) == ["model"]


@pytest.mark.parametrize(("kind", "kept"), [("managed_service", False)])
def test_unknown_fields_in_record_event(kind: str, kept: bool) -> None:
    request = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="r", identifier=identifier(kind)),
        event=event_with_unknowns(),
    )
    append_unknown(request.metadata, ld(7, b"unknown-in-metadata"))
    append_unknown(request, ld(5, b"unknown-in-request"))
    outcome = make_engine("unknown_fields").record_event(request)
    assert outcome.request is not None
    found = unknowns(outcome.request)
    if kept:
        assert ("", 5) in found
        assert ("metadata", 7) in found
        assert ("event", 99) in found
        assert ("event.parameters.private_metadata.fields[model]", 9) in found
    else:
        assert found == set()
        assert outcome.request.event == edit(
            event("cody.chat", "opened", private={"model": "gpt-4"}), _clear("marketing_tracking")
        )


def test_unknown_fields_in_stream_metadata_message() -> None:
    request = pb.RecordEventsRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="r-1", identifier=identifier("licensed_instance"))
    )
    append_unknown(request.metadata.identifier.licensed_instance, ld(9, b"unknown-in-identifier"))
    append_unknown(request.metadata, ld(9, b"unknown-in-metadata"))
    outcome = make_engine("unknown_fields").record_events(request)
    assert outcome.denial is None
    assert outcome.request == pb.RecordEventsRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="r-1", identifier=identifier("licensed_instance"))
    )
    assert outcome.decision.request_id == "r-1"


@pytest.mark.parametrize(("kind", "kept"), [("licensed_instance", False), ("unlicensed_instance", True)])
def test_unknown_fields_in_user_metadata(kind: str, kept: bool) -> None:
    request = pb.PublishInstanceUserMetadataRequest(
        user_metadata=pb.PublishInstanceUserMetadataRequest.UserMetadataPayload(
            users=[pb.InstanceUserMetadata(id=1, username="ada")]
        )
    )
    append_unknown(request.user_metadata.users[0], ld(9, b"unknown-in-user"))
    outcome = make_engine("unknown_fields").publish_instance_user_metadata(request, identifier(kind))
    assert outcome.request is not None
    assert unknowns(outcome.request) == ({("user_metadata.users[0]", 9)} if kept else set())


@pytest.mark.parametrize("detailed", [False, True], ids=["plain", "detailed"])
def test_decision_names_unknown_fields_and_whole_private_metadata_keys_at_any_detail(detailed: bool) -> None:
    # The counts (metrics, audit lines) come from these records: they must not depend on `detailed`.
    request = request_with_unknowns(event_with_unknowns("search", "submitted"))
    outcome = make_engine("unknown_fields").record_events(request, identifier("managed_service"), detailed=detailed)
    assert outcome.decision.counts() == {
        "kinds.managed_service.marketing_tracking": 1,
        "kinds.managed_service.private_metadata": 3,
        "strictest-default.unknown_fields": 1,
    }
    (record,) = outcome.decision.events
    assert normalized([record]) == normalized(
        [
            EventRecord(
                0,
                "ev-1",
                "search",
                "submitted",
                [
                    Removal("kinds.managed_service.marketing_tracking", "marketing_tracking"),
                    Removal("kinds.managed_service.private_metadata", PM, ("list", "model", "prompt")),
                    Removal("strictest-default.unknown_fields", "(unknown fields)"),
                ],
            )
        ]
    )


# --- PublishInstanceUserMetadata ----------------------------------------------------------------


def _users() -> pb.PublishInstanceUserMetadataRequest:
    return pb.PublishInstanceUserMetadataRequest(
        user_metadata=pb.PublishInstanceUserMetadataRequest.UserMetadataPayload(
            users=[
                pb.InstanceUserMetadata(
                    id=1, username="ada", primary_email="ada@example.com", assigned_rbac_roles=["admin", "user"]
                ),
                pb.InstanceUserMetadata(id=2, username="bob", primary_email="bob@example.com"),
                pb.InstanceUserMetadata(id=3, username="cy"),
            ]
        )
    )


def _orgs() -> pb.PublishInstanceUserMetadataRequest:
    return pb.PublishInstanceUserMetadataRequest(
        organization_metadata=pb.PublishInstanceUserMetadataRequest.OrganizationMetadataPayload(
            organizations=[
                pb.InstanceOrganizationMetadata(id=10, name="acme", display_name="ACME Corp", user_ids=[1, 2]),
            ]
        )
    )


@pytest.mark.parametrize("kind", ["licensed_instance", "unlicensed_instance"])
def test_user_metadata_only_listed_user_fields_pass(kind: str) -> None:
    outcome = make_engine("user_metadata").publish_instance_user_metadata(_users(), identifier(kind))
    assert outcome.denial is None
    assert outcome.request == pb.PublishInstanceUserMetadataRequest(
        user_metadata=pb.PublishInstanceUserMetadataRequest.UserMetadataPayload(
            users=[
                pb.InstanceUserMetadata(id=1, username="ada"),
                pb.InstanceUserMetadata(id=2, username="bob"),
                pb.InstanceUserMetadata(id=3, username="cy"),
            ]
        )
    )
    assert sorted(outcome.decision.removals, key=repr) == sorted(
        [
            Removal("user_metadata.user_fields", "users.primary_email", ("primary_email", "primary_email")),
            Removal("user_metadata.user_fields", "users.assigned_rbac_roles", ("assigned_rbac_roles",)),
        ],
        key=repr,
    )
    assert outcome.decision.counts() == {"user_metadata.user_fields": 3}


def test_user_metadata_only_listed_organization_fields_pass() -> None:
    outcome = make_engine("user_metadata").publish_instance_user_metadata(_orgs(), identifier("licensed_instance"))
    assert outcome.request == pb.PublishInstanceUserMetadataRequest(
        organization_metadata=pb.PublishInstanceUserMetadataRequest.OrganizationMetadataPayload(
            organizations=[pb.InstanceOrganizationMetadata(id=10, name="acme")]
        )
    )
    assert {r.path for r in outcome.decision.removals} == {"organizations.display_name", "organizations.user_ids"}


def test_user_metadata_stream_metadata_message_passes() -> None:
    request = pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(
            request_id="u-1", identifier=identifier("unlicensed_instance")
        )
    )
    outcome = make_engine("user_metadata").publish_instance_user_metadata(request)
    assert outcome.denial is None
    assert outcome.request == pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(
            request_id="u-1", identifier=identifier("unlicensed_instance")
        )
    )
    assert (outcome.decision.kind, outcome.decision.request_id) == ("unlicensed_instance", "u-1")


@pytest.mark.parametrize(
    ("policy", "kind", "rule"),
    [
        ("default", "licensed_instance", "user_metadata.enabled"),  # allowed kind, but not enabled
        ("default", "unlicensed_instance", "user_metadata.enabled"),
        ("access", "licensed_instance", "access.PublishInstanceUserMetadata"),  # enabled, kind not listed
        ("default", "managed_service", "identifier"),  # a kind the gateway does not serve for the RPC
        ("default", "workspace", "identifier"),
        ("user_metadata", "managed_service", "identifier"),
    ],
)
@pytest.mark.parametrize("payload", [_users, _orgs])
def test_user_metadata_refused(policy: str, kind: str, rule: str, payload: Callable[[], Message]) -> None:
    request = payload()
    outcome = make_engine(policy).publish_instance_user_metadata(request, identifier(kind))  # type: ignore[arg-type]
    assert outcome.request is None
    assert outcome.denial is not None
    code = grpc.StatusCode.UNIMPLEMENTED if rule == "identifier" else grpc.StatusCode.PERMISSION_DENIED
    assert (outcome.denial.code, outcome.denial.rule) == (code, rule)


def test_user_metadata_refused_when_disabled_even_for_the_metadata_message() -> None:
    request = pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(identifier=identifier("licensed_instance"))
    )
    outcome = make_engine("default").publish_instance_user_metadata(request)
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == (grpc.StatusCode.PERMISSION_DENIED, "user_metadata.enabled")


# --- access ----------------------------------------------------------------------------------------

OK = "ok"
UNSUPPORTED = (grpc.StatusCode.UNIMPLEMENTED, "identifier")  # the gateway serves no such kind for the RPC

ACCESS = [
    # policy, rpc, kind, required-field value, authorization, expected (kind or (code, rule))
    ("access", "RecordEvents", "licensed_instance", "key", None, "licensed_instance"),
    (
        "access",
        "RecordEvents",
        "unlicensed_instance",
        "i",
        None,
        (grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvents"),
    ),
    ("access", "RecordEvents", "managed_service", "svc", "Bearer tok", "managed_service"),
    ("access", "RecordEvents", "managed_service", "svc", "bearer tok", "managed_service"),
    ("access", "RecordEvents", "workspace", "ws", "Bearer  tok ", "workspace"),
    (
        "access",
        "RecordEvents",
        "managed_service",
        "svc",
        None,
        (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    ),
    (
        "access",
        "RecordEvents",
        "managed_service",
        "svc",
        "",
        (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    ),
    (
        "access",
        "RecordEvents",
        "workspace",
        "ws",
        "Basic dXNlcjpwdw==",
        (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    ),
    (
        "access",
        "RecordEvents",
        "workspace",
        "ws",
        "Bearer",
        (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    ),
    (
        "access",
        "RecordEvents",
        "workspace",
        "ws",
        "Bearer a b",
        (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for"),
    ),
    ("access", "RecordEvents", "workspace", "ws", "tok", (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for")),
    ("access", "RecordEvent", "workspace", "ws", "Bearer tok", UNSUPPORTED),  # the gateway's refusal first
    (
        "access",
        "RecordEvent",
        "managed_service",
        "svc",
        "Bearer tok",
        (grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvent"),
    ),
    ("access", "RecordEvent", "licensed_instance", "key", None, UNSUPPORTED),
    (
        "access",
        "PublishInstanceUserMetadata",
        "licensed_instance",
        "key",
        None,
        (grpc.StatusCode.PERMISSION_DENIED, "access.PublishInstanceUserMetadata"),
    ),
    # an empty required field
    ("access", "RecordEvents", "licensed_instance", "", None, (grpc.StatusCode.INVALID_ARGUMENT, "identifier")),
    ("default", "RecordEvents", "unlicensed_instance", "", None, (grpc.StatusCode.INVALID_ARGUMENT, "identifier")),
    ("access", "RecordEvents", "managed_service", "", "Bearer tok", (grpc.StatusCode.INVALID_ARGUMENT, "identifier")),
    ("access", "RecordEvents", "workspace", "", "Bearer tok", (grpc.StatusCode.INVALID_ARGUMENT, "identifier")),
    # the default policy
    ("default", "RecordEvents", "licensed_instance", "key", None, "licensed_instance"),
    ("default", "RecordEvents", "unlicensed_instance", "i", None, "unlicensed_instance"),
    ("default", "RecordEvents", "workspace", "ws", None, (grpc.StatusCode.UNAUTHENTICATED, "credentials.required_for")),
    ("default", "RecordEvent", "managed_service", "svc", "Bearer t", "managed_service"),
    ("default", "RecordEvent", "workspace", "ws", "Bearer t", UNSUPPORTED),
    ("default", "RecordEvent", "licensed_instance", "k", None, UNSUPPORTED),
    ("default", "PublishInstanceUserMetadata", "managed_service", "svc", "Bearer t", UNSUPPORTED),
]


@pytest.mark.parametrize(("policy", "rpc", "kind", "value", "authorization", "expected"), ACCESS)
def test_check_access(policy: str, rpc: str, kind: str, value: str, authorization: str | None, expected: Any) -> None:
    got = make_engine(policy).check_access(rpc, identifier(kind, value), authorization)
    if isinstance(expected, str):
        assert got == expected
    else:
        assert isinstance(got, Denial)
        assert (got.code, got.rule) == expected
        if expected == UNSUPPORTED:  # the gateway's own message; the RPC and kind go to the audit log
            assert got.message == "unsupported identifier type"
            assert rpc in got.reason and kind in got.reason
        else:
            assert rpc in got.message


@pytest.mark.parametrize("missing", [None, pb.Identifier()], ids=["none", "empty-oneof"])
@pytest.mark.parametrize("rpc", ["RecordEvents", "RecordEvent", "PublishInstanceUserMetadata"])
def test_check_access_without_identifier(rpc: str, missing: pb.Identifier | None) -> None:
    got = make_engine("default").check_access(rpc, missing, "Bearer t")
    assert isinstance(got, Denial)
    assert (got.code, got.rule, got.message) == (*UNSUPPORTED, "unsupported identifier type")


@pytest.mark.parametrize("kind", KINDS)
def test_record_events_denied_without_identifier(kind: str) -> None:
    request = batch([event()])
    outcome = make_engine("default").record_events(request, None)
    assert outcome.request is None
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == (grpc.StatusCode.INVALID_ARGUMENT, "protocol")
    assert "when metadata not yet received" in outcome.denial.message


@pytest.mark.parametrize("kind", KINDS)
def test_record_events_metadata_message_admits_by_its_identifier(kind: str) -> None:
    allowed = kind in ("licensed_instance", "managed_service", "workspace")
    metadata = pb.RecordEventsRequestMetadata(request_id="r", identifier=identifier(kind))
    request = pb.RecordEventsRequest(metadata=metadata)
    outcome = make_engine("access").record_events(request)
    if allowed:
        assert outcome.denial is None
        assert outcome.request == pb.RecordEventsRequest(
            metadata=pb.RecordEventsRequestMetadata(request_id="r", identifier=identifier(kind))
        )
    else:
        assert outcome.request is None
        assert outcome.denial is not None
        assert (outcome.denial.code, outcome.denial.rule) == (grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvents")


@pytest.mark.parametrize(
    ("kind", "value", "code", "rule"),
    [
        ("unlicensed_instance", "i", grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvents"),
        ("licensed_instance", "", grpc.StatusCode.INVALID_ARGUMENT, "identifier"),
    ],
)
def test_record_events_payload_denied(kind: str, value: str, code: grpc.StatusCode, rule: str) -> None:
    outcome = make_engine("access").record_events(batch([event()]), identifier(kind, value))
    assert outcome.request is None
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == (code, rule)
    assert outcome.decision.to_dict()["denial"] == {"code": code.name, "rule": rule, "message": outcome.denial.message}


def test_record_event_without_event_is_invalid_argument() -> None:
    request = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(identifier=identifier("managed_service")))
    outcome = make_engine("default").record_event(request)
    assert outcome.request is None
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == (grpc.StatusCode.INVALID_ARGUMENT, "event")


def test_record_event_without_metadata_is_unimplemented() -> None:
    """No identifier: the gateway's UNIMPLEMENTED "unsupported identifier type"."""
    outcome = make_engine("default").record_event(pb.RecordEventRequest(event=event()))
    assert outcome.request is None
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == UNSUPPORTED


@pytest.mark.parametrize(
    ("policy", "kind", "expected"),
    [
        ("default", "licensed_instance", UNSUPPORTED),
        ("default", "workspace", UNSUPPORTED),
        ("access", "managed_service", (grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvent")),
    ],
)
def test_record_event_kind_not_allowed(policy: str, kind: str, expected: tuple[grpc.StatusCode, str]) -> None:
    request = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(identifier=identifier(kind)), event=event())
    outcome = make_engine(policy).record_event(request)
    assert outcome.request is None
    assert outcome.denial is not None
    assert (outcome.denial.code, outcome.denial.rule) == expected


# -- regressions -----------------------------------------------------------------------


def test_trailing_newline_in_names_is_invalid() -> None:
    """Python's "$" matches before a final newline; the gateway's regexp does not."""
    engine = make_engine("invalid_events")  # licensed_instance: drop
    request = batch(
        [
            pb.Event(id="a", feature="cody.chat\n", action="submitted"),
            pb.Event(id="b", feature="cody.chat", action="submitted\n"),
            pb.Event(id="c", feature="cody.chat", action="submitted"),
        ]
    )
    for ev in request.events.events:
        ev.timestamp.FromSeconds(1)
    outcome = engine.record_events(request, identifier("licensed_instance"))
    assert outcome.request is not None
    assert [ev.id for ev in outcome.request.events.events] == ["c"]
    assert outcome.decision.dropped_event_ids == ["a", "b"]


def test_private_metadata_sent_in_two_pieces_is_merged_like_protobuf_does() -> None:
    """A message field that occurs twice on the wire is merged; the engine's views must agree."""
    engine = make_engine("private_metadata")
    first = pb.Event(id="e1", feature="cody.chat", action="answered")  # the * entry: model, languageId
    first.timestamp.FromSeconds(1)
    first.parameters.private_metadata.update({"model": "gpt", "prompt": "secret one"})
    second = pb.Event()
    second.parameters.private_metadata.update({"languageId": "go", "prompt": "secret two"})
    wire = first.SerializeToString() + second.SerializeToString()  # = Merge(first, second)
    merged = pb.Event.FromString(wire)
    assert set(merged.parameters.private_metadata.fields) == {"model", "prompt", "languageId"}
    request = pb.RecordEventsRequest()
    request.events.events.add().MergeFromString(wire)
    expected = pb.RecordEventsRequest()
    expected.CopyFrom(request)
    out = engine.record_events_bytes(request.SerializeToString(), identifier("licensed_instance"))
    assert out.request is not None
    left = pb.RecordEventsRequest.FromString(out.request).events.events[0].parameters.private_metadata
    allowed = engine.policy.allowlist.lookup("cody.chat", "answered")
    assert allowed is not None
    assert set(left.fields) == {"model", "prompt", "languageId"} & allowed.keys
    assert "prompt" not in left.fields


def test_records_of_events_removed_whole_keep_only_their_id() -> None:
    """The feature and action of a removed event left with it: to_dict names the event by id only."""
    engine = make_engine("invalid_events")  # licensed_instance: drop
    secret_name = "SECRET" * 30  # an invalid feature (not lower camel case, over 64 characters)
    request = batch([pb.Event(id="gone", feature=secret_name, action="submitted")])
    outcome = engine.record_events(request, identifier("licensed_instance"))
    assert outcome.decision.dropped_event_ids == ["gone"]
    as_dict = outcome.decision.to_dict(with_keys=True)
    assert as_dict["events"] == [{"index": 0, "id": "gone", "dropped_by": "defaults.invalid_events"}]
    assert "SECRET" not in repr(as_dict)
    long_id = "i" * 300  # kept exact where it matters: the acknowledgement of a removed event
    request = batch([pb.Event(id=long_id, feature=secret_name, action="submitted")])
    outcome = engine.record_events(request, identifier("licensed_instance"))
    assert outcome.decision.dropped_event_ids == [long_id]
    assert len(outcome.decision.to_dict()["dropped_event_ids"][0]) < 200  # clipped where it is written


def test_a_metadata_message_is_judged_by_its_own_identifier_on_both_paths() -> None:
    """A proxy passes the stream's identifier; a (second) metadata message must still be checked itself."""
    engine = make_engine("default")
    stream_identifier = identifier("licensed_instance")
    incomplete = pb.RecordEventsRequest(metadata=pb.RecordEventsRequestMetadata(identifier=pb.Identifier()))
    incomplete.metadata.identifier.workspace.external_url = "https://ws.example"  # no workspace_id
    out = engine.record_events_bytes(incomplete.SerializeToString(), stream_identifier)
    assert out.request is None and out.denial is not None
    assert (out.denial.code, out.denial.rule) == (grpc.StatusCode.INVALID_ARGUMENT, "identifier")
    copy = pb.RecordEventsRequest()
    copy.CopyFrom(incomplete)
    assert engine.record_events(copy, stream_identifier).denial is not None
    # A valid metadata message passes with or without the stream's identifier, its own kind decides.
    valid = pb.RecordEventsRequest(
        metadata=pb.RecordEventsRequestMetadata(identifier=identifier("unlicensed_instance"))
    )
    for given in (None, stream_identifier):
        passed = engine.record_events_bytes(valid.SerializeToString(), given)
        assert passed.denial is None and passed.request == valid.SerializeToString()
        assert passed.decision.kind == "unlicensed_instance"
    # Events with no identifier at all are refused.
    events = batch([pb.Event(id="x", feature="cody.chat", action="submitted")])
    refused = engine.record_events_bytes(events.SerializeToString(), None)
    assert refused.request is None and refused.denial is not None
    assert refused.denial.code == grpc.StatusCode.INVALID_ARGUMENT
