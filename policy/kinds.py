"""Names the policy language shares with the protocol: identifier kinds and RPCs.

Kept in one place so that the schema, the loader, the engine and the reports
spell them the same way as telemetrygateway.v1 does.
"""

from __future__ import annotations

from typing import Final

# Members of the Identifier oneof, in field-number order.
KINDS: Final = ("licensed_instance", "unlicensed_instance", "managed_service", "workspace")

# Single-tenant Sourcegraph instances: the seed forbids exporting marketing
# tracking from them, and exports their private_metadata only by allowlist.
SINGLE_TENANT_KINDS: Final = frozenset({"licensed_instance", "unlicensed_instance"})

SERVICE: Final = "telemetrygateway.v1.TelemeteryGatewayService"
RPCS: Final = ("RecordEvents", "RecordEvent", "PublishInstanceUserMetadata")


def method_path(rpc: str) -> str:
    """The gRPC method path of one of RPCS, e.g. /telemetrygateway.v1.TelemeteryGatewayService/RecordEvent."""
    return f"/{SERVICE}/{rpc}"


# The identifier kinds Sourcegraph's gateway serves, per RPC (GATEWAY.md). Any other kind, or no
# identifier, it refuses UNIMPLEMENTED "unsupported identifier type", whatever a policy allows:
# RecordEvent serves managed services only; PublishInstanceUserMetadata is the instances' own
# RPC; RecordEvents serves every kind, workspaces with SAMS credentials as managed services.
GATEWAY_KINDS: Final = {
    "RecordEvents": frozenset(KINDS),
    "RecordEvent": frozenset({"managed_service"}),
    "PublishInstanceUserMetadata": SINGLE_TENANT_KINDS,
}
