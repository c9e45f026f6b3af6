"""Sourcegraph's gateway, rule by rule (shared/protocol/GATEWAY.md), against telemetry-guard where it runs.

An exporter must see the same answers with or without telemetry-guard in front of the gateway.
Each row below names the rule of GATEWAY.md it checks (or the policy rule, for refusals only the
policy makes), one call, and what the caller must get: the status code, the message (exactly,
where the gateway's own words are due), the acknowledgements, and what reaches the gateway.
Every row runs on every target: the four interceptors (sync and grpc.aio, on the server and on
the exporter's channel) and the real `telemetry-guard serve` process in front of a recording
upstream. The scope rules (SAMS matching) are a table of their own, and the docs' refusal table
is kept equal to these rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

import grpc
import pytest
from grpc_harness import (
    BEARER,
    Call,
    event,
    events_request,
    exercise,
    identifier,
    metadata_request,
    publish_metadata_request,
    record_event_request,
    serve_aio,
    serve_sync,
    users_request,
)
from test_credentials import Endpoint, introspection_endpoint
from test_sidecar_support import (
    FORWARD_TAG,
    ServedUpstream,
    Sidecar,
    module_upstream,  # noqa: F401 (the module's `upstream` fixture)
    unary,
)
from test_sidecar_support import record_events as sidecar_record_events

from telemetry_guard.interceptors import (
    AUDIT_LOGGER_NAME,
    AsyncGuardServerInterceptor,
    GuardServerInterceptor,
    TokenIntrospection,
)
from telemetry_guard.policy import Policy, default_policy, load_policy
from telemetry_guard.policy.scopes import covers, satisfied
from telemetry_guard.policy.surface import surface
from telemetry_guard.render.markdown import surface_markdown
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INTERNAL = grpc.StatusCode.INTERNAL
UNSUPPORTED = "unsupported identifier type"
RPCS = ("RecordEvents", "RecordEvent", "PublishInstanceUserMetadata")

# -- the scope rules ----------------------------------------------------------------------------------

# (granted, required): GATEWAY.md's examples, then the edges of the SAMS SDK's match.
COVERED = [
    ("a::events::write", "a::events::write"),
    ("a::events::write", "a::events.x::write"),
    ("a::events::write", "a::events.x.y::write"),
    ("telemetry_gateway::events::write", "telemetry_gateway::events::write"),
    ("telemetry_gateway::events::publish", "telemetry_gateway::events::publish"),
]
NOT_COVERED = [
    ("a::ev::write", "a::events::write"),  # a prefix, but not at a dot
    ("a::events.x::write", "a::events::write"),  # narrower than required
    ("a::events::read", "a::events::write"),  # another action
    ("b::events::write", "a::events::write"),  # another service
    ("a::events.::write", "a::events.x::write"),
    ("telemetry_gateway::events::write", "telemetry_gateway::events::publish"),  # the seed's name is not write
    ("openid", "a::events::write"),  # not a SAMS scope
    ("a::events::write::more", "a::events::write"),
    ("a::events", "a::events::write"),
    ("", "a::events::write"),
    ("a::events::write", "not-a-scope"),
]


@pytest.mark.parametrize(("granted", "required"), COVERED, ids=[f"{g} covers {r}" for g, r in COVERED])
def test_scope_covered(granted: str, required: str) -> None:
    assert covers(granted, required)


@pytest.mark.parametrize(("granted", "required"), NOT_COVERED, ids=[f"{g} misses {r}" for g, r in NOT_COVERED])
def test_scope_not_covered(granted: str, required: str) -> None:
    assert not covers(granted, required)


def test_any_one_required_scope_suffices() -> None:
    required = ("telemetry_gateway::events::write", "telemetry_gateway::events::publish")
    assert satisfied(["openid", "telemetry_gateway::events::publish"], required)
    assert satisfied(["telemetry_gateway::events::write"], required)
    assert not satisfied(["openid", "telemetry_gateway::events::read"], required)
    assert not satisfied([], required)


# -- policies ---------------------------------------------------------------------------------------

# RecordEvent lists workspace and PublishInstanceUserMetadata leaves out unlicensed instances: the
# gateway's refusal must win over the first, the policy's over a kind the gateway would accept.
GATEWAY_POLICY = """\
version: 1
allowlists: [builtin:sourcegraph]
access:
  RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]
  RecordEvent: [managed_service, workspace]
  PublishInstanceUserMetadata: [licensed_instance]
credentials:
  required_for: [managed_service, workspace]
user_metadata:
  enabled: true
  user_fields: [id]
