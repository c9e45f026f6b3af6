"""--workers N: N serving processes sharing one port (SO_REUSEPORT), under a small supervisor.

One Python process uses about one core (the GIL). The supervisor forks the workers before any
gRPC object exists (grpc's core does not survive a fork once it has started threads); each
worker then builds its own server, channel and policy engine and binds the same address with
SO_REUSEPORT, and the kernel spreads incoming connections over them. A connection stays with
its worker: spread load by opening several connections, not several streams on one.

The supervisor forwards SIGTERM/SIGINT (graceful shutdown) and SIGHUP (policy reload) to every
worker. When a worker dies on its own, the others are stopped and the supervisor exits 1: a
half-dead sidecar is worse than one its orchestrator restarts.

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
from collections.abc import Callable
from types import FrameType

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


def supervise(
    count: int,
    host: str,
    port: int,
    worker: Callable[[int], int],
    metrics_listen: tuple[str, int] | None = None,
) -> int:
    """Fork `count` workers running worker(port) -> exit code; wait for them. The exit code."""
    created = multiprocess_metrics()
    port, holder = reserve_port(host, port)
    children: dict[int, int] = {}  # pid -> worker number
    for number in range(count):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                if holder is not None:
                    holder.close()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
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
        children[pid] = number
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            signum = signal.SIGTERM
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
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
            stopping = metrics_failed = True
            forward(signal.SIGTERM, None)
    if holder is not None:
        holder.close()
    LOG.info("workers started", extra=fields(workers=count, port=port, pids=sorted(children)))
    code = 0
    from prometheus_client import multiprocess

    while children:
        pid, status = os.wait()
        if pid not in children:
            continue
        number = children.pop(pid)
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        exit_code = os.waitstatus_to_exitcode(status)
        if exit_code != 0 or not stopping:
            LOG.error("worker exited", extra=fields(worker=number, pid=pid, exit_code=exit_code))
            code = 1
            if not stopping:
                stopping = True
                forward(signal.SIGTERM, None)
    if metrics_failed:
        code = 2  # as a busy port is for one process
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    LOG.info("stopped", extra=fields(exit_code=code))
    return code
