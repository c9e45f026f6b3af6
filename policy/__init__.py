"""telemetry-guard's policy engine: load a YAML policy, apply it to telemetrygateway.v1 requests.

from telemetry_guard.policy import Engine, load_policy, default_policy
engine = Engine(load_policy("policy.yaml"))
outcome = engine.record_events(request, identifier)
if outcome.denial: ...            # a gRPC status code and the rule that refused
outcome.request                   # what may leave (filtered in place)
outcome.decision.to_dict()        # what was removed, by which rule; never a value
"""

from telemetry_guard.policy.decision import Decision, Denial, EventRecord, Removal
from telemetry_guard.policy.engine import Engine, EventType, Outcome
from telemetry_guard.policy.errors import PolicyError, Problem
from telemetry_guard.policy.kinds import KINDS, RPCS, SINGLE_TENANT_KINDS
from telemetry_guard.policy.loader import default_policy, default_policy_path, load_policy
from telemetry_guard.policy.model import Policy

__all__ = [
    "KINDS",
    "RPCS",
    "SINGLE_TENANT_KINDS",
    "Decision",
    "Denial",
    "Engine",
    "EventRecord",
    "EventType",
    "Outcome",
    "Policy",
    "PolicyError",
    "Problem",
    "Removal",
    "default_policy",
    "default_policy_path",
    "load_policy",
]
