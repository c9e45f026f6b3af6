"""telemetrygateway.v1: messages (telemetrygateway_pb2) and gRPC service (telemetrygateway_pb2_grpc)."""
