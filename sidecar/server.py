"""The sidecar process: a grpc.aio server that enforces the policy and forwards what passes.

    sidecar = Sidecar(Config(listen="127.0.0.1:0", upstream="gateway:10080"))
    port = await sidecar.start()
    ...
    await sidecar.stop()

On its port: TelemeteryGatewayService (the forwarder), the gRPC health service
(grpc.health.v1.Health: "" and the telemetry service, SERVING until shutdown begins) and
server reflection. Requests larger than max_message_bytes (the gateway's limit: gRPC's
default of 4 MiB) are refused by grpc with RESOURCE_EXHAUSTED. `run()` adds the process
part: SIGHUP reloads the policy; SIGTERM and SIGINT shut down gracefully: health NOT_SERVING at
once, new calls still accepted for `drain` seconds (so that a load balancer or Kubernetes takes
the instance out of rotation before it stops listening; a second signal ends the drain), then
no new calls, calls in flight get `grace` seconds, then are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from telemetry_guard import version
from telemetry_guard.interceptors.audit import AuditLog
from telemetry_guard.interceptors.credentials import BearerPresent, CredentialVerifier, TokenIntrospection
from telemetry_guard.interceptors.guard import Guard
from telemetry_guard.policy import Engine
from telemetry_guard.policy.kinds import SERVICE
from telemetry_guard.sidecar import gateway, logs
from telemetry_guard.sidecar.forward import DEFAULT_FORWARD_METADATA, DEFAULT_WINDOW, Forwarder
from telemetry_guard.sidecar.logs import fields
from telemetry_guard.sidecar.metrics import Metrics, multiprocess
from telemetry_guard.sidecar.reload import PolicyReloader
from telemetry_guard.sidecar.shadow import Shadow

if TYPE_CHECKING:
    from telemetry_guard.sidecar.tracing import Tracing

LOG = logging.getLogger("telemetry_guard.sidecar")

GATEWAY_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the gateway's limit: gRPC's default receive size
INTROSPECTION_SECRET_ENV = "TELEMETRY_GUARD_INTROSPECTION_CLIENT_SECRET"


@dataclass
class Config:
    """What `telemetry-guard serve` is told (see its --help for each field)."""

    listen: str = "127.0.0.1:10085"
    upstream: str | None = None
    policy: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    upstream_tls: bool = False
    upstream_ca: str | None = None
    upstream_server_name: str | None = None
    gateway_output: str = "-"
    metrics_listen: str | None = None
    workers: int = 1
    grace: float = 10.0
    drain: float = 0.0
    reload_interval: float = 2.0
    max_message_bytes: int = GATEWAY_MAX_MESSAGE_BYTES
    forward_metadata: tuple[str, ...] = DEFAULT_FORWARD_METADATA
    introspection_url: str | None = None
    introspection_client_id: str | None = None
    log_level: str = "info"
    window: int = DEFAULT_WINDOW
    allow_unsafe_policy: bool = False
    shadow_policy: str | None = None
    shadow_sample: float = 1.0


def split_host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def verifier(config: Config) -> CredentialVerifier:
    if config.introspection_url is None:
        return BearerPresent()
    return TokenIntrospection(
        config.introspection_url,
        client_id=config.introspection_client_id,
        client_secret=os.environ.get(INTROSPECTION_SECRET_ENV) if config.introspection_client_id else None,
    )


def upstream_channel(config: Config, target: str) -> grpc.aio.Channel:
    """The channel to the gateway. No size limits of its own: the upstream judges what it accepts."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", -1),
        ("grpc.max_receive_message_length", -1),
    ]
    if not (config.upstream_tls or config.upstream_ca):
        return grpc.aio.insecure_channel(target, options=options)
    roots = _read(config.upstream_ca) if config.upstream_ca else None  # None: the system's roots
    if config.upstream_server_name:
        options.append(("grpc.ssl_target_name_override", config.upstream_server_name))
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)


