"""Prometheus metrics of the sidecar (prometheus-client), served on --metrics-listen.

Labels take values from closed sets only: the RPC, the identifier kind (a member name of the
Identifier oneof, or "none"), a gRPC status code name, a rule name (a key of the policy file,
such as kinds.licensed_instance.private_metadata), a reload trigger, and the policy's sha256.
Never a value from a message: a removed value cannot become a label.

The counters of the policy's work (requests and events received, events forwarded, removals per
rule, refusals, messages sent upstream) and the upstream round trips have one writer: each call's
StreamTally, which the guard makes for every call (interceptors.guard.Guard's tally) and feeds with
each decision and refusal as it is audited, and the forwarder with each message it writes upstream
and each answer. It keeps them in the call and publishes them in batches. The forwarder adds what
only it knows: upstream errors and the calls in progress.

With --workers N the workers write their values to PROMETHEUS_MULTIPROC_DIR and the parent
process serves the sum (prometheus_client's multiprocess mode; see workers.py). An Info
metric does not work in that mode, so the policy's sha256 is a gauge in the info style:
telemetry_guard_policy_info{sha256, name} 1 for the policy in force, 0 for a replaced one.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import ThreadingWSGIServer, generate_latest, make_wsgi_app

from telemetry_guard import version
from telemetry_guard.interceptors.errors import GuardError
from telemetry_guard.interceptors.guard import CallTally
from telemetry_guard.policy import Policy
from telemetry_guard.sidecar.spans import CALL
from telemetry_guard.sidecar.workers import MULTIPROC_ENV

NO_KIND = "none"
METRICS_PATH = "/metrics"

# Upstream round trips: a unary call, or one events payload to the response that answers it.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """Every metric of one sidecar process, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_in = Counter(
            "telemetry_guard_requests_received", "Request messages received from clients.", ["rpc", "kind"], registry=r
        )
        self.requests_out = Counter(
            "telemetry_guard_requests_forwarded", "Request messages sent upstream.", ["rpc", "kind"], registry=r
        )
        self.events_in = Counter(
            "telemetry_guard_events_received", "Events received from clients.", ["rpc", "kind"], registry=r
        )
        self.events_out = Counter(
            "telemetry_guard_events_forwarded",
            "Events passed on upstream after the policy.",
            ["rpc", "kind"],
            registry=r,
        )
        self.removals = Counter(
            "telemetry_guard_removals",
            "Things removed, per rule (whole events count 1, private_metadata keys 1 each, "
            "an event's unknown fields 1), as `telemetry-guard apply` counts them.",
            ["rpc", "kind", "rule"],
            registry=r,
        )
        self.denials = Counter(
            "telemetry_guard_denials",
            "Calls refused by the guard, per status code and rule.",
            ["rpc", "code", "rule"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "telemetry_guard_upstream_latency_seconds",
            "Upstream round trip: a unary call, or an events payload until the response that answers it.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "telemetry_guard_upstream_errors",
            "Upstream calls that ended with an error status.",
            ["rpc", "code"],
            registry=r,
        )
        self.streams = Gauge(
            "telemetry_guard_streams_active",
            "Client calls in progress.",
            ["rpc"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reloads = Counter(
            "telemetry_guard_policy_reloads",
            "Policies loaded and put in force, per trigger.",
            ["trigger"],
            registry=r,
        )
        self.reload_failures = Counter(
            "telemetry_guard_policy_reload_failures",
            "Reloads refused (the policy did not load or validate); the old policy stayed in force.",
            ["trigger"],
            registry=r,
        )
        self.policy_info = Gauge(
            "telemetry_guard_policy_info",
            "The policy in force (1) by sha256 of its files; 0 for a policy it replaced.",
            ["sha256", "name"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._policy: tuple[str, str] | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        build_info(r)

    def tally(self, rpc: str) -> StreamTally:
        """The counters of one call of `rpc` (interceptors.guard.Guard's tally)."""
        return StreamTally(self, rpc)

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: label lookup is on the per-message path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def policy_in_force(self, policy: Policy) -> None:
        labels = (policy.sha256, policy.name)
        if self._policy == labels:
            return
        if self._policy is not None:
            self.policy_info.labels(*self._policy).set(0)
        self.policy_info.labels(*labels).set(1)
        self._policy = labels

    def expose(self) -> bytes:
        """The text exposition of this process's registry (tests, the demo)."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (a thread); the bound port. OSError when it cannot bind."""
        return serve_metrics(host, port, self.registry)


def build_info(registry: CollectorRegistry) -> None:
    """telemetry_guard_build_info{version} 1: which telemetry-guard is serving. An Info metric keeps its
    value in the process that sets it, so with --workers the supervisor sets it in its own registry."""
    Info("telemetry_guard_build", "The telemetry-guard version serving.", registry=registry).info(
        {"version": version()}
    )


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # the base class names it so
        """No access log on stderr: the sidecar's logs are JSON lines."""


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> int:
    """Serve the registry at /metrics on host:port, in a daemon thread; every other path is 404.
    The bound port; OSError when the address cannot be bound."""
    exposition = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]
        result: Iterable[bytes] = exposition(environ, start_response)
        return result

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server: ThreadingWSGIServer = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return int(server.server_port)


class StreamTally(CallTally):
    """The counters of one call (a RecordEvent call is a stream of one message), kept in the call and
    published in batches: at least every FLUSH_SECONDS while it runs, at once for a refusal, and when
    it ends (flush(), called by the forwarder). A payload's decision and round trip are appended as
    they come and added up at the flush: the per-payload step is an append, and some eight counter
    and histogram updates per payload, each a lock and with --workers an mmap write, become a batch
    per half second. The kind label is the call's identifier kind ("none" before one is known). With
    tracing on, each decision and the refusal are also added to the call's span counts (sidecar.spans).
    """

    FLUSH_SECONDS = 0.5

    __slots__ = ("_answered", "_call", "_flushed", "_judged", "_kind", "_metrics", "_refused", "_rpc", "_sent")

    def __init__(self, metrics: Metrics, rpc: str) -> None:
        self._metrics = metrics
        self._rpc = rpc
        self._kind = NO_KIND
        # Not yet published: the decisions (events in, events out, removals per rule), refusals, requests sent
        # upstream, and round trips.
        self._judged: list[tuple[int, int, dict[str, int]]] = []
        self._refused = self._sent = 0
        self._answered: list[float] = []
        self._flushed = time.monotonic()
        self._call = CALL.get()

    def judged(self, kind: str | None, events_in: int, events_out: int, counts: dict[str, int]) -> None:
        if (kind or NO_KIND) != self._kind:
            self._label(kind)
        self._judged.append((events_in, events_out, counts))
        if self._call is not None:
            self._call.judged(events_in, events_out, counts)
        if time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def refused(self, kind: str | None, error: GuardError) -> None:
        self._label(kind)
        self._refused += 1
        m = self._metrics
        m.child(m.denials, self._rpc, error.code.name, error.rule).inc()
        if self._call is not None:
            self._call.refused(error.code.name, error.rule)
        self.flush()

    def sent(self) -> None:
        self._sent += 1

    def answered(self, seconds: float) -> None:
        self._answered.append(seconds)

    def flush(self) -> None:
        self._flushed = time.monotonic()
        m = self._metrics
        judged, self._judged = self._judged, []
        events_in = events_out = 0
        removals: dict[str, int] = {}
        for ins, outs, counts in judged:
            events_in += ins
            events_out += outs
            for rule, count in counts.items():
                removals[rule] = removals.get(rule, 0) + count
        for counter, amount in (
            (m.requests_in, len(judged) + self._refused),
            (m.events_in, events_in),
            (m.events_out, events_out),
            (m.requests_out, self._sent),
        ):
            if amount:
                m.child(counter, self._rpc, self._kind).inc(amount)
        self._refused = self._sent = 0
        for rule, count in removals.items():
            m.child(m.removals, self._rpc, self._kind, rule).inc(count)
        if self._answered:
            latency = m.child(m.upstream_latency, self._rpc)
            for seconds in self._answered:
                latency.observe(seconds)
            self._answered = []

    def _label(self, kind: str | None) -> None:
        """The call's kind label: what was counted under another one is published first."""
        kind = kind or NO_KIND
        if kind != self._kind:
            self.flush()
            self._kind = kind
