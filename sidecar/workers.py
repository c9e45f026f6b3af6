"""--workers N: N serving processes sharing one port (SO_REUSEPORT), under a small supervisor.

One Python process uses about one core (the GIL). The supervisor forks the workers before any
gRPC object exists (grpc's core does not survive a fork once it has started threads); each
worker then builds its own server, channel and policy engine and binds the same address with
SO_REUSEPORT, and the kernel spreads incoming connections over them. A connection stays with
its worker: spread load by opening several connections, not several streams on one.

The supervisor forwards SIGTERM/SIGINT (graceful shutdown) and SIGHUP (policy reload) to every
worker. A worker that dies on its own is replaced, as gunicorn and nginx replace theirs, after a
back-off that doubles with each death in a row (RESTART_BACKOFF up to RESTART_BACKOFF_MAX); the
others keep serving meanwhile. Only a crash loop ends the process: CRASH_LOOP_DEATHS deaths within
CRASH_LOOP_SECONDS stop the survivors, log "workers keep dying: giving up" at error and exit
EXIT_CRASH_LOOP (3), for the orchestrator to see. After SIGTERM the exit status is 0 when every
worker stopped cleanly, 1 otherwise.

Metrics: the workers write their values to PROMETHEUS_MULTIPROC_DIR (created here unless set)
and the supervisor serves their sum on --metrics-listen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

from telemetry_guard.sidecar.logs import fields

LOG = logging.getLogger("telemetry_guard.sidecar.workers")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's switch to multiprocess mode


def multiprocess_metrics() -> str | None:
    """Switch prometheus_client to multiprocess mode; the directory this created (None: given by env)."""
    created = None
    if not os.environ.get(MULTIPROC_ENV):
        created = tempfile.mkdtemp(prefix="telemetry-guard-metrics-")
        os.environ[MULTIPROC_ENV] = created
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call] # decided at import time: decide again
    return created


def reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """Port 0: pick a free port the workers can all bind (a SO_REUSEPORT socket holds it meanwhile)."""
    if port != 0:
        return port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((host, 0))
    return holder.getsockname()[1], holder


RESTART_BACKOFF = 0.1  # seconds before the first replacement; doubled for each death in a row
RESTART_BACKOFF_MAX = 10.0
STABLE_SECONDS = 30.0  # a worker that served this long resets the back-off
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_SECONDS = 60.0
EXIT_CRASH_LOOP = 3
POLL_SECONDS = 0.05  # how often the supervisor looks for dead workers and due replacements


def _run_worker(number: int, port: int, holder: socket.socket | None, worker: Callable[[int], int]) -> NoReturn:
    """In the forked child: serve, then leave with the worker's exit code (never return to the supervisor)."""
    code = 1
    try:
        if holder is not None:
            holder.close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Until the server installs its reload handler: a SIGHUP must not kill the worker
        # (the policy it is loading is the current one; a later change is seen by the watch).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        code = worker(port)
    except BaseException:
        LOG.exception("worker failed", extra=fields(worker=number))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)