defaults:
  marketing_tracking: keep
  private_metadata: {mode: keep}
  events: {include: ["*"], exclude: ["internal.*"]}
  invalid_events: drop
  unknown_fields: discard
kinds:
  licensed_instance: {marketing_tracking: drop, private_metadata: {mode: allowlist, non_string: sourcegraph-marker}}
  unlicensed_instance: {marketing_tracking: drop, private_metadata: {mode: allowlist, non_string: sourcegraph-marker}}
acknowledged: [duplicate-entry, sensitive-key]  # builtin:sourcegraph as published
"""

# Narrower than the gateway: refusals only the policy makes.
NARROW_POLICY = """\
version: 1
access:
  RecordEvents: [licensed_instance]
  RecordEvent: []
  PublishInstanceUserMetadata: [licensed_instance]
user_metadata:
  enabled: false
defaults:
  private_metadata: {mode: drop}
"""

POLICY_TEXTS = {"gateway": GATEWAY_POLICY, "narrow": NARROW_POLICY}


@pytest.fixture(scope="module")
def policy_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("policies")
    files = {}
    for name, text in POLICY_TEXTS.items():
        files[name] = folder / f"{name}.yaml"
        files[name].write_text(text)
    return files


@pytest.fixture(scope="module")
def policies(policy_files: dict[str, Path]) -> dict[str, Policy]:
    return {name: load_policy(path) for name, path in policy_files.items()}


# -- the rows ----------------------------------------------------------------------------------------


def invalid_event(event_id: str) -> pb.Event:
    """An event the gateway rejects: its feature does not match ^[a-z][a-zA-Z-.]+$."""
    return event(event_id, feature="Bad_Feature")


def incomplete(kind: str) -> pb.Identifier:
    return identifier(kind, complete=False)


def unary_request(ident: pb.Identifier | None, ev: pb.Event | None) -> pb.RecordEventRequest:
    request = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(request_id="req-u"))
    if ident is not None:
        request.metadata.identifier.CopyFrom(ident)
    if ev is not None:
        request.event.CopyFrom(ev)
    return request


def publish_metadata(ident: pb.Identifier) -> pb.PublishInstanceUserMetadataRequest:
    return pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(request_id="req-p", identifier=ident)
    )


def stream_metadata(ident: pb.Identifier) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(metadata=pb.RecordEventsRequestMetadata(request_id="req-1", identifier=ident))


@dataclass(frozen=True)
class Row:
    """One rule and one call. message: the exact details; says: parts of them (policy refusals).

    situation: the docs table row it stands for ("" for rows about acknowledgements).
    acked: the ids the caller must see acknowledged; sent: the event ids that must reach the
    gateway (None: the call must not reach it at all; ...: not checked, a refusal mid-stream).
    """

    name: str
    rule: str  # from GATEWAY.md, or the policy key
    rpc: str
    requests: Sequence[Any]
    code: grpc.StatusCode
    message: str = ""
    says: Sequence[str] = ()
    token: bool = False
    policy: str = "gateway"
    situation: str = ""
    acked: Sequence[str] = ()
    sent: Sequence[str] | EllipsisType | None = None


NO_IDENTIFIER = "no identifier"
NOT_SERVED = "an identifier kind the gateway does not serve for the RPC"
NO_EVENT = "RecordEvent without an event (judged before the identifier)"
EMPTY_FIELD = "the identifier's required field is empty"
BEFORE_METADATA = "a payload before the metadata"
METADATA_TWICE = "metadata twice"
NO_TOKEN = "no or malformed `authorization: Bearer <token>` where the kind needs credentials"
INVALID_UNARY = "RecordEvent of a managed service whose event is invalid (`invalid_events: drop`)"
POLICY_ACCESS = "a kind the gateway serves, not listed under `access`"
POLICY_USER_METADATA = "user metadata not enabled"
ENDED_EARLY = "a stream that ends before its metadata message"

IDENTIFIER_CHECKS = "RecordEvents: identifier checks"
SKIPPED = "RecordEvents: a request with neither payload set is skipped"
INVALID_ACKS = "Event validation: invalid events are reported as succeeded for instances, as failed for services"

ROWS: list[Row] = [
    # RecordEvents stream
    Row("RecordEvents no identifier", IDENTIFIER_CHECKS, "RecordEvents",
        [metadata_request("none"), events_request(event("n1"))], UNIMPLEMENTED, UNSUPPORTED, situation=NO_IDENTIFIER),
    Row("RecordEvents licensed without license_key", IDENTIFIER_CHECKS, "RecordEvents",
        [stream_metadata(incomplete("licensed_instance"))], INVALID,
        "RecordEvents: identifier.licensed_instance.license_key is required (rule identifier)", situation=EMPTY_FIELD),
    Row("RecordEvents unlicensed without instance_id", IDENTIFIER_CHECKS, "RecordEvents",
        [stream_metadata(incomplete("unlicensed_instance"))], INVALID,
        "RecordEvents: identifier.unlicensed_instance.instance_id is required (rule identifier)",
        situation=EMPTY_FIELD),
    Row("RecordEvents managed service without service_id", IDENTIFIER_CHECKS, "RecordEvents",
        [stream_metadata(incomplete("managed_service"))], INVALID,
        "RecordEvents: identifier.managed_service.service_id is required (rule identifier)", token=True,
        situation=EMPTY_FIELD),
    Row("RecordEvents managed service without a token", IDENTIFIER_CHECKS + ": a valid bearer token", "RecordEvents",
        [metadata_request("managed_service"), events_request(event("t1"))], UNAUTHENTICATED,
        "RecordEvents: identifier kind managed_service must present 'authorization: Bearer <token>' "
        "(rule credentials.required_for)", situation=NO_TOKEN),
    Row("RecordEvents events before metadata", "Events before metadata: INVALID_ARGUMENT", "RecordEvents",
        [events_request(event("p1")), metadata_request("licensed_instance")], INVALID,
        "RecordEvents: got events when metadata not yet received (rule protocol)", situation=BEFORE_METADATA),
    Row("RecordEvents metadata twice", "Metadata sent twice: INVALID_ARGUMENT", "RecordEvents",
        [metadata_request("licensed_instance"), events_request(event("m1")), metadata_request("licensed_instance")],
        INVALID, "RecordEvents: received metadata more than once (rule protocol)", situation=METADATA_TWICE,
        sent=...),
    Row("RecordEvents ends before metadata", "protocol", "RecordEvents", [pb.RecordEventsRequest()], INVALID,
        "RecordEvents: stream ended before its metadata message (rule protocol)", situation=ENDED_EARLY),
    Row("RecordEvents empty message skipped", SKIPPED, "RecordEvents",
        [pb.RecordEventsRequest(), metadata_request("unlicensed_instance"), pb.RecordEventsRequest(),
         events_request(event("s1"))], OK, acked=["s1"], sent=["s1"]),
    Row("RecordEvents kind not in access", "access.RecordEvents", "RecordEvents",
        [metadata_request("managed_service"), events_request(event("x1"))], DENIED,
        says=("RecordEvents", "access.RecordEvents"), token=True, policy="narrow", situation=POLICY_ACCESS),
    # acknowledgements of invalid events (invalid_events: drop)
    Row("RecordEvents licensed invalid acknowledged", INVALID_ACKS, "RecordEvents",
        [metadata_request("licensed_instance"), events_request(event("v1"), invalid_event("i1"))], OK,
        acked=["v1", "i1"], sent=["v1"]),
    Row("RecordEvents unlicensed invalid acknowledged", INVALID_ACKS, "RecordEvents",
        [metadata_request("unlicensed_instance"), events_request(invalid_event("i2"), event("v2"))], OK,
        acked=["v2", "i2"], sent=["v2"]),
    Row("RecordEvents managed service invalid not acknowledged", INVALID_ACKS, "RecordEvents",
        [metadata_request("managed_service"), events_request(event("v3"), invalid_event("i3"))], OK,
        token=True, acked=["v3"], sent=["v3"]),
    Row("RecordEvents workspace invalid not acknowledged", INVALID_ACKS + " (a workspace publishes as a service)",
        "RecordEvents", [metadata_request("workspace"), events_request(invalid_event("i4"), event("v4"))], OK,
        token=True, acked=["v4"], sent=["v4"]),
    Row("RecordEvents managed service filtered acknowledged", "defaults.events (a policy removal is never retried)",
        "RecordEvents",
        [metadata_request("managed_service"), events_request(event("v5"), event("f5", feature="internal.debug"))],
        OK, token=True, acked=["v5", "f5"], sent=["v5"]),
    # RecordEvent
    Row("RecordEvent no event", "RecordEvent: missing event: INVALID_ARGUMENT", "RecordEvent",
        [unary_request(identifier("managed_service"), None)], INVALID, "event is required", token=True,
        situation=NO_EVENT),
    Row("RecordEvent no event from an instance", "RecordEvent: missing event, checked before the identifier",
        "RecordEvent", [unary_request(identifier("licensed_instance"), None)], INVALID, "event is required",
        situation=NO_EVENT),
    Row("RecordEvent no event and no identifier", "RecordEvent: missing event, checked before the identifier",
        "RecordEvent", [unary_request(None, None)], INVALID, "event is required", situation=NO_EVENT),
    Row("RecordEvent no identifier", "RecordEvent: any other identifier: UNIMPLEMENTED", "RecordEvent",
        [unary_request(None, event("u1"))], UNIMPLEMENTED, UNSUPPORTED, situation=NO_IDENTIFIER),
    *(
        Row(f"RecordEvent {kind}", "RecordEvent: accepted only for managed_service identifiers", "RecordEvent",
            [record_event_request(kind, event("u2"))], UNIMPLEMENTED, UNSUPPORTED, token=kind == "workspace",
            situation=NOT_SERVED)
        for kind in ("licensed_instance", "unlicensed_instance", "workspace")
    ),
    Row("RecordEvent managed service without service_id", IDENTIFIER_CHECKS, "RecordEvent",
        [unary_request(incomplete("managed_service"), event("u3"))], INVALID,
        "RecordEvent: identifier.managed_service.service_id is required (rule identifier)", token=True,
        situation=EMPTY_FIELD),
    Row("RecordEvent managed service without a token", "Credentials: no authorization header: UNAUTHENTICATED",
        "RecordEvent", [record_event_request("managed_service", event("u4"))], UNAUTHENTICATED,
        "RecordEvent: identifier kind managed_service must present 'authorization: Bearer <token>' "
        "(rule credentials.required_for)", situation=NO_TOKEN),
    Row("RecordEvent managed service", "RecordEvent: accepted for managed_service identifiers", "RecordEvent",
        [record_event_request("managed_service", event("u5"))], OK, token=True, sent=["u5"]),
    Row("RecordEvent managed service invalid event", INVALID_ACKS + "; RecordEvent: a publish failure: INTERNAL",
        "RecordEvent", [record_event_request("managed_service", invalid_event("u6"))], INTERNAL,
        r"RecordEvent: the event is invalid (feature does not match ^[a-z][a-zA-Z\-.]+$) and was not published "
        "(rule defaults.invalid_events)", token=True, situation=INVALID_UNARY),
    Row("RecordEvent kind not in access", "access.RecordEvent", "RecordEvent",
        [record_event_request("managed_service", event("u7"))], DENIED, says=("RecordEvent", "access.RecordEvent"),
        token=True, policy="narrow", situation=POLICY_ACCESS),
    Row("RecordEvent instance under a policy that also refuses it", "the gateway's refusal comes first",
        "RecordEvent", [record_event_request("licensed_instance", event("u8"))], UNIMPLEMENTED, UNSUPPORTED,
        policy="narrow", situation=NOT_SERVED),
    # PublishInstanceUserMetadata
    Row("Publish no identifier", IDENTIFIER_CHECKS, "PublishInstanceUserMetadata",
        [publish_metadata_request("none"), users_request()], UNIMPLEMENTED, UNSUPPORTED, situation=NO_IDENTIFIER),
    *(
        Row(f"Publish {kind}", "a kind the gateway does not serve: UNIMPLEMENTED (instances' RPC)",
            "PublishInstanceUserMetadata", [publish_metadata_request(kind), users_request()], UNIMPLEMENTED,
            UNSUPPORTED, token=True, situation=NOT_SERVED)
        for kind in ("managed_service", "workspace")
    ),
    Row("Publish unlicensed without instance_id", IDENTIFIER_CHECKS, "PublishInstanceUserMetadata",
        [publish_metadata(incomplete("unlicensed_instance")), users_request()], INVALID,
        "PublishInstanceUserMetadata: identifier.unlicensed_instance.instance_id is required (rule identifier)",
        situation=EMPTY_FIELD),
    Row("Publish users before metadata", "Events before metadata: INVALID_ARGUMENT", "PublishInstanceUserMetadata",
        [users_request(), publish_metadata_request("licensed_instance")], INVALID,
        "PublishInstanceUserMetadata: got user_metadata when metadata not yet received (rule protocol)",
        situation=BEFORE_METADATA),
    Row("Publish metadata twice", "Metadata sent twice: INVALID_ARGUMENT", "PublishInstanceUserMetadata",
        [publish_metadata_request("licensed_instance"), publish_metadata_request("licensed_instance")], INVALID,
        "PublishInstanceUserMetadata: received metadata more than once (rule protocol)", situation=METADATA_TWICE,
        sent=...),
    Row("Publish ends before metadata", "protocol", "PublishInstanceUserMetadata", [], INVALID,
        "PublishInstanceUserMetadata: stream ended before its metadata message (rule protocol)",
        situation=ENDED_EARLY),
    Row("Publish kind not in access", "access.PublishInstanceUserMetadata", "PublishInstanceUserMetadata",
        [publish_metadata_request("unlicensed_instance"), users_request()], DENIED,
        says=("PublishInstanceUserMetadata", "access.PublishInstanceUserMetadata"), situation=POLICY_ACCESS),
    Row("Publish not enabled", "user_metadata.enabled", "PublishInstanceUserMetadata",
        [publish_metadata_request("licensed_instance"), users_request()], DENIED,
        says=("PublishInstanceUserMetadata", "user_metadata.enabled"), policy="narrow",
        situation=POLICY_USER_METADATA),
    Row("Publish licensed", "the instances' RPC", "PublishInstanceUserMetadata",
        [publish_metadata_request("licensed_instance"), users_request()], OK, sent=[]),
]  # fmt: skip


# -- running a row -------------------------------------------------------------------------------------


@dataclass
class Seen:
    code: grpc.StatusCode
    details: str
    acked: list[str]
    reached: bool  # the gateway behind got the call
    sent: list[str]  # the event ids it got


def _event_ids(messages: Sequence[Any]) -> list[str]:
    ids: list[str] = []
    for message in messages:
        if isinstance(message, pb.RecordEventsRequest):
            ids += [e.id for e in message.events.events]
        elif isinstance(message, pb.RecordEventRequest) and message.HasField("event"):
            ids.append(message.event.id)
    return ids


def _acked(responses: Sequence[Any]) -> list[str]:
    return [i for r in responses if isinstance(r, pb.RecordEventsResponse) for i in r.succeeded_events]


INTERCEPTORS = [("sync", "server"), ("aio", "server"), ("sync", "client"), ("aio", "client")]
TARGETS = [f"{stack}-{side}" for stack, side in INTERCEPTORS] + ["sidecar"]


def via_interceptors(target: str, row: Row, policy: Policy, verifier: Any = None, token: str = "tok-good") -> Seen:
    stack, side = target.split("-")
    metadata = (("authorization", f"Bearer {token}"),) if row.token else ()
    (result,), recorder = exercise(
        stack, side, [Call(row.rpc, row.requests, metadata)], policy=policy, verifier=verifier, fail_ids=()
    )
    own = [c for c in recorder.calls if c.rpc == row.rpc]
    return Seen(
        result.code, result.details, _acked(result.responses), bool(own), _event_ids(own[0].messages) if own else []
    )


def via_sidecar(sidecar: Sidecar, upstream: ServedUpstream, row: Row, tag: str, token: str = "tok-good") -> Seen:
    upstream.servicer.reset(tag=tag)
    stub = sidecar.stub()
    metadata = (("authorization", f"Bearer {token}"),) if row.token else ()
    if row.rpc == "RecordEvents":
        out = sidecar_record_events(stub, row.requests, metadata=metadata)
    elif row.rpc == "RecordEvent":
        out = unary(stub.RecordEvent, row.requests[0], metadata)
    else:
        out = unary(lambda request, **kw: stub.PublishInstanceUserMetadata(iter(request), **kw), row.requests, metadata)
    own = upstream.servicer.received(row.rpc)
    return Seen(out.code, out.details, _acked(out.responses), bool(own), _event_ids(own[0].messages) if own else [])


def check(row: Row, seen: Seen) -> None:
    assert (seen.code, row.name) == (row.code, row.name), seen.details
    if row.message:
        assert seen.details == row.message
    for part in row.says:
        assert part in seen.details
    if row.sent is ...:  # refused mid-stream: what was passed on before stays passed on
        return
    assert sorted(seen.acked) == sorted(row.acked)
    if row.sent is None:
        assert not seen.reached, "a refused call reached the gateway"
    else:
        assert seen.reached and seen.sent == list(row.sent)


@pytest.fixture(scope="module")
def sidecars(
    upstream: ServedUpstream, policy_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Sidecar]]:
    """One sidecar process per policy, started when first asked for."""

    class Lazy(dict[str, Sidecar]):
        def __missing__(self, name: str) -> Sidecar:
            args = ["--upstream", upstream.target, "--policy", str(policy_files[name]), "--reload-interval", "0"]
            self[name] = Sidecar([*args, *FORWARD_TAG], tmp_path_factory.mktemp(f"sidecar-{name}"))
            return self[name]

    processes = Lazy()
    yield processes
    for process in processes.values():
        process.kill()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_gateway_rule(
    row: Row,
    target: str,
    policies: dict[str, Policy],
    sidecars: dict[str, Sidecar],
    upstream: ServedUpstream,
    request: pytest.FixtureRequest,
) -> None:
    if target == "sidecar":
        seen = via_sidecar(sidecars[row.policy], upstream, row, request.node.name)
    else:
        seen = via_interceptors(target, row, policies[row.policy])
    check(row, seen)


OVERRIDDEN_POLICY = """\
version: 1
access:
  RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]
  RecordEvent: [managed_service]
