"""Python code generated from the telemetrygateway protocol (see proto/generate.py)."""
