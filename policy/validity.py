"""Event validity as the Telemetry Gateway checks it (shared/protocol/GATEWAY.md)."""

from __future__ import annotations

import re

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

NAME_PATTERN = re.compile(r"^[a-z][a-zA-Z\-.]+$")
MAX_NAME_LENGTH = 64


def name_problem(label: str, value: str) -> str | None:
    """Why a feature or action name would be rejected, or None."""
    if not value:
        return f"{label} is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"{label} is longer than {MAX_NAME_LENGTH} characters"
    if not NAME_PATTERN.fullmatch(value):  # fullmatch: "$" alone would admit a trailing newline
        return f"{label} does not match {NAME_PATTERN.pattern}"
    return None


def type_problem(feature: str, action: str) -> str | None:
    """Why an event type (feature, action) is invalid, or None. Cached per type by the engine."""
    return name_problem("feature", feature) or name_problem("action", action)


def event_problem(event: pb.Event) -> str | None:
    """Every check, for callers outside the engine's hot loop."""
    if not event.id:
        return "id is empty"
    if not event.HasField("timestamp"):
        return "timestamp is not set"
    return type_problem(event.feature, event.action)
