"""Fault injection: the real `telemetry-guard serve` in front of a misbehaving upstream on loopback.

The upstream is killed mid-stream, acknowledges ids it never got, acknowledges twice, answers
more or fewer responses than payloads, hangs past the client's deadline, errors on a random
payload; clients cancel, disconnect and stop reading; the sidecar gets SIGTERM with streams in
flight, reloads every 100 ms under load, loses a worker, and crash-loops. After each:
- no event is acknowledged to the client that the upstream did not acknowledge or the policy did
  not remove whole;
- no removed value is in the sidecar's logs or metrics;
- its memory (RSS) stays bounded;
- it still serves, or it exited cleanly with the status it documents.
Every loop is bounded in count and time; everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_sidecar_support import (
    FORWARD_TAG,
    HOST,
    POLICY,
    ROOT,
    SECRETS,
    TIMEOUT,
    Lockstep,
    Outcome,
    Sidecar,
    dropped,
    event,
    free_port,
    metadata,
    payload,
    record_events,
    sensitive,
    wait_for,
)

from telemetry_guard.sidecar import workers
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

KIND = "licensed_instance"
RSS_GROWTH_LIMIT = 64 * 1024 * 1024  # bytes a sidecar may grow over the whole suite
WORKER_RSS_LIMIT = 256 * 1024 * 1024  # bytes a worker may use (about 60 MiB at rest)


# -- the misbehaving upstream --------------------------------------------------------------------


@dataclass
class Faults:
    """What the upstream does wrong (all off: it behaves like the gateway)."""

    ghost_acks: bool = False  # acknowledge ids it never got instead of every second one it got
    ack_twice: bool = False  # answer every payload twice
    extra_response: bool = False  # one more response (with an id of its own) after every payload's
    answer_every: int = 1  # answer only every n-th payload
    hang: float = 0.0  # seconds to sleep before answering
    abort_at: int | None = None  # abort with abort_code when the n-th payload (0-based) arrives
    abort_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


@dataclass
class Ledger:
    """What the upstream received and acknowledged, over all calls."""

    received: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    ended: list[threading.Event] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FaultyUpstream(pb_grpc.TelemeteryGatewayServiceServicer):
    def __init__(self) -> None:
        self.faults = Faults()
        self.ledger = Ledger()

    def reset(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.ledger = Ledger()

    def _answer(self, ids: list[str]) -> pb.RecordEventsResponse:
        with self.ledger.lock:
            self.ledger.acked.update(ids)
        return pb.RecordEventsResponse(succeeded_events=ids)

    def RecordEvents(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        faults, ledger = self.faults, self.ledger
        ended = threading.Event()
        context.add_callback(ended.set)
        with ledger.lock:
            ledger.ended.append(ended)
        payloads = 0
        for request in request_iterator:
            if request.WhichOneof("payload") != "events":
                continue
            ids = [e.id for e in request.events.events]
            with ledger.lock:
                ledger.received.update(ids)
            if faults.abort_at is not None and payloads == faults.abort_at:
                context.abort(faults.abort_code, f"upstream fault at payload {payloads}")
            payloads += 1
            if faults.hang:
                time.sleep(faults.hang)
            if payloads % faults.answer_every:
                continue
            if faults.ghost_acks:
                ids = [f"ghost-{i}" if n % 2 else i for n, i in enumerate(ids)]
            yield self._answer(ids)
            if faults.ack_twice:
                yield self._answer(ids)
            if faults.extra_response:
                yield self._answer([f"extra-{payloads}"])


class Upstream:
    """The faulty upstream served on a fixed port, so that it can be killed and started again."""

    def __init__(self) -> None:
        self.servicer = FaultyUpstream()
        self.port = free_port()
        self.server: grpc.Server | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(self.servicer, server)
        server.add_insecure_port(self.target)
        server.start()
        self.server = server

    def kill(self) -> None:
        """Gone at once: every call cancelled, connections closed."""
        if self.server is not None:
            self.server.stop(None).wait(TIMEOUT)
            self.server = None


# -- helpers -------------------------------------------------------------------------------------


def _traffic(stream: int, payloads: int) -> list[pb.RecordEventsRequest]:
    """Payloads with something to remove in each (values from SECRETS) and an event removed whole."""
    return [
        payload(sensitive(f"s{stream}-{n}"), event(f"e{stream}-{n}"), dropped(f"d{stream}-{n}"))
        for n in range(payloads)
    ]


def _removed_whole(requests: list[pb.RecordEventsRequest]) -> set[str]:
    return {e.id for r in requests for e in r.events.events if e.id.startswith("d")}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as response:
        text: str = response.read().decode()
    return text


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@dataclass
class Served:
    sidecar: Sidecar
    upstream: Upstream
    metrics_port: int
    policy: Path
    rss_start: int

    def check(self, *outcomes: Outcome, sent: list[pb.RecordEventsRequest] | None = None) -> None:
        """The invariants every scenario ends with."""
        acked_by_upstream = self.upstream.servicer.ledger.acked
        removed = _removed_whole(sent or [])
        for out in outcomes:
            wrongly = out.acked - acked_by_upstream - removed
            assert not wrongly, f"acknowledged but not by the upstream nor removed: {sorted(wrongly)[:5]}"
            assert out.code != grpc.StatusCode.INTERNAL, out.details
            assert not any(secret in out.details for secret in SECRETS)
        check_clean(self.sidecar, self.metrics_port)
        assert self.sidecar.process.poll() is None, "the sidecar died"
        assert _rss(self.sidecar.process.pid) - self.rss_start < RSS_GROWTH_LIMIT


def check_clean(sidecar: Sidecar, metrics_port: int | None) -> None:
    """No removed value in the logs or the metrics; no traceback."""
    texts = [sidecar.log_text()]
    if metrics_port is not None and sidecar.process.poll() is None:
        texts.append(_metrics_text(metrics_port))
    for text in texts:
        found = [secret for secret in SECRETS if secret in text]
        assert not found, f"removed values in the sidecar's output: {found}"
        assert "Traceback" not in text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("faults")
    upstream = Upstream()
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    metrics_port = free_port()
    sidecar = Sidecar(
        ["--upstream", upstream.target, "--policy", str(policy), "--reload-interval", "0.05",
         "--metrics-listen", f"127.0.0.1:{metrics_port}", *FORWARD_TAG],
        tmp,
    )  # fmt: skip
    # warm up (first connection, caches), then take the baseline for the memory bound
    assert record_events(sidecar.stub(), [metadata(KIND), *_traffic(0, 3)]).code == grpc.StatusCode.OK
    yield Served(sidecar, upstream, metrics_port, policy, _rss(sidecar.process.pid))
    sidecar.kill()
    upstream.kill()


@pytest.fixture
def faulty(served: Served) -> Iterator[Served]:
    """The module's sidecar, its upstream reset to good behaviour and up."""
    served.upstream.servicer.reset()
    if served.upstream.server is None:
        served.upstream.start()
    yield served
    served.upstream.servicer.reset()


