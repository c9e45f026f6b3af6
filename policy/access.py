"""Who may call what: identifier checks, RPC access by kind, credentials presence.

Two sources of refusal, kept apart: what Sourcegraph's gateway itself refuses (its code and
message, which exporters already handle), and what only the policy refuses (PERMISSION_DENIED
naming the policy rule). Verifying a token (introspection) is the interceptors' job; the policy
only says which kinds must present one, so the engine checks that it is there and well formed.
"""

from __future__ import annotations

import grpc

from telemetry_guard.policy.decision import Denial
from telemetry_guard.policy.kinds import GATEWAY_KINDS
from telemetry_guard.policy.model import Policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# The gateway's own messages (GATEWAY.md): exporters are written against them.
UNSUPPORTED_IDENTIFIER = "unsupported identifier type"
EVENT_REQUIRED = "event is required"
RULE_IDENTIFIER = "identifier"
RULE_EVENT = "event"
RULE_PROTOCOL = "protocol"  # the stream protocol: metadata first and only once
RULE_NESTING = "nesting"  # nested deeper than the parser takes a RecordEvents payload's event

# The field that must be non-empty for each identifier kind (the gateway's checks).
REQUIRED_ID_FIELD = {
    "licensed_instance": "license_key",
    "unlicensed_instance": "instance_id",
    "managed_service": "service_id",
    "workspace": "workspace_id",
}


def identifier_kind(identifier: pb.Identifier | None) -> str | None:
    return None if identifier is None else identifier.WhichOneof("identifier")


def check_identifier(rpc: str, identifier: pb.Identifier | None) -> str | Denial:
    """The identifier's kind, or the gateway's own refusal (GATEWAY.md), which exporters handle.

    No identifier, or a kind the gateway does not serve for the RPC: UNIMPLEMENTED "unsupported
    identifier type"; a served kind without its required field: INVALID_ARGUMENT. Both come before
    the policy is asked, as the gateway would answer them with or without telemetry-guard.
    """
    kind = identifier_kind(identifier)
    if kind is None or identifier is None or kind not in GATEWAY_KINDS[rpc]:
        served = ", ".join(sorted(GATEWAY_KINDS[rpc]))
        return Denial(
            grpc.StatusCode.UNIMPLEMENTED,
            RULE_IDENTIFIER,
            UNSUPPORTED_IDENTIFIER,
            f"{rpc}: identifier kind {kind or 'none'} is not served by the gateway (it serves {served})",
        )
    required = REQUIRED_ID_FIELD[kind]
    if not getattr(getattr(identifier, kind), required):
        return Denial(
            grpc.StatusCode.INVALID_ARGUMENT,
            RULE_IDENTIFIER,
            f"{rpc}: identifier.{kind}.{required} is required (rule {RULE_IDENTIFIER})",
        )
    return kind


def check_event(request: pb.RecordEventRequest) -> Denial | None:
    """RecordEvent without an event: the gateway's INVALID_ARGUMENT, judged before the identifier."""
    if request.HasField("event"):
        return None
    return Denial(grpc.StatusCode.INVALID_ARGUMENT, RULE_EVENT, EVENT_REQUIRED, f"RecordEvent: {EVENT_REQUIRED}")


def nested_too_deep(rpc: str) -> Denial:
    """An event that parses in its own request but not one level deeper, as a RecordEvents payload's
    event: refused as that payload would be (undecodable), not judged by another path."""
    return Denial(
        grpc.StatusCode.INVALID_ARGUMENT,
        RULE_NESTING,
        f"{rpc}: the event is nested deeper than a RecordEvents payload may be (rule {RULE_NESTING})",
    )


def before_metadata(rpc: str, payload: str) -> Denial:
    """A payload with no metadata message before it: the gateway's INVALID_ARGUMENT (the stream protocol)."""
    return Denial(
        grpc.StatusCode.INVALID_ARGUMENT,
        RULE_PROTOCOL,
        f"{rpc}: got {payload} when metadata not yet received (rule {RULE_PROTOCOL})",
    )


def placeholder_identifier(kind: str, value: str) -> pb.Identifier:
    """A complete identifier of a kind (its required field set to value): for dry runs and `apply`."""
    identifier = pb.Identifier()
    setattr(getattr(identifier, kind), REQUIRED_ID_FIELD[kind], value)
    return identifier


def check_kind(policy: Policy, rpc: str, kind: str) -> Denial | None:
    """May this kind call this RPC under the policy?"""
    if kind not in policy.access[rpc]:
        allowed = ", ".join(sorted(policy.access[rpc])) or "no kind"
        return Denial(
            grpc.StatusCode.PERMISSION_DENIED,
            f"access.{rpc}",
            f"{rpc}: identifier kind {kind} is not allowed by rule access.{rpc} (allowed: {allowed})",
        )
    if rpc == "PublishInstanceUserMetadata" and not policy.user_metadata.enabled:
        return Denial(
            grpc.StatusCode.PERMISSION_DENIED,
            "user_metadata.enabled",
            f"{rpc}: user metadata export is not enabled by rule user_metadata.enabled",
        )
    return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an 'authorization: Bearer <token>' value, or None (scheme is case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


def check_credentials(policy: Policy, rpc: str, kind: str, authorization: str | None) -> Denial | None:
    """UNAUTHENTICATED when the kind must present a bearer token and did not."""
    if kind in policy.credentials_required and bearer_token(authorization) is None:
        return Denial(
            grpc.StatusCode.UNAUTHENTICATED,
            "credentials.required_for",
            f"{rpc}: identifier kind {kind} must present 'authorization: Bearer <token>' "
            f"(rule credentials.required_for)",
        )
    return None


def check_access(policy: Policy, rpc: str, identifier: pb.Identifier | None, authorization: str | None) -> str | Denial:
    """All checks that come before any message content: identifier, kind access, credentials."""
    kind = check_identifier(rpc, identifier)
    if isinstance(kind, Denial):
        return kind
    return check_kind(policy, rpc, kind) or check_credentials(policy, rpc, kind, authorization) or kind
