"""Who may call what: identifier checks, RPC access by kind, credentials presence.

Verifying a token (introspection) is the interceptors' job; the policy only says
which kinds must present one, so the engine checks that it is there and well formed.
"""

from __future__ import annotations

import grpc

from telemetry_guard.policy.decision import Denial
from telemetry_guard.policy.model import Policy
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

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
    """The identifier's kind, or a denial when it is missing or incomplete."""
    kind = identifier_kind(identifier)
    if kind is None or identifier is None:
        return Denial(
            grpc.StatusCode.INVALID_ARGUMENT,
            "identifier",
            f"{rpc}: no identifier in the request metadata (or a kind this proto does not know)",
        )
    required = REQUIRED_ID_FIELD[kind]
    if not getattr(getattr(identifier, kind), required):
        return Denial(
            grpc.StatusCode.INVALID_ARGUMENT,
            "identifier",
            f"{rpc}: identifier.{kind}.{required} is empty",
        )
    return kind


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
