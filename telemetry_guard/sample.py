"""A small mixed workload that shows every rule of the default policy at work.

Every identifier kind; allowlisted and other event types; marketing fields; a
non-string private value; an invalid event; unknown fields (field numbers from a
"newer" proto); user metadata; and RPCs the default policy refuses. Used by
`telemetry-guard demo`.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# Field 99 (length-delimited, "from a newer exporter"): no rule knows it, so it must not leave.
UNKNOWN_FIELD = b"\x9a\x06\x0dnew-field-val"


@dataclass(frozen=True)
class Call:
    """One RPC of the workload: its name, identifier, authorization and request messages."""

    title: str
    rpc: str
    identifier: pb.Identifier
    messages: tuple[Message, ...]
    authorization: str | None = None


def _event(feature: str, action: str, n: int, **private: str | float) -> pb.Event:
    event = pb.Event(id=f"00000000-0000-4000-8000-{n:012d}", feature=feature, action=action)
    event.timestamp.FromSeconds(1_767_225_600 + n)
    event.source.server.version = "6.4.2871"
    event.source.client.name = "VSCODE_CODY_EXTENSION"
    event.source.client.version = "1.48.0"
    event.parameters.version = 1
    event.parameters.metadata["durationMs"] = 120.0 + n
    if private:
        event.parameters.private_metadata.update(private)
    event.user.user_id = 42
    event.interaction.trace_id = f"{n:032x}"
    return event


def _with_marketing(event: pb.Event) -> pb.Event:
    mt = event.marketing_tracking
    mt.url = "https://sourcegraph.example.com/search?q=secret-project"
    mt.referrer = "https://news.example.com/"
    mt.utm_campaign = "spring-launch"
    return event


def _with_unknown(event: pb.Event) -> pb.Event:
    event.MergeFromString(UNKNOWN_FIELD)
    return event


def _payload(*events: pb.Event) -> pb.RecordEventsRequest:
    request = pb.RecordEventsRequest()
    request.events.events.extend(events)
    return request


def _metadata(identifier: pb.Identifier, request_id: str) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(metadata=pb.RecordEventsRequestMetadata(request_id=request_id, identifier=identifier))


LICENSED = pb.Identifier(
    licensed_instance=pb.Identifier.LicensedInstanceIdentifier(
        license_key="demo-license-key", instance_id="instance-1", external_url="https://sourcegraph.acme.example"
    )
)
UNLICENSED = pb.Identifier(
    unlicensed_instance=pb.Identifier.UnlicensedInstanceIdentifier(
        instance_id="instance-2", external_url="https://sg.internal.example"
    )
)
MANAGED = pb.Identifier(
    managed_service=pb.Identifier.ManagedServiceIdentifier(service_id="cody-gateway", service_environment="prod")
)
WORKSPACE = pb.Identifier(
    workspace=pb.Identifier.WorkspaceIdentifier(workspace_id="ws_0001", external_url="https://acme.sourcegraph.app")
)


def calls() -> list[Call]:
    """The workload, in the order the demo plays it."""
    licensed_events = _payload(
        _with_marketing(_event("cody.completion", "suggested", 1, languageId="go", triggerKind="automatic")),
        _event("cody.chatResponse", "submitted", 2, chatModel="claude-sonnet", promptText="fix the bug in auth.go"),
        _event("cody.hoverCommands", "visible", 3, languageId=7),
        _with_unknown(_event("search.results", "viewed", 4, query="repo:acme/payroll salary")),
        _event("cody.completion", "Accepted!", 5),
    )
    unlicensed_events = _payload(
        _with_marketing(_event("blob.codeintel", "hover", 6, languageId="rust", repositoryName="acme/secret")),
    )
    managed_events = _payload(_with_unknown(_with_marketing(_event("cody.gateway", "request", 7, model="opus"))))
    workspace_events = _payload(_event("cody.chatResponse", "submitted", 8, chatModel="gpt", promptText="hi"))
    record_event = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="demo-unary", identifier=MANAGED),
        event=_with_marketing(_event("cody.gateway", "completion", 9)),
    )
    refused_unary = pb.RecordEventRequest(
        metadata=pb.RecordEventsRequestMetadata(request_id="demo-refused", identifier=LICENSED),
        event=_event("cody.completion", "suggested", 10),
    )
    users = pb.PublishInstanceUserMetadataRequest()
    users.user_metadata.users.add(id=1, username="alice", primary_email="alice@acme.example")
    user_meta = pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(request_id="demo-users", identifier=LICENSED)
    )
    bearer = "Bearer demo-token"
    return [
        Call(
            "licensed instance, RecordEvents",
            "RecordEvents",
            LICENSED,
            (_metadata(LICENSED, "demo-licensed"), licensed_events),
        ),
        Call(
            "unlicensed instance, RecordEvents",
            "RecordEvents",
            UNLICENSED,
            (_metadata(UNLICENSED, "demo-unlicensed"), unlicensed_events),
        ),
        Call(
            "managed service, RecordEvents (with credentials)",
            "RecordEvents",
            MANAGED,
            (_metadata(MANAGED, "demo-managed"), managed_events),
            authorization=bearer,
        ),
        Call(
            "workspace, RecordEvents without credentials",
            "RecordEvents",
            WORKSPACE,
            (_metadata(WORKSPACE, "demo-workspace"), workspace_events),
        ),
        Call("managed service, RecordEvent", "RecordEvent", MANAGED, (record_event,), authorization=bearer),
        Call("licensed instance, RecordEvent", "RecordEvent", LICENSED, (refused_unary,)),
        Call(
            "licensed instance, PublishInstanceUserMetadata",
            "PublishInstanceUserMetadata",
            LICENSED,
            (user_meta, users),
        ),
    ]