defaults:
  private_metadata: {mode: drop}
  invalid_events: forward
overrides:
  checked-service:
    match: {kind: managed_service, service_id: svc-1}
    invalid_events: drop
  checked-instance:
    match: {kind: unlicensed_instance, instance_id: inst-unlicensed}
    invalid_events: drop
"""


@pytest.mark.parametrize("target", TARGETS[:4])
def test_invalid_events_dropped_by_an_override_are_acknowledged_as_the_gateway_would(
    target: str, tmp_path: Path
) -> None:
    """The override's rules decide what is removed; the kind decides how the gateway reports it."""
    path = tmp_path / "overridden.yaml"
    path.write_text(OVERRIDDEN_POLICY)
    policy = load_policy(path)
    service = Row("service", INVALID_ACKS, "RecordEvents",
                  [metadata_request("managed_service"), events_request(event("v6"), invalid_event("i6"))], OK,
                  token=True, acked=["v6"], sent=["v6"])  # fmt: skip
    instance = Row("instance", INVALID_ACKS, "RecordEvents",
                   [metadata_request("unlicensed_instance"), events_request(event("v7"), invalid_event("i7"))], OK,
                   acked=["v7", "i7"], sent=["v7"])  # fmt: skip
    unary = Row("unary", INVALID_ACKS, "RecordEvent", [record_event_request("managed_service", invalid_event("u9"))],
                INTERNAL, says=("overrides.checked-service.invalid_events",), token=True)  # fmt: skip
    for row in (service, instance, unary):
        check(row, via_interceptors(target, row, policy))


