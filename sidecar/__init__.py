"""telemetry-guard serve: the sidecar in front of the Telemetry Gateway."""
