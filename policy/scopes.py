"""SAMS scopes and how a granted scope covers a required one, as the SAMS SDK matches them.

A scope is `service::permission::action` (Sourcegraph Accounts issues actions read, write and
delete). A granted scope covers a required one when service and action are equal and the
granted permission equals the required one or is a dot-prefix of it: granted
`a::events::write` covers `a::events.x::write`, granted `a::ev::write` does not cover
`a::events::write`. Anything that is not three non-empty parts covers nothing and is covered
by nothing (OpenID scopes such as `openid` are simply ignored).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

# What the gateway checks and what Sourcegraph's client library requests (GATEWAY.md).
DEFAULT_SCOPES: Final = ("telemetry_gateway::events::write",)
SAMS_ACTIONS: Final = frozenset({"read", "write", "delete"})

# One part: no colon, no whitespace. The policy schema requires the same form of a required scope.
SCOPE_PATTERN: Final = re.compile(r"([^:\s]+)::([^:\s]+)::([^:\s]+)")


def parse(scope: str) -> tuple[str, str, str] | None:
    """(service, permission, action), or None for anything that is not a SAMS scope."""
    found = SCOPE_PATTERN.fullmatch(scope)
    if found is None:
        return None
    service, permission, action = found.groups()
    return service, permission, action


def covers(granted: str, required: str) -> bool:
    """Does the granted scope cover the required one (the SAMS SDK's rule)?"""
    have, want = parse(granted), parse(required)
    if have is None or want is None:
        return False
    (service, permission, action), (want_service, want_permission, want_action) = have, want
    if service != want_service or action != want_action:
        return False
    return want_permission == permission or want_permission.startswith(permission + ".")


def satisfied(granted: Iterable[str], required: Iterable[str]) -> bool:
    """Does any granted scope cover any one of the required scopes (any one of them suffices)?"""
    have = [scope for scope in granted if parse(scope) is not None]
    return any(covers(scope, want) for want in required for scope in have)