# -- credentials as SAMS checks them: token introspection -----------------------------------------------

WRITE = "telemetry_gateway::events::write"
TOKENS = {
    "tok-good": {"active": True, "scope": f"openid profile {WRITE}"},
    "tok-inactive": {"active": False, "scope": WRITE},
    "tok-noscope": {"active": True, "scope": "openid telemetry_gateway::events::read telemetry_gateway::ev::write"},
    "tok-publish": {"active": True, "scope": "telemetry_gateway::events::publish"},  # the seed's name only
}

CREDENTIAL_CALLS: dict[str, list[Any]] = {
    "RecordEvents": [metadata_request("managed_service"), events_request(event("c1"))],
    "RecordEvent": [record_event_request("managed_service", event("c1"))],
}
CREDENTIAL_ROWS = [
    ("tok-good", OK, ""),
    ("tok-inactive", DENIED, "permission denied"),
    ("tok-noscope", DENIED, "permission denied"),
    ("tok-publish", DENIED, "permission denied"),
    ("tok-500", INTERNAL, "unable to validate token"),
]
CANCELLED = "token introspection failed, the call cancelled meanwhile"
CREDENTIAL_SITUATIONS = {
    "tok-inactive": "token inactive or expired",
    "tok-noscope": "no granted scope covers a required one",
    "tok-publish": "no granted scope covers a required one",
    "tok-500": "token introspection failed",
}


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    with introspection_endpoint() as found:
        found.answers.update(TOKENS)
        yield found