def _lockstep_run(stub: Any, requests: list[pb.RecordEventsRequest], timeout: float = TIMEOUT) -> Outcome:
    """Payload by payload, each answer read before the next is sent (stops at the first end)."""
    stream = Lockstep(stub, timeout=timeout)
    stream.send(metadata(KIND))
    responses = []
    for request in requests:
        stream.send(request)
        try:
            responses.append(stream.next_response())
        except (grpc.RpcError, StopIteration):
            break
    stream.close()
    rest = stream.rest()
    return Outcome(rest.code, rest.details, responses + rest.responses)


def _opened(stub: Any, first: pb.RecordEventsRequest) -> tuple[Lockstep, pb.RecordEventsResponse]:
    """A lockstep stream with its metadata and a first payload sent, and the answer to that payload."""
    stream = Lockstep(stub)
    stream.send(metadata(KIND))
    stream.send(first)
    return stream, stream.next_response()


# -- the upstream misbehaves ---------------------------------------------------------------------


def test_upstream_killed_mid_stream(faulty: Served) -> None:
    sent = _traffic(1, 2)
    stream, first = _opened(faulty.sidecar.stub(), sent[0])
    faulty.upstream.kill()
    stream.send(sent[1])
    stream.close()
    out = stream.rest()
    assert out.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), (out.code, out.details)
    faulty.check(Outcome(out.code, out.details, [first, *out.responses]), sent=sent)
    faulty.upstream.start()  # back: the sidecar reconnects
    again = record_events(faulty.sidecar.stub(), [metadata(KIND), *_traffic(2, 2)])
    assert again.code == grpc.StatusCode.OK, again.details


