"""What a call's span says about the policy's decisions, and whether spans are configured at all.

No OpenTelemetry import here: the metrics and the forwarder use this module whether or not the
otel extra is installed. While a call of the telemetry service runs with tracing on, CALL holds
its CallCounts (set by sidecar.tracing's interceptor; the forwarder's pump task inherits it with
the context); the audit log and the stream tallies add each decision to it, and the interceptor
writes the totals onto the call's span when the call ends. Counts, rule names and status codes
only: never a value of a message. Without tracing CALL stays None and costs one lookup per call.

Tracing is on only when the standard OTEL_ variables configure an exporter (see configured()).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from telemetry_guard.sidecar.tracing import Tracing

PREFIX = "telemetry_guard."
EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DISABLED_ENV = "OTEL_SDK_DISABLED"
INSTALL = "pip install 'telemetry-guard[otel]'"


class TracingError(ValueError):
    """Tracing is configured by the environment but cannot run (the extra missing, an unknown exporter)."""


class CallCounts:
    """The decisions of one call, added up: messages judged, events in and out, removals per rule, a refusal."""

    __slots__ = ("events_in", "events_out", "messages", "refusal", "removals")

    def __init__(self) -> None:
        self.messages = 0
        self.events_in = 0
        self.events_out = 0
        self.removals: dict[str, int] = {}
        self.refusal: tuple[str, str] | None = None  # (status code name, rule)

    def judged(self, events_in: int, events_out: int, counts: Mapping[str, int]) -> None:
        """One request message decided (counts: removals per rule, Decision.counts())."""
        self.messages += 1
        self.events_in += events_in
        self.events_out += events_out
        removals = self.removals
        for rule, count in counts.items():
            removals[rule] = removals.get(rule, 0) + count

    def refused(self, code: str, rule: str) -> None:
        self.messages += 1
        self.refusal = (code, rule)

    def attributes(self) -> dict[str, str | int]:
        """Span attributes under telemetry_guard.*: counts, rule names, a status code name."""
        found: dict[str, str | int] = {
            PREFIX + "messages": self.messages,
            PREFIX + "events_received": self.events_in,
            PREFIX + "events_forwarded": self.events_out,
            PREFIX + "removals": sum(self.removals.values()),
        }
        for rule, count in sorted(self.removals.items()):
            found[f"{PREFIX}removals.{rule}"] = count
        if self.refusal is not None:
            found[PREFIX + "refusal.code"], found[PREFIX + "refusal.rule"] = self.refusal
        return found


CALL: ContextVar[CallCounts | None] = ContextVar("telemetry_guard_call_counts", default=None)


def configured(environ: Mapping[str, str]) -> bool:
    """Does the environment ask for spans? An exporter named (not "none") or an OTLP endpoint, SDK not disabled."""
    if environ.get(DISABLED_ENV, "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in environ.get(EXPORTER_ENV, "").split(",") if name.strip()}
    if exporters:
        return exporters != {"none"}
    return any(environ.get(name, "").strip() for name in ENDPOINT_ENVS)


def check_environment(environ: Mapping[str, str]) -> bool:
    """Is tracing configured? Raises TracingError when it is but cannot run. Starts nothing (safe before a fork)."""
    if not configured(environ):
        return False
    try:
        from telemetry_guard.sidecar.tracing import exporter_classes
    except ImportError as exc:
        raise TracingError(f"tracing is configured by OTEL_ variables but {exc.name} is missing: {INSTALL}") from None
    exporter_classes(environ)
    return True


def from_environment(environ: Mapping[str, str]) -> Tracing | None:
    """The sidecar's tracing as the environment configures it; None when it does not. Raises TracingError."""
    if not check_environment(environ):
        return None
    from telemetry_guard.sidecar.tracing import Tracing

    return Tracing.from_environment(environ)
