"""gRPC interceptors that enforce a telemetry-guard policy on TelemeteryGatewayService.

Server side (any server exposing the service; other services pass untouched):

    grpc.server(executor, interceptors=[GuardServerInterceptor(policy)])
    grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(policy)])

Exporter side (requests filtered before they leave; refusals local, nothing sent):

    channel = wrap_channel(grpc.insecure_channel(target), policy)
    channel = grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(policy))

`policy` is a loaded Policy, an Engine, or None for the default policy. Credentials are
judged by a CredentialVerifier (BearerPresent by default, or TokenIntrospection); every
decision goes to the audit log `telemetry_guard.audit` (AuditLog).
"""

from telemetry_guard.interceptors.aio_client import (
    AsyncGuardStreamStreamInterceptor,
    AsyncGuardStreamUnaryInterceptor,
    AsyncGuardUnaryStreamInterceptor,
    AsyncGuardUnaryUnaryInterceptor,
    aio_client_interceptors,
)
from telemetry_guard.interceptors.aio_server import AsyncGuardServerInterceptor
from telemetry_guard.interceptors.audit import AUDIT_LOGGER_NAME, AuditLog
from telemetry_guard.interceptors.client import GuardClientInterceptor, wrap_channel
from telemetry_guard.interceptors.credentials import BearerPresent, CredentialVerifier, TokenIntrospection
from telemetry_guard.interceptors.errors import GuardError, GuardRpcError
from telemetry_guard.interceptors.guard import Guard
from telemetry_guard.interceptors.server import GuardServerInterceptor

__all__ = [
    "AUDIT_LOGGER_NAME",
    "AsyncGuardServerInterceptor",
    "AsyncGuardStreamStreamInterceptor",
    "AsyncGuardStreamUnaryInterceptor",
    "AsyncGuardUnaryStreamInterceptor",
    "AsyncGuardUnaryUnaryInterceptor",
    "AuditLog",
    "BearerPresent",
    "CredentialVerifier",
    "Guard",
    "GuardClientInterceptor",
    "GuardError",
    "GuardRpcError",
    "GuardServerInterceptor",
    "TokenIntrospection",
    "aio_client_interceptors",
    "wrap_channel",
]