@pytest.mark.parametrize(
    "faults",
    [Faults(ghost_acks=True), Faults(ack_twice=True), Faults(extra_response=True), Faults(answer_every=2)],
    ids=["acks-ids-it-never-got", "acks-twice", "more-responses-than-payloads", "fewer-responses-than-payloads"],
)
def test_upstream_answers_wrongly(faulty: Served, faults: Faults) -> None:
    faulty.upstream.servicer.reset(faults)
    sent = _traffic(3, 6)
    out = record_events(faulty.sidecar.stub(), [metadata(KIND), *sent])
    assert out.code == grpc.StatusCode.OK, out.details
    faulty.check(out, sent=sent)
    got = faulty.upstream.servicer.ledger.received
    if faults.ghost_acks or faults.answer_every > 1:  # what the upstream did not acknowledge stays unacknowledged
        assert got - faulty.upstream.servicer.ledger.acked, "the fault left some events unacknowledged"
        assert not (got - faulty.upstream.servicer.ledger.acked) & out.acked


def test_upstream_hangs_past_the_clients_deadline(faulty: Served) -> None:
    faulty.upstream.servicer.reset(Faults(hang=5.0))
    sent = _traffic(4, 2)
    started = time.monotonic()
    out = record_events(faulty.sidecar.stub(), [metadata(KIND), *sent], timeout=0.5)
    assert out.code == grpc.StatusCode.DEADLINE_EXCEEDED, out.details
    assert time.monotonic() - started < 4.0, "the client's deadline ends the call, not the upstream's answer"
    assert not out.acked
    # the deadline reached the upstream call too: it ends without waiting for the hang
    assert all(e.wait(TIMEOUT) for e in faulty.upstream.servicer.ledger.ended)
    faulty.check(out, sent=sent)


