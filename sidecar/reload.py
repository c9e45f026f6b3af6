"""Policy hot reload: on SIGHUP and when the policy or one of its allowlist files changes.

A new policy is put in force only when it is fully validated: loaded (YAML, schema, semantics:
policy.load_policy), accepted by lint (policy.safety: an error the policy does not acknowledge
refuses it, unless the operator allowed unsafe policies), compiled into an Engine, and tried on
a small request of every identifier kind (a dry run: an engine that raises there would refuse
live traffic with INTERNAL). An invalid policy is refused with an error log and a metric; the
old one stays in force.

Each call takes the guard in force when it starts and keeps it to the end (`current` is read
once per call), so streams in flight keep the policy they started with.

Change detection polls os.stat() of every file the policy in force was read from (the policy
file and its allowlists; stat follows symlinks, so the atomic symlink swap of a Kubernetes
ConfigMap volume is seen). A change that fails to load is not retried until the files change
again (or SIGHUP); the files that failed load looked for are watched too, so that an allowlist
it named before it existed is picked up when it appears.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from telemetry_guard.interceptors.guard import Guard
from telemetry_guard.policy import KINDS, Engine, Policy, PolicyError, default_policy, load_policy
from telemetry_guard.policy.access import placeholder_identifier
from telemetry_guard.policy.loader import files_sha256
from telemetry_guard.policy.safety import PolicyChangedError, check_enforceable
from telemetry_guard.sidecar.logs import fields
from telemetry_guard.sidecar.metrics import Metrics
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

LOG = logging.getLogger("telemetry_guard.sidecar.reload")

LOAD_ATTEMPTS = 3  # loads of a policy whose files keep changing while it is checked, before giving up

Signature = tuple[tuple[str, int, int, int, int] | tuple[str], ...]


@dataclass(frozen=True)
class Loaded:
    """A policy in force and the guard that applies it."""

    policy: Policy
    guard: Guard
    signature: Signature


def signature(paths: tuple[str, ...]) -> Signature:
    """What identifies the content of the files: device, inode, size, mtime (missing: the name alone)."""
    out: list[tuple[str, int, int, int, int] | tuple[str]] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((path,))
            continue
        out.append((path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _dry_run(engine: Engine) -> None:
    """Evaluate a small request under every kind; raises what the engine would raise on live traffic."""
    request = pb.RecordEventsRequest()
    event = request.events.events.add(id="reload-check", feature="cody.completion", action="suggested")
    event.timestamp.FromSeconds(1_700_000_000)
    event.marketing_tracking.url = "https://example.invalid/"
    event.parameters.private_metadata.update({"languageId": "go", "other": 1})
    data = request.SerializeToString()
    for kind in KINDS:
        identifier = placeholder_identifier(kind, "reload-check")
        engine.check_access("RecordEvents", identifier, "Bearer reload-check")
        engine.record_events_bytes(data, identifier)


def load_validated(path: str | Path | None, *, allow_unsafe_policy: bool = False) -> tuple[Policy, Engine]:
    """Load (None: the default policy), lint, compile and dry-run a policy for enforcement.

    Raises PolicyError (UnsafePolicyError: lint refuses it, and allow_unsafe_policy is not given) or
    what the engine raises.
    """
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        policy = load_policy(path) if path is not None else default_policy()
        try:
            check_enforceable(policy, allow_unsafe_policy=allow_unsafe_policy)
            break
        except PolicyChangedError:  # rewritten while it was checked: not invalid, read it again
            if attempt == LOAD_ATTEMPTS:
                raise
    engine = Engine(policy)
    _dry_run(engine)
    return policy, engine


class PolicyReloader:
    """Holds the policy in force and replaces it when a new one validates.

    path None: the built-in default policy. make_guard builds the guard for a validated engine.
    allow_unsafe_policy: put in force a policy lint refuses (its findings logged at ERROR on every load).
    """

    def __init__(
        self,
        path: str | Path | None,
        make_guard: Callable[[Engine], Guard],
        metrics: Metrics,
        *,
        allow_unsafe_policy: bool = False,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.allow_unsafe_policy = allow_unsafe_policy
        self._make_guard = make_guard
        self.metrics = metrics
        self._lock = asyncio.Lock()
        self._failed: tuple[str, ...] = ()  # the files the last refused reload looked for
        self._loaded = self._load()  # raises PolicyError: nothing to serve without a policy
        self._seen = self._loaded.signature
        metrics.policy_in_force(self._loaded.policy)
        LOG.info("policy in force", extra=fields(**self._describe(self._loaded.policy)))

    @property
    def current(self) -> Guard:
        """The guard for a call that starts now."""
        return self._loaded.guard

    @property
    def policy(self) -> Policy:
        return self._loaded.policy

    def _watched(self, policy: Policy) -> tuple[str, ...]:
        names = [str(self.path)] if self.path is not None else []
        names.extend(str(f) for f in policy.files)
        names.extend(self._failed)
        return tuple(dict.fromkeys(names))

    def _load(self) -> Loaded:
        """Load, compile and dry-run (blocking: called in a thread once serving)."""
        policy, engine = load_validated(self.path, allow_unsafe_policy=self.allow_unsafe_policy)
        seen = signature(self._watched(policy))
        if files_sha256(policy.files) != policy.sha256:
            seen = ()  # a file changed while it was being read: the next look reloads
        return Loaded(policy, self._make_guard(engine), seen)

    @staticmethod
    def _describe(policy: Policy) -> dict[str, object]:
        return {"policy": policy.name, "sha256": policy.sha256, "files": list(policy.files)}

    def changed(self) -> bool:
        return signature(self._watched(self._loaded.policy)) != self._seen

    async def reload(self, trigger: str) -> bool:
        """Load the policy again; put it in force if it validates. False when refused."""
        async with self._lock:
            self._seen = signature(self._watched(self._loaded.policy))
            try:
                loaded = await asyncio.to_thread(self._load)
            except PolicyError as exc:
                self._failed = exc.files
                self._seen = signature(self._watched(self._loaded.policy))
                self.metrics.child(self.metrics.reload_failures, trigger).inc()
                LOG.error(
                    "policy reload refused; the policy in force stays",
                    extra=fields(
                        trigger=trigger, problems=[str(p) for p in exc.problems], **self._describe(self._loaded.policy)
                    ),
                )
                return False
            except Exception as exc:  # fail closed: an engine that cannot be built is refused
                self.metrics.child(self.metrics.reload_failures, trigger).inc()
                LOG.error(
                    "policy reload refused: the policy could not be compiled or evaluated; the policy in force stays",
                    extra=fields(trigger=trigger, error=type(exc).__name__, **self._describe(self._loaded.policy)),
                )
                return False
            previous = self._loaded.policy
            self._loaded = loaded
            self._failed = ()
            self._seen = loaded.signature
            self.metrics.child(self.metrics.reloads, trigger).inc()
            self.metrics.policy_in_force(loaded.policy)
            LOG.info(
                "policy reloaded",
                extra=fields(trigger=trigger, previous_sha256=previous.sha256, **self._describe(loaded.policy)),
            )
            return True

    async def watch(self, interval: float) -> None:
        """Poll the files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                await self.reload("file")