class Sidecar:
    """One serving process. sink: where the embedded gateway writes (no upstream); None: JSON lines.
    tracing: spans of the sidecar's calls (sidecar.spans.from_environment); the caller shuts it down."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        sink: gateway.Sink | None = None,
        reuse_port: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.tracing = tracing
        self.metrics = metrics or Metrics()
        self._sink = sink
        self._reuse_port = reuse_port
        audit = AuditLog(sink=logs.audit_sink())
        verify = verifier(config)

        def make_guard(engine: Engine) -> Guard:
            return Guard(engine, verifier=verify, audit=audit, side="server", tally=self.metrics.tally)

        self.reloader = PolicyReloader(  # raises PolicyError
            config.policy, make_guard, self.metrics, allow_unsafe_policy=config.allow_unsafe_policy
        )
        self.shadow = shadow_of(config, self.metrics)
        self.port = 0
        self.gateway_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._gateway: grpc.aio.Server | None = None
        self._lines: gateway.JsonLines | None = None
        self._channel: grpc.aio.Channel | None = None
        self._health: health.aio.HealthServicer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        """Bind, start serving; the bound port. Raises RuntimeError when the address cannot be bound."""
        config = self.config
        if config.upstream is not None:
            target = config.upstream
        else:
            sink = self._sink
            if sink is None:
                self._lines = gateway.JsonLines(config.gateway_output)
                sink = self._lines
            self._gateway, self.gateway_port = await gateway.start(sink, -1)
            target = join_host_port("127.0.0.1", self.gateway_port)
        self._channel = upstream_channel(config, target) if config.upstream else grpc.aio.insecure_channel(target)

        server = grpc.aio.server(
            interceptors=self.tracing.interceptors() if self.tracing is not None else None,
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ],
        )
        forwarder = Forwarder(
            self._channel,
            lambda: self.reloader.current,
            self.metrics,
            forward_metadata=config.forward_metadata,
            window=config.window,
            trace_context=self.tracing.outgoing if self.tracing is not None else None,
            shadow=self.shadow,
        )
        server.add_generic_rpc_handlers((forwarder.handler(),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        if config.tls_cert and config.tls_key:
            credentials = grpc.ssl_server_credentials([(_read(config.tls_key), _read(config.tls_cert))])
            self.port = server.add_secure_port(config.listen, credentials)
        else:
            self.port = server.add_insecure_port(config.listen)
        await server.start()
        self._server = server
        metrics_at: str | None = None
        if config.metrics_listen and not multiprocess():
            metrics_host, metrics_port = split_host_port(config.metrics_listen)
            try:
                metrics_at = join_host_port(metrics_host, self.metrics.serve(metrics_host, metrics_port))
            except OSError as exc:  # run() reports it as it does a busy serving port
                raise RuntimeError(f"--metrics-listen {config.metrics_listen}: {exc.strerror or exc}") from None
        if config.reload_interval > 0:
            self._tasks.append(asyncio.create_task(self.reloader.watch(config.reload_interval)))
            if self.shadow is not None:
                self._tasks.append(asyncio.create_task(self.shadow.watch(config.reload_interval)))
        host, _ = split_host_port(config.listen)
        LOG.info(
            "serving",
            extra=fields(
                listen=join_host_port(host, self.port),
                port=self.port,
                pid=os.getpid(),
                tls=bool(config.tls_cert),
                tracing=self.tracing is not None,
                upstream=config.upstream or f"embedded gateway ({_output_name(config.gateway_output)})",
                policy=self.reloader.policy.name,
                sha256=self.reloader.policy.sha256,
                **shadow_fields(self.shadow),
                version=version(),
                **({"metrics": f"http://{metrics_at}/metrics"} if metrics_at else {}),
            ),
        )
        return self.port

    async def drain(self, seconds: float, cut_short: asyncio.Event) -> None:
        """Readiness off, still serving: health NOT_SERVING now, new calls accepted for `seconds` or until cut_short."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if seconds <= 0:
            return
        LOG.info("draining", extra=fields(drain_seconds=seconds))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut_short.wait(), seconds)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: health NOT_SERVING, no new calls, calls in flight get `grace` seconds, then cancelled."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            LOG.info("shutting down", extra=fields(grace_seconds=grace))
            await self._server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._channel is not None:
            await self._channel.close()
        if self._gateway is not None:
            await self._gateway.stop(None)
        if self._lines is not None:
            self._lines.close()
        LOG.info("stopped")

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT (then drain, stop); SIGHUP reloads the policy. The exit code."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        again = asyncio.Event()  # a second SIGTERM or SIGINT: end the drain now

        def terminate() -> None:
            (again if done.is_set() else done).set()

        reloads: set[asyncio.Task[bool]] = set()

        def hangup() -> None:
            for reload in (self.reloader.reload, *((self.shadow.reload,) if self.shadow is not None else ())):
                task = loop.create_task(reload("signal"))
                reloads.add(task)
                task.add_done_callback(reloads.discard)

        try:
            await self.start()
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."; the metrics server's OSError
            LOG.error("cannot listen", extra=fields(listen=self.config.listen, error=str(exc)))
            print(f"telemetry-guard serve: cannot listen: {exc}", file=sys.stderr)
            await self.stop(0)
            return 2
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, terminate)
        loop.add_signal_handler(signal.SIGHUP, hangup)
        await done.wait()
        await self.drain(self.config.drain, again)
        await self.stop(self.config.grace)
        return 0


def _output_name(path: str | None) -> str:
    return "stdout" if path in (None, "-") else str(path)


def shadow_of(config: Config, metrics: Metrics) -> Shadow | None:
    """The candidate policy in shadow (--shadow-policy), or None. A candidate that cannot be loaded
    is logged and ignored (it is looked for again on reload): never a reason not to serve."""
    if config.shadow_policy is None:
        return None
    return Shadow(config.shadow_policy, config.shadow_sample, metrics, sink=logs.audit_sink())


def shadow_fields(shadow: Shadow | None) -> dict[str, object]:
    """What the "serving" line says of the shadow."""
    if shadow is None:
        return {}
    candidate = shadow.candidate.current
    return {
        "shadow_policy": str(shadow.candidate.path),
        "shadow_sha256": None if candidate is None else candidate.policy.sha256,
        "shadow_sample": shadow.sampler.rate,
    }