def test_upstream_error_on_a_random_payload_reaches_the_client_with_its_code(faulty: Served) -> None:
    """grpc/grpc#36066: a write racing the upstream's end turned its status into INTERNAL, 1 time in 15."""
    rng = random.Random(36066)
    stub = faulty.sidecar.stub()
    outcomes = []
    deadline = time.monotonic() + 15
    for attempt in range(150):
        code = rng.choice([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
        at = rng.randrange(0, 12)
        faulty.upstream.servicer.reset(Faults(abort_at=at, abort_code=code))
        sent = _traffic(100 + attempt, 12)
        out = record_events(stub, [metadata(KIND), *sent])  # written as fast as they go, not in lockstep
        assert (out.code, out.details) == (code, f"upstream fault at payload {at}"), f"attempt {attempt}"
        assert out.acked <= faulty.upstream.servicer.ledger.acked | _removed_whole(sent)
        outcomes.append(out)
        if time.monotonic() > deadline:
            break
    assert len(outcomes) >= 100, "too few attempts to catch a 1-in-15 race"
    faulty.check()


# -- clients misbehave ---------------------------------------------------------------------------


def _streams_active(served: Served) -> float:
    return _metric(_metrics_text(served.metrics_port), 'telemetry_guard_streams_active{rpc="RecordEvents"}')


def test_client_cancels_mid_stream(faulty: Served) -> None:
    sent = _traffic(5, 1)
    stream, first = _opened(faulty.sidecar.stub(), sent[0])
    stream.call.cancel()
    assert all(e.wait(TIMEOUT) for e in faulty.upstream.servicer.ledger.ended), "the upstream call ends too"
    wait_for(lambda: _streams_active(faulty) == 0, what="the stream to end in the sidecar")
    faulty.check(Outcome(grpc.StatusCode.CANCELLED, "", [first]), sent=sent)


def test_client_disconnects_mid_stream(faulty: Served) -> None:
    channel = grpc.insecure_channel(faulty.sidecar.target)
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    sent = _traffic(6, 1)
    _stream, first = _opened(stub, sent[0])
    channel.close()  # the connection goes away under the stream
    assert all(e.wait(TIMEOUT) for e in faulty.upstream.servicer.ledger.ended), "the upstream call ends too"
    wait_for(lambda: _streams_active(faulty) == 0, what="the stream to end in the sidecar")
    faulty.check(Outcome(grpc.StatusCode.CANCELLED, "", [first]), sent=sent)


def test_client_stops_reading(faulty: Served) -> None:
    """A client that writes and never reads its answers: memory stays bounded; others are served meanwhile."""
    big = [payload(*(event(f"r{n}-{i}", pad=1000) for i in range(50))) for n in range(200)]  # ~10 MB in all
    call = faulty.sidecar.stub().RecordEvents(iter([metadata(KIND), *big]), timeout=30)
    wait_for(lambda: len(faulty.upstream.servicer.ledger.received) >= 50, what="the unread stream to flow")
    sent = _traffic(7, 2)
    other = record_events(faulty.sidecar.stub(), [metadata(KIND), *sent])
    assert other.code == grpc.StatusCode.OK, other.details
    call.cancel()
    wait_for(lambda: _streams_active(faulty) == 0, what="the stream to end in the sidecar")
    faulty.check(other, sent=sent)


# -- the operator --------------------------------------------------------------------------------


def test_reloads_every_100ms_under_load(faulty: Served) -> None:
    text = _metrics_text(faulty.metrics_port)
    reloads_before = _metric(text, "telemetry_guard_policy_reloads_total")
    failures_before = _metric(text, "telemetry_guard_policy_reload_failures_total")
    variants = [POLICY, POLICY.replace('exclude: ["internal.*"]', 'exclude: ["internal.*", "other.*"]')]
    stop = threading.Event()

    def rewrite() -> None:
        n = 0
        while not stop.wait(0.1):
            n += 1
            staged = faulty.policy.with_suffix(".new")
            staged.write_text(variants[n % 2])
            staged.replace(faulty.policy)  # as a deployment writes it: whole, never half-written

    writer = threading.Thread(target=rewrite)
    writer.start()
    outcomes: list[Outcome] = []
    sent_all: list[pb.RecordEventsRequest] = []
    try:
        # load for at least 2 s, and until 5 reloads happened (bounded: 8 s)
        started, deadline = time.monotonic(), time.monotonic() + 8.0
        stream = 0

        def reloads() -> float:
            return _metric(_metrics_text(faulty.metrics_port), "telemetry_guard_policy_reloads_total") - reloads_before

        while time.monotonic() < deadline and (time.monotonic() - started < 2.0 or reloads() < 5):
            stream += 1
            sent = _traffic(1000 + stream, 5)
            sent_all.extend(sent)
            with futures.ThreadPoolExecutor(3) as pool:
                runs = [pool.submit(_lockstep_run, faulty.sidecar.stub(), sent) for _ in range(3)]
                outcomes.extend(run.result() for run in runs)
    finally:
        stop.set()
        writer.join()
        staged = faulty.policy.with_suffix(".new")
        staged.write_text(POLICY)
        staged.replace(faulty.policy)  # whole, as the writer does: a half-written file is a reload failure
    assert all(out.code == grpc.StatusCode.OK for out in outcomes), {out.details for out in outcomes}
    text = _metrics_text(faulty.metrics_port)
    assert _metric(text, "telemetry_guard_policy_reloads_total") - reloads_before >= 5
    assert _metric(text, "telemetry_guard_policy_reload_failures_total") == failures_before
    faulty.check(*outcomes, sent=sent_all)


def test_sigterm_with_streams_in_flight(tmp_path: Path) -> None:
    upstream = Upstream()
    upstream.servicer.reset(Faults(hang=0.2))
    sidecar = Sidecar(["--upstream", upstream.target, "--grace", "1", *FORWARD_TAG], tmp_path)
    try:
        sent = _traffic(8, 40)
        with futures.ThreadPoolExecutor(3) as pool:
            runs = [pool.submit(_lockstep_run, sidecar.stub(), sent, 30) for _ in range(3)]
            wait_for(lambda: len(upstream.servicer.ledger.received) >= 3, what="streams in flight")
            sidecar.signal(signal.SIGTERM)
            outcomes = [run.result(timeout=TIMEOUT) for run in runs]
        assert sidecar.wait(TIMEOUT) == 0
        assert sidecar.logs(message="shutting down") and sidecar.logs(message="stopped")
        for out in outcomes:  # ended by the shutdown, with a status that says so, never as complete
            assert out.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), (out.code, out.details)
            assert out.acked <= upstream.servicer.ledger.acked | _removed_whole(sent)
        check_clean(sidecar, None)
    finally:
        sidecar.kill()
        upstream.kill()


def _worker_pids(sidecar: Sidecar) -> set[int]:
    return {int(record["pid"]) for record in sidecar.logs(message="serving")}


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(tmp_path: Path) -> None:
    upstream = Upstream()
    metrics_port = free_port()
    sidecar = Sidecar(
        ["--upstream", upstream.target, "--workers", "2", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         *FORWARD_TAG],
        tmp_path,
        workers=2,
    )  # fmt: skip
    try:
        victim = min(_worker_pids(sidecar))
        os.kill(victim, signal.SIGKILL)
        (died,) = wait_for(lambda: sidecar.logs(message="worker died; replacing it"), what="the death")
        assert (died["worker_pid"], died["exit_code"], died["level"]) == (victim, -signal.SIGKILL, "error")
        # the survivor serves meanwhile (new connections go to the live workers)
        for n in range(4):
            out = record_events(sidecar.stub(), [metadata(KIND), *_traffic(900 + n, 1)])
            assert out.code == grpc.StatusCode.OK, out.details
        wait_for(lambda: len(_worker_pids(sidecar)) == 3, what="the replacement to serve")
        assert sidecar.process.poll() is None
        for n in range(4):
            out = record_events(sidecar.stub(), [metadata(KIND), *_traffic(950 + n, 1)])
            assert out.code == grpc.StatusCode.OK, out.details
        check_clean(sidecar, metrics_port)
        for pid in _worker_pids(sidecar) - {victim}:
            assert _rss(pid) < WORKER_RSS_LIMIT
        sidecar.signal(signal.SIGTERM)
        assert sidecar.wait(TIMEOUT) == 0
    finally:
        sidecar.kill()
        upstream.kill()


def test_workers_crash_looping_end_the_process_with_a_clear_status(tmp_path: Path) -> None:
    sidecar = Sidecar(["--workers", "2", "--gateway-output", str(tmp_path / "out.jsonl")], tmp_path, workers=2)
    try:
        killed: set[int] = set()
        deadline = time.monotonic() + 30
        while sidecar.process.poll() is None and time.monotonic() < deadline:
            for pid in _worker_pids(sidecar) - killed:
                killed.add(pid)
                with contextlib.suppress(ProcessLookupError):  # gone already: the supervisor gave up and stopped it
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        assert sidecar.wait(TIMEOUT) == workers.EXIT_CRASH_LOOP
        assert len(killed) >= workers.CRASH_LOOP_DEATHS
        (gave_up,) = sidecar.logs(message="workers keep dying: giving up")
        assert gave_up["level"] == "error" and gave_up["exit_status"] == workers.EXIT_CRASH_LOOP
        assert gave_up["deaths"] == workers.CRASH_LOOP_DEATHS
        assert len(sidecar.logs(message="worker died; replacing it")) == workers.CRASH_LOOP_DEATHS - 1
    finally:
        sidecar.kill()


def test_readme_states_the_supervisors_numbers() -> None:
    readme = (ROOT / "README.md").read_text()
    stated = (
        f"after a back-off doubling from {workers.RESTART_BACKOFF} s",
        f"{workers.CRASH_LOOP_DEATHS} deaths within {workers.CRASH_LOOP_SECONDS:g} s",
        f"exits {workers.EXIT_CRASH_LOOP}",
    )
    flat = " ".join(readme.split())
    assert all(text in flat for text in stated), [text for text in stated if text not in flat]