@pytest.fixture(scope="module")
def introspected_sidecar(
    upstream: ServedUpstream, endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    """The real sidecar with the default policy, verifying tokens at the local RFC 7662 endpoint."""
    args = ["--upstream", upstream.target, "--introspection-url", endpoint.url, "--reload-interval", "0"]
    process = Sidecar([*args, *FORWARD_TAG], tmp_path_factory.mktemp("sidecar-introspection"))
    yield process
    process.kill()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("rpc", tuple(CREDENTIAL_CALLS))
@pytest.mark.parametrize(("token", "code", "message"), CREDENTIAL_ROWS, ids=[r[0] for r in CREDENTIAL_ROWS])
def test_token_introspection_answers_as_the_gateway(
    token: str,
    code: grpc.StatusCode,
    message: str,
    rpc: str,
    target: str,
    endpoint: Endpoint,
    introspected_sidecar: Sidecar,
    upstream: ServedUpstream,
    request: pytest.FixtureRequest,
) -> None:
    sent = ["c1"] if code == OK else None
    acked = ["c1"] if code == OK and rpc == "RecordEvents" else []
    row = Row(f"{rpc} {token}", "Credentials", rpc, CREDENTIAL_CALLS[rpc], code, message, token=True, acked=acked,
              sent=sent)  # fmt: skip
    if target == "sidecar":
        seen = via_sidecar(introspected_sidecar, upstream, row, request.node.name, token=token)
    else:
        seen = via_interceptors(target, row, default_policy(), TokenIntrospection(endpoint.url), token=token)
    check(row, seen)


def test_sidecar_with_introspection_forwards_managed_service_events(
    introspected_sidecar: Sidecar, upstream: ServedUpstream, endpoint: Endpoint
) -> None:
    """Done when: a token granted telemetry_gateway::events::write by the endpoint lets a service's events through."""
    upstream.servicer.reset(tag="introspected-service")
    requests = [metadata_request("managed_service"), events_request(event("g1"), event("g2"))]
    out = sidecar_record_events(introspected_sidecar.stub(), requests, metadata=BEARER)
    assert (out.code, out.acked) == (OK, {"g1", "g2"})
    (call,) = upstream.servicer.received("RecordEvents")
    assert [e.id for e in call.events()] == ["g1", "g2"]
    assert call.metadata["authorization"] == "Bearer tok-good"  # the gateway verifies it again
    assert "tok-good" in endpoint.tokens()
    refused = [r["refused"] for r in introspected_sidecar.logs() if "refused" in r]
    reasons = {r["reason"] for r in refused if r["message"] == "permission denied"}
    assert all("tok-" not in reason for reason in reasons)  # the reason never holds the token


def test_the_reason_of_an_opaque_refusal_goes_to_the_audit_log(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    calls = [Call("RecordEvent", CREDENTIAL_CALLS["RecordEvent"], (("authorization", f"Bearer {t}"),)) for t in TOKENS]
    results, _ = exercise("sync", "server", calls, policy=default_policy(), verifier=TokenIntrospection(endpoint.url))
    assert [r.details for r in results] == ["", "permission denied", "permission denied", "permission denied"]
    refused = [json.loads(r.getMessage())["refused"] for r in caplog.records if "refused" in r.getMessage()]
    assert [(r["rule"], r["reason"]) for r in refused] == [
        ("credentials.introspection", "RecordEvent: bearer token is not active (rule credentials.introspection)"),
        ("credentials.scope", f"RecordEvent: bearer token has no scope covering {WRITE} (rule credentials.scope)"),
        ("credentials.scope", f"RecordEvent: bearer token has no scope covering {WRITE} (rule credentials.scope)"),
    ]


def test_a_list_of_scopes_accepts_a_token_covering_any_one(endpoint: Endpoint, tmp_path: Path) -> None:
    path = tmp_path / "two-scopes.yaml"
    path.write_text(f"version: 1\naccess: {{RecordEvent: [managed_service]}}\n"
                    f"credentials: {{scope: [{WRITE}, telemetry_gateway::events::publish]}}\n")  # fmt: skip
    calls = [Call("RecordEvent", CREDENTIAL_CALLS["RecordEvent"], (("authorization", f"Bearer {t}"),)) for t in TOKENS]
    results, recorder = exercise(
        "sync", "server", calls, policy=load_policy(path), verifier=TokenIntrospection(endpoint.url)
    )
    assert [r.code for r in results] == [OK, DENIED, DENIED, OK]
    assert len(recorder.calls) == 2


CANCELLED_CALLS: dict[str, list[Any]] = {
    "RecordEvents": [metadata_request("managed_service"), events_request(event("k1"))],
    "RecordEvent": [record_event_request("managed_service", event("k1"))],
}


@pytest.mark.parametrize("rpc", tuple(CANCELLED_CALLS))
@pytest.mark.parametrize("stack", ["sync", "aio"])
def test_a_call_cancelled_while_its_token_is_validated_is_audited_cancelled(
    stack: str, rpc: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gives up (deadline) while introspection is under way; the introspection then fails:
    the refusal is CANCELLED, as the gateway answers it, not INTERNAL."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    with introspection_endpoint() as slow:  # answers tok-slow after 0.5 s: past the verifier's 0.3 s timeout
        verifier = TokenIntrospection(slow.url, timeout=0.3)
        if stack == "sync":
            with serve_sync([GuardServerInterceptor(default_policy(), verifier=verifier)]) as served:
                code = _give_up(served.target, rpc)
                refusals = _refusals(caplog)
        else:

            async def run() -> tuple[grpc.StatusCode, list[dict[str, Any]]]:
                async with serve_aio([AsyncGuardServerInterceptor(default_policy(), verifier=verifier)]) as served:
                    code = await asyncio.to_thread(_give_up, served.target, rpc)
                    return code, await asyncio.to_thread(_refusals, caplog)

            code, refusals = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [(r["code"], r["message"], r["rule"]) for r in refusals] == [
        ("CANCELLED", "unable to validate token", "credentials.introspection")
    ]


def _give_up(target: str, rpc: str) -> grpc.StatusCode:
    """The call with a 0.1 s deadline and the slow token; its status code."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
        metadata = (("authorization", "Bearer tok-slow"),)
        try:
            if rpc == "RecordEvent":
                stub.RecordEvent(CANCELLED_CALLS[rpc][0], timeout=0.1, metadata=metadata)
            else:
                list(stub.RecordEvents(iter(CANCELLED_CALLS[rpc]), timeout=0.1, metadata=metadata))
        except grpc.RpcError as exc:
            return exc.code()
    return OK


def _refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The refusals in the audit log, once the server has finished judging (bounded wait)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [json.loads(r.getMessage())["refused"] for r in caplog.records if '"refused"' in r.getMessage()]
        if found:
            return found
        time.sleep(0.02)
    return []


# -- the audit report says what the verifier verifies --------------------------------------------------


def test_audit_with_bearer_present_claims_no_scope_verification() -> None:
    report = surface_markdown(surface(default_policy()))
    assert "whether it is active and which scopes it carries is not verified here" in report
    assert "must be active and carry a scope" not in report


def test_audit_with_introspection_names_the_scopes_verified() -> None:
    report = surface_markdown(surface(default_policy(), "introspection"))
    assert f"must be active and carry a scope covering `{WRITE}`" in report
    assert "not verified here" not in report


# -- the docs table is this table ------------------------------------------------------------------------


def _docs_table(marker: str) -> list[list[str]]:
    text = (ROOT / "docs" / "interceptors.md").read_text()
    block = text.split(f"<!-- {marker} -->")[1].split(f"<!-- /{marker} -->")[0]
    lines = [line.strip() for line in block.strip().splitlines()][2:]  # after the header and the rule
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _rpcs(cell: str) -> set[str]:
    return set(RPCS) if cell == "all three" else {name.strip() for name in cell.split(",")}


def _pattern(cell: str) -> re.Pattern[str]:
    """A message column (`...` with <placeholders>) as a regular expression over the details."""
    template = cell.strip("`")
    parts = re.split(r"<[^>]+>|\.\.\.", template)
    return re.compile(".+?".join(re.escape(part) for part in parts))


def _situations() -> dict[str, list[tuple[str, grpc.StatusCode, str]]]:
    """situation -> (rpc, code, a message as the caller saw it) for every row of both tables above."""
    found: dict[str, list[tuple[str, grpc.StatusCode, str]]] = {}
    for row in ROWS:
        if row.situation:
            found.setdefault(row.situation, []).append((row.rpc, row.code, row.message))
    for token, code, message in CREDENTIAL_ROWS:
        if token in CREDENTIAL_SITUATIONS:
            for rpc in CREDENTIAL_CALLS:
                found.setdefault(CREDENTIAL_SITUATIONS[token], []).append((rpc, code, message))
    for rpc in CANCELLED_CALLS:  # test_a_call_cancelled_while_its_token_is_validated_is_audited_cancelled
        found.setdefault(CANCELLED, []).append((rpc, grpc.StatusCode.CANCELLED, "unable to validate token"))
    return found


@pytest.mark.parametrize("marker", ["gateway-refusals", "policy-refusals"])
def test_the_docs_refusal_tables_are_the_rows_tested_here(marker: str) -> None:
    situations = _situations()
    table = _docs_table(marker)
    assert table, marker
    tested = 0
    for situation, rpcs, status, message, _rule in table:
        rows = situations.get(situation.replace("\\|", "|"), [])
        if marker == "gateway-refusals" or rows:  # every gateway refusal is tested here; policy ones where they apply
            assert rows, f"no test row for {situation!r}"
            assert {rpc for rpc, _, _ in rows} == _rpcs(rpcs), situation
            assert {code.name for _, code, _ in rows} == {status}, situation
            pattern = _pattern(message)
            assert all(pattern.fullmatch(text) for _, _, text in rows if text), (situation, message)
            tested += 1
    documented = {row[0] for row in _docs_table("gateway-refusals")} | {
        row[0] for row in _docs_table("policy-refusals")
    }
    assert set(situations) <= documented
    assert tested >= (12 if marker == "gateway-refusals" else 3)
