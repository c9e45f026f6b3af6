"""The candidate policy of a shadow roll-out: loaded, linted, reloaded, and never in force.

A candidate is put in shadow only when it could be put in force: it loads, lint accepts it
(policy.safety: no error it does not acknowledge), it compiles and passes the dry run
(reload.load_validated, the same gate as the policy in force). A candidate with a lint error
can acknowledge it, as the policy in force would have to. A refused candidate is logged at error with every problem and
counted (telemetry_guard_shadow_candidate_failures); the previous candidate, if any, stays in
shadow, and the policy in force is never touched.

Reload follows reload.py: SIGHUP and a change of the candidate's files (the policy file, its
allowlists, and the files a refused load looked for). Each call keeps the candidate it started with.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from telemetry_guard.policy import Engine, Policy, PolicyError
from telemetry_guard.policy.loader import files_sha256
from telemetry_guard.sidecar.logs import fields
from telemetry_guard.sidecar.metrics import Metrics
from telemetry_guard.sidecar.reload import Signature, load_validated, signature

LOG = logging.getLogger("telemetry_guard.sidecar.shadow")


@dataclass(frozen=True)
class Candidate:
    """A candidate policy in shadow and the engine that applies it."""

    policy: Policy
    engine: Engine
    signature: Signature


class CandidateRefused(Exception):
    """The candidate cannot be shadowed: every problem, as file:line:column: rule: message."""

    def __init__(self, problems: list[str], files: tuple[str, ...] = ()) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems
        self.files = files


def load_candidate(path: Path) -> tuple[Policy, Engine]:
    """Load, lint and dry-run a candidate as a policy in force would be.

    Raises CandidateRefused; an engine that cannot be built raises what it raises.
    """
    try:
        return load_validated(path)
    except PolicyError as exc:
        raise CandidateRefused([str(p) for p in exc.problems], exc.files) from None


class CandidateMetrics:
    """Which candidate is in shadow, and how many were refused."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.info = Gauge(
            "telemetry_guard_shadow_candidate_info",
            "The candidate policy in shadow (1) by sha256 of its files; 0 for a candidate it replaced.",
            ["sha256", "name"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.failures = Counter(
            "telemetry_guard_shadow_candidate_failures",
            "Candidate policies refused (did not load, or lint found an error it does not acknowledge); "
            "the policy in force is untouched.",
            ["trigger"],
            registry=r,
        )
        self._shown: tuple[str, str] | None = None

    def in_shadow(self, policy: Policy) -> None:
        labels = (policy.sha256, policy.name)
        if self._shown == labels:
            return
        if self._shown is not None:
            self.info.labels(*self._shown).set(0)
        self.info.labels(*labels).set(1)
        self._shown = labels


class CandidateReloader:
    """Holds the candidate in shadow (None until one loads) and replaces it when a new one passes."""

    def __init__(self, path: str | Path, metrics: Metrics) -> None:
        self.path = Path(path)
        self.metrics = CandidateMetrics(metrics)
        self._loaded: Candidate | None = None
        self._failed: tuple[str, ...] = ()
        self._seen: Signature = ()
        self._lock = asyncio.Lock()
        self._put_in_shadow("start", self._attempt())

    @property
    def current(self) -> Candidate | None:
        """The candidate for a call that starts now (None: no candidate could be loaded yet)."""
        return self._loaded

    def _watched(self) -> tuple[str, ...]:
        names = [str(self.path)]
        if self._loaded is not None:
            names.extend(str(f) for f in self._loaded.policy.files)
        names.extend(self._failed)
        return tuple(dict.fromkeys(names))

    def _attempt(self) -> Candidate | CandidateRefused:
        """Load and check the candidate (blocking: run in a thread once serving)."""
        try:
            policy, engine = load_candidate(self.path)
        except CandidateRefused as exc:
            return exc
        except Exception as exc:  # an engine that cannot be built: refused, naming only the type
            why = f"the policy could not be compiled or evaluated ({type(exc).__name__})"
            return CandidateRefused([f"{self.path}: {why}"])
        seen = signature(tuple(dict.fromkeys([str(self.path), *(str(f) for f in policy.files)])))
        if files_sha256(policy.files) != policy.sha256:
            seen = ()  # a file changed while it was read: the next look loads again
        return Candidate(policy, engine, seen)

    def _put_in_shadow(self, trigger: str, attempt: Candidate | CandidateRefused) -> bool:
        if isinstance(attempt, CandidateRefused):
            self._failed = attempt.files
            self._seen = signature(self._watched())
            self.metrics.failures.labels(trigger).inc()
            stays = self._loaded.policy.sha256 if self._loaded is not None else None
            LOG.error(
                "shadow candidate refused and ignored; the policy in force is untouched",
                extra=fields(
                    trigger=trigger, candidate=str(self.path), problems=attempt.problems, candidate_in_shadow=stays
                ),
            )
            return False
        previous = self._loaded
        self._loaded = attempt
        self._failed = ()
        self._seen = attempt.signature
        self.metrics.in_shadow(attempt.policy)
        LOG.info(
            "shadow candidate loaded" if previous is None else "shadow candidate reloaded",
            extra=fields(
                trigger=trigger,
                candidate=attempt.policy.name,
                sha256=attempt.policy.sha256,
                files=list(attempt.policy.files),
                **({"previous_sha256": previous.policy.sha256} if previous is not None else {}),
            ),
        )
        return True

    def changed(self) -> bool:
        return signature(self._watched()) != self._seen

    async def reload(self, trigger: str) -> bool:
        """Load the candidate again; shadow it if it passes. False when refused."""
        async with self._lock:
            return self._put_in_shadow(trigger, await asyncio.to_thread(self._attempt))

    async def watch(self, interval: float) -> None:
        """Poll the candidate's files every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                await self.reload("file")