class _Supervisor:
    """The workers by pid, their replacements when they die, and the signals passed on to them."""

    def __init__(self, port: int, holder: socket.socket | None, worker: Callable[[int], int]) -> None:
        self.port = port
        self.holder = holder
        self.worker = worker
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started)
        self.due: dict[int, float] = {}  # worker number -> when to start its replacement
        self.in_a_row: dict[int, int] = {}  # worker number -> deaths since it last served STABLE_SECONDS
        self.deaths: list[float] = []  # when workers died on their own, within CRASH_LOOP_SECONDS
        self.stopping = False
        self.failed = False  # a worker exited non-zero while stopping

    def spawn(self, number: int) -> int:
        pid = os.fork()
        if pid == 0:
            _run_worker(number, self.port, self.holder, self.worker)
        self.children[pid] = (number, time.monotonic())
        return pid

    def forward(self, signum: int, _frame: FrameType | None = None) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
            self.due.clear()
            signum = signal.SIGTERM
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    def reap(self, pid: int, status: int) -> bool:
        """A worker ended. False: a crash loop, give up."""
        number, started = self.children.pop(pid)
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        exit_code = os.waitstatus_to_exitcode(status)  # negative: the signal that killed it
        if self.stopping:
            if exit_code != 0:
                self.failed = True
                LOG.error("worker exited", extra=fields(worker=number, worker_pid=pid, exit_code=exit_code))
            return True
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < CRASH_LOOP_SECONDS] + [now]
        if now - started >= STABLE_SECONDS:
            self.in_a_row[number] = 0
        self.in_a_row[number] = self.in_a_row.get(number, 0) + 1
        if len(self.deaths) >= CRASH_LOOP_DEATHS:
            LOG.error(
                "workers keep dying: giving up",
                extra=fields(
                    worker=number, worker_pid=pid, exit_code=exit_code, deaths=len(self.deaths),
                    within_seconds=CRASH_LOOP_SECONDS, exit_status=EXIT_CRASH_LOOP,
                ),
            )  # fmt: skip
            return False
        delay = min(RESTART_BACKOFF * 2 ** (self.in_a_row[number] - 1), RESTART_BACKOFF_MAX)
        self.due[number] = now + delay
        LOG.error(
            "worker died; replacing it",
            extra=fields(worker=number, worker_pid=pid, exit_code=exit_code, restart_in_seconds=round(delay, 3)),
        )
        return True

    def replace_due(self) -> None:
        now = time.monotonic()
        for number, when in sorted(self.due.items()):
            if when <= now and not self.stopping:
                del self.due[number]
                pid = self.spawn(number)
                LOG.info("worker replaced", extra=fields(worker=number, worker_pid=pid))

    def wait(self) -> int:
        """Reap and replace until every worker is gone after SIGTERM, or a crash loop. The exit code."""
        while self.children or self.due:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # every worker is dead, their replacements not yet due
                pid, status = 0, 0
            if pid == 0:
                self.replace_due()
                time.sleep(POLL_SECONDS)
                continue
            if pid in self.children and not self.reap(pid, status):
                self.forward(signal.SIGTERM)
                while self.children:
                    pid, status = os.wait()
                    self.children.pop(pid, None)
                return EXIT_CRASH_LOOP
        return 1 if self.failed else 0


def supervise(
    count: int,
    host: str,
    port: int,
    worker: Callable[[int], int],
    metrics_listen: tuple[str, int] | None = None,
) -> int:
    """Fork `count` workers running worker(port) -> exit code; keep them running until SIGTERM. The exit code."""
    created = multiprocess_metrics()
    port, holder = reserve_port(host, port)
    supervisor = _Supervisor(port, holder, worker)
    for number in range(count):
        supervisor.spawn(number)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, supervisor.forward)
    metrics_failed = False
    if metrics_listen is not None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from telemetry_guard.sidecar.metrics import build_info, serve_metrics

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        build_info(registry)
        try:
            serve_metrics(metrics_listen[0], metrics_listen[1], registry)
        except OSError as exc:  # taken since serve checked it: stop the workers, say why
            LOG.error("cannot listen", extra=fields(metrics_listen=metrics_listen, error=exc.strerror or str(exc)))
            print(f"telemetry-guard serve: cannot listen: --metrics-listen: {exc.strerror or exc}", file=sys.stderr)
            metrics_failed = True
            supervisor.forward(signal.SIGTERM)
    if holder is not None:
        holder.close()
        supervisor.holder = None
    LOG.info("workers started", extra=fields(workers=count, port=port, pids=sorted(supervisor.children)))
    code = supervisor.wait()
    if metrics_failed:
        code = 2  # as a busy port is for one process
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    LOG.info("stopped", extra=fields(exit_code=code))
    return code
