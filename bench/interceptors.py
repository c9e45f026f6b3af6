"""The interceptors' cost: the same traffic with and without the guard, in one process, in one run.

    python -m bench.interceptors            # five alternating rounds of 2 s per cell
    python -m bench.interceptors --quick    # one round of 1 s per cell (a smoke run, noisier)

Four cells, each the guard on one end of a call against the same call without it:

- grpc.aio server:  grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(policy)])
- grpc.aio channel: grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(policy))
- sync server:      grpc.server(executor, interceptors=[GuardServerInterceptor(policy)])
- sync channel:     wrap_channel(grpc.insecure_channel(target), policy)

The policy is the default one. The servicer is the generated one (messages, not bytes) and acknowledges every
event, parsing the request as a gateway does. The client sends one RecordEvents stream as a licensed instance,
100-event batches from bench/workload.py (marketing and private metadata included, so the policy has work to
do), one payload in flight (send, wait for its acknowledgement, send the next), on 127.0.0.1. The audit logger
is left as a library user's process leaves it unless they configure logging: at WARNING, so no decision line is
written (refusals would be). Baseline and guarded alternate round by round, so that the shared cores' noise hits
both alike; events/s is the median of the rounds, CPU per payload (the whole process: client, server and grpc's
threads) is over all rounds. Target (issue 14): guarded at least 0.9 of the baseline's events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import queue
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import google.protobuf
import grpc
import grpc.aio

from bench import workload
from telemetry_guard.interceptors import (
    AsyncGuardServerInterceptor,
    GuardServerInterceptor,
    aio_client_interceptors,
    wrap_channel,
)
from telemetry_guard.policy import default_policy
from telemetry_guard.policy.kinds import SERVICE
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
BATCH = 100
TARGET = 0.9  # the target: guarded events/s >= 90% of the same traffic without the guard
METADATA = pb.RecordEventsRequest(
    metadata=pb.RecordEventsRequestMetadata(
        request_id="bench",
        identifier=pb.Identifier(
            licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key="key", instance_id="bench")
        ),
    )
)


@dataclass
class Cell:
    """One side of a comparison, added up over its rounds."""

    rates: list[float] = field(default_factory=list)  # events/s of each round
    payloads: int = 0
    cpu: float = 0.0  # process CPU seconds

    def add(self, payloads: int, seconds: float, cpu: float) -> None:
        self.rates.append(payloads * BATCH / seconds)
        self.payloads += payloads
        self.cpu += cpu

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(1, self.payloads) * 1e6


def _acknowledge(request: pb.RecordEventsRequest) -> pb.RecordEventsResponse | None:
    if request.WhichOneof("payload") != "events":
        return None
    return pb.RecordEventsResponse(succeeded_events=[event.id for event in request.events.events])


async def _aio_record_events(
    requests: AsyncIterator[pb.RecordEventsRequest], context: Any
) -> AsyncIterator[pb.RecordEventsResponse]:
    async for request in requests:
        response = _acknowledge(request)
        if response is not None:
            yield response


def _sync_record_events(requests: Iterator[pb.RecordEventsRequest], context: Any) -> Iterator[pb.RecordEventsResponse]:
    for request in requests:
        response = _acknowledge(request)
        if response is not None:
            yield response


def _service(record_events: Any) -> grpc.GenericRpcHandler:
    """RecordEvents as the generated code registers it: messages in and out."""
    handler = grpc.stream_stream_rpc_method_handler(
        record_events,
        request_deserializer=pb.RecordEventsRequest.FromString,
        response_serializer=pb.RecordEventsResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"RecordEvents": handler})


# -- grpc.aio --------------------------------------------------------------------------------------


async def _aio_stream(channel: grpc.aio.Channel, data: pb.RecordEventsRequest, seconds: float) -> tuple[int, float]:
    """Payloads sent one at a time for `seconds` on one stream; (payloads, seconds taken)."""
    call: Any = pb_grpc.TelemeteryGatewayServiceStub(channel).RecordEvents(timeout=600)
    await call.write(METADATA)
    payloads = 0
    start = time.perf_counter()
    stop_at = start + seconds
    while time.perf_counter() < stop_at:
        await call.write(data)
        if await call.read() is grpc.aio.EOF:
            raise RuntimeError(f"stream ended early: {await call.code()} {await call.details()}")
        payloads += 1
    taken = time.perf_counter() - start
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    return payloads, taken


async def _aio_cells(data: pb.RecordEventsRequest, rounds: int, seconds: float) -> dict[str, tuple[Cell, Cell]]:
    policy = default_policy()
    servers = []
    ports = {}
    for name, interceptors in (("plain", []), ("guarded", [AsyncGuardServerInterceptor(policy)])):
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((_service(_aio_record_events),))
        ports[name] = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        servers.append(server)
    plain = grpc.aio.insecure_channel(f"{HOST}:{ports['plain']}")
    to_guarded = grpc.aio.insecure_channel(f"{HOST}:{ports['guarded']}")
    guarded = grpc.aio.insecure_channel(f"{HOST}:{ports['plain']}", interceptors=aio_client_interceptors(policy))
    cells = {"grpc.aio server": (Cell(), Cell()), "grpc.aio channel": (Cell(), Cell())}
    runs: dict[str, tuple[grpc.aio.Channel, grpc.aio.Channel]] = {
        "grpc.aio server": (plain, to_guarded),
        "grpc.aio channel": (plain, guarded),
    }
    try:
        for base, guard in runs.values():  # warm-up, not measured
            await _aio_stream(base, data, seconds / 4)
            await _aio_stream(guard, data, seconds / 4)
        for _ in range(rounds):
            for name, channels in runs.items():
                for cell, channel in zip(cells[name], channels, strict=True):
                    cpu = time.process_time()
                    payloads, taken = await _aio_stream(channel, data, seconds)
                    cell.add(payloads, taken, time.process_time() - cpu)
    finally:
        for channel in (plain, to_guarded, guarded):
            await channel.close()
        for server in servers:
            await server.stop(0)
    return cells


# -- sync ------------------------------------------------------------------------------------------


def _sync_stream(channel: grpc.Channel, data: pb.RecordEventsRequest, seconds: float) -> tuple[int, float]:
    """_aio_stream for a sync channel: the request iterator is fed one payload per response."""
    outbox: queue.SimpleQueue[pb.RecordEventsRequest | None] = queue.SimpleQueue()

    def requests() -> Iterator[pb.RecordEventsRequest]:
        while (item := outbox.get()) is not None:
            yield item

    outbox.put(METADATA)
    responses = pb_grpc.TelemeteryGatewayServiceStub(channel).RecordEvents(requests(), timeout=600)
    payloads = 0
    start = time.perf_counter()
    stop_at = start + seconds
    try:
        while time.perf_counter() < stop_at:
            outbox.put(data)
            next(responses)
            payloads += 1
        taken = time.perf_counter() - start
    finally:
        outbox.put(None)
    for _ in responses:
        pass
    return payloads, taken


def _sync_cells(data: pb.RecordEventsRequest, rounds: int, seconds: float) -> dict[str, tuple[Cell, Cell]]:
    policy = default_policy()
    servers = []
    ports = {}
    guarding: list[grpc.ServerInterceptor] = [GuardServerInterceptor(policy)]
    for name, interceptors in (("plain", []), ("guarded", guarding)):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        server.add_generic_rpc_handlers((_service(_sync_record_events),))
        ports[name] = server.add_insecure_port(f"{HOST}:0")
        server.start()
        servers.append(server)
    plain = grpc.insecure_channel(f"{HOST}:{ports['plain']}")
    to_guarded = grpc.insecure_channel(f"{HOST}:{ports['guarded']}")
    guarded = wrap_channel(grpc.insecure_channel(f"{HOST}:{ports['plain']}"), policy)
    cells = {"sync server": (Cell(), Cell()), "sync channel": (Cell(), Cell())}
    runs: dict[str, tuple[grpc.Channel, grpc.Channel]] = {
        "sync server": (plain, to_guarded),
        "sync channel": (plain, guarded),
    }
    try:
        for base, guard in runs.values():  # warm-up, not measured
            _sync_stream(base, data, seconds / 4)
            _sync_stream(guard, data, seconds / 4)
        for _ in range(rounds):
            for name, channels in runs.items():
                for cell, channel in zip(cells[name], channels, strict=True):
                    cpu = time.process_time()
                    payloads, taken = _sync_stream(channel, data, seconds)
                    cell.add(payloads, taken, time.process_time() - cpu)
    finally:
        for channel in (plain, to_guarded, guarded):
            channel.close()
        for server in servers:
            server.stop(0)
    return cells


def _row(name: str, base: Cell, guarded: Cell) -> str:
    return (
        f"| {name} | {base.rate:,.0f} | {guarded.rate:,.0f} | {guarded.rate / base.rate:.2f} | "
        f"{base.cpu_us:,.0f} | {guarded.cpu_us:,.0f} | {guarded.cpu_us / base.cpu_us:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 1 s per cell")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per cell (default: 5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per round (default: 2)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 2.0)
    data = workload.batch(BATCH)
    print(
        f"# interceptors benchmark: Python {platform.python_version()}, grpcio {grpc.__version__}, protobuf "
        f"{google.protobuf.__version__}; one stream of {BATCH}-event payloads, one in flight, in one process; "
        f"{rounds} alternating round(s) of {seconds:g} s per cell (events/s: the median round)"
    )
    cells = asyncio.run(_aio_cells(data, rounds, seconds))
    cells.update(_sync_cells(data, rounds, seconds))
    print()
    print(
        "| guard on | without ev/s | with ev/s | with / without "
        "| without CPU us/payload | with CPU us/payload | CPU ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (base, guarded) in cells.items():
        print(_row(name, base, guarded))
    worst = min(guarded.rate / base.rate for base, guarded in cells.values())
    print()
    verdict = "met" if worst >= TARGET else "NOT met"
    print(f"with / without events/s at worst: {worst:.2f} (target {TARGET:.2f}: {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
