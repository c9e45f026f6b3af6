"""The interceptors' cost: the same traffic with and without the guard, in one process, in one run.

    python -m bench.interceptors                      # five alternating rounds of 2 s per cell
    python -m bench.interceptors --quick              # one round of 1 s per cell (a smoke run, noisier)
    python -m bench.interceptors --rpc RecordEvents   # one RPC only (repeat --rpc for more)

Four sides, each the guard on one end of a call against the same call without it:

- grpc.aio server:  grpc.aio.server(interceptors=[AsyncGuardServerInterceptor(policy)])
- grpc.aio channel: grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors(policy))
- sync server:      grpc.server(executor, interceptors=[GuardServerInterceptor(policy)])
- sync channel:     wrap_channel(grpc.insecure_channel(target), policy)

and on each side the three RPCs, as exporters send them, on 127.0.0.1:

- RecordEvents: one stream as a licensed instance, 100-event batches from bench/workload.py (marketing and
  private metadata included, so the policy has work to do), one payload in flight (send, wait for its
  acknowledgement, send the next); events/s, CPU per payload.
- RecordEvent: one event per call as a managed service (bearer token present), the same events one by one,
  one call in flight; events/s, CPU per call.
- PublishInstanceUserMetadata: calls of 10 payloads of 100 users each as a licensed instance (client
  streaming: the answer comes when the call ends), one call in flight; users/s, CPU per payload.

The policy is the default one, with user metadata enabled (user_fields without primary_email) for the third
RPC, which the default refuses. The servicer is the generated one (messages, not bytes): it parses each request
as a gateway does and acknowledges every event. The audit logger is left as a library user's process leaves it
unless they configure logging: at WARNING, so no decision line is written (refusals would be). Baseline and
guarded alternate round by round, so that the shared cores' noise hits both alike; the rate is the median of
the rounds, CPU per message (the whole process: client, server and grpc's threads) is over all rounds.
Target (issue 14): guarded at least 0.9 of the baseline's rate.

One more row per RPC, the floor of the grpc.aio channel: the same channel with do-nothing interceptors
(each awaits its continuation and returns) against the plain one. grpc.aio runs every intercepted call
through its own machinery (a task per call; a stream's writes through a queue and asyncio.wait), so this is
the most any interceptor, the guard included, can reach on that side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import queue
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
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
from telemetry_guard.policy import Policy, load_policy
from telemetry_guard.policy.kinds import SERVICE
from telemetry_guard.policy.loader import default_policy_path
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
BATCH = 100  # events per RecordEvents payload, users per user metadata payload
PAYLOADS_PER_CALL = 10  # PublishInstanceUserMetadata
TARGET = 0.9  # the target: guarded rate >= 90% of the same traffic without the guard
RPCS = ("RecordEvents", "RecordEvent", "PublishInstanceUserMetadata")
UNITS = {"RecordEvents": "events", "RecordEvent": "events", "PublishInstanceUserMetadata": "users"}
BEARER = (("authorization", "Bearer bench"),)

LICENSED = pb.Identifier(
    licensed_instance=pb.Identifier.LicensedInstanceIdentifier(license_key="key", instance_id="bench")
)
METADATA = pb.RecordEventsRequest(metadata=pb.RecordEventsRequestMetadata(request_id="bench", identifier=LICENSED))
USERS_METADATA = pb.PublishInstanceUserMetadataRequest(
    metadata=pb.PublishInstanceUserMetadataRequestMetadata(request_id="bench", identifier=LICENSED)
)


def bench_policy() -> Policy:
    """The default policy with user metadata enabled (primary_email withheld), from a temporary copy."""
    text = default_policy_path().read_text()
    enabled = "user_metadata:\n  enabled: true\n  user_fields: [id, username, assigned_rbac_roles]\n"
    changed = text.replace("user_metadata:\n  enabled: false", enabled.rstrip("\n"), 1)
    if changed == text:
        raise RuntimeError("the default policy's user_metadata section has changed: update bench_policy()")
    folder = tempfile.TemporaryDirectory()  # kept until the process ends: lint reads the file again
    _KEPT.append(folder)
    path = Path(folder.name) / "bench.yaml"
    path.write_text(changed)
    return load_policy(path)


_KEPT: list[tempfile.TemporaryDirectory[str]] = []


def unary_requests() -> list[pb.RecordEventRequest]:
    """The workload's events, one RecordEvent request each, as a managed service."""
    service = pb.Identifier(managed_service=pb.Identifier.ManagedServiceIdentifier(service_id="bench"))
    metadata = pb.RecordEventsRequestMetadata(request_id="bench", identifier=service)
    return [pb.RecordEventRequest(metadata=metadata, event=event) for event in workload.events(BATCH)]


def users_payload() -> pb.PublishInstanceUserMetadataRequest:
    request = pb.PublishInstanceUserMetadataRequest()
    for i in range(BATCH):
        request.user_metadata.users.add(
            id=i + 1, username=f"user-{i}", primary_email=f"user-{i}@example.com", assigned_rbac_roles=["USER"]
        )
    return request


@dataclass
class Cell:
    """One side of a comparison, added up over its rounds."""

    rates: list[float] = field(default_factory=list)  # units/s of each round
    messages: int = 0  # payloads (or unary calls) sent
    cpu: float = 0.0  # process CPU seconds

    def add(self, units: int, messages: int, seconds: float, cpu: float) -> None:
        self.rates.append(units / seconds)
        self.messages += messages
        self.cpu += cpu

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(1, self.messages) * 1e6


# -- the servicer (the generated shapes: messages in and out) ------------------------------------------


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


def _record_event(request: pb.RecordEventRequest, context: Any) -> pb.RecordEventResponse:
    if not request.event.id:
        raise ValueError("an event without an id")
    return pb.RecordEventResponse()


async def _aio_record_event(request: pb.RecordEventRequest, context: Any) -> pb.RecordEventResponse:
    return _record_event(request, context)


async def _aio_publish(
    requests: AsyncIterator[pb.PublishInstanceUserMetadataRequest], context: Any
) -> pb.PublishInstanceUserMetadataResponse:
    async for _ in requests:
        pass
    return pb.PublishInstanceUserMetadataResponse()


def _sync_publish(
    requests: Iterator[pb.PublishInstanceUserMetadataRequest], context: Any
) -> pb.PublishInstanceUserMetadataResponse:
    for _ in requests:
        pass
    return pb.PublishInstanceUserMetadataResponse()


def _service(record_events: Any, record_event: Any, publish: Any) -> grpc.GenericRpcHandler:
    """The three RPCs as the generated code registers them."""
    handlers: dict[str, Any] = {
        "RecordEvents": grpc.stream_stream_rpc_method_handler(
            record_events,
            request_deserializer=pb.RecordEventsRequest.FromString,
            response_serializer=pb.RecordEventsResponse.SerializeToString,
        ),
        "RecordEvent": grpc.unary_unary_rpc_method_handler(
            record_event,
            request_deserializer=pb.RecordEventRequest.FromString,
            response_serializer=pb.RecordEventResponse.SerializeToString,
        ),
        "PublishInstanceUserMetadata": grpc.stream_unary_rpc_method_handler(
            publish,
            request_deserializer=pb.PublishInstanceUserMetadataRequest.FromString,
            response_serializer=pb.PublishInstanceUserMetadataResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


# -- the clients: (units, messages, seconds taken) for `seconds` of one RPC's traffic ------------------
#
# Each is one step repeated until the time is up (a payload and its answer, a call), one in flight.

Traffic = tuple[int, int, float]


def _timed(step: Callable[[], object], seconds: float) -> tuple[int, float]:
    """(steps, seconds taken): `step` run again and again for `seconds`."""
    steps = 0
    start = time.perf_counter()
    stop_at = start + seconds
    while time.perf_counter() < stop_at:
        step()
        steps += 1
    return steps, time.perf_counter() - start


async def _timed_async(step: Callable[[], Awaitable[object]], seconds: float) -> tuple[int, float]:
    """_timed for a coroutine step."""
    steps = 0
    start = time.perf_counter()
    stop_at = start + seconds
    while time.perf_counter() < stop_at:
        await step()
        steps += 1
    return steps, time.perf_counter() - start


async def _aio_record_events_client(channel: grpc.aio.Channel, seconds: float) -> Traffic:
    """Payloads sent one at a time on one stream."""
    data = workload.batch(BATCH)
    call: Any = pb_grpc.TelemeteryGatewayServiceStub(channel).RecordEvents(timeout=600)
    await call.write(METADATA)

    async def payload() -> None:
        await call.write(data)
        if await call.read() is grpc.aio.EOF:
            raise RuntimeError(f"stream ended early: {await call.code()} {await call.details()}")

    payloads, taken = await _timed_async(payload, seconds)
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    return payloads * BATCH, payloads, taken


async def _aio_record_event_client(channel: grpc.aio.Channel, seconds: float) -> Traffic:
    """One call at a time, one event each."""
    requests = itertools.cycle(unary_requests())
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    calls, taken = await _timed_async(lambda: stub.RecordEvent(next(requests), metadata=BEARER, timeout=60), seconds)
    return calls, calls, taken


async def _aio_publish_client(channel: grpc.aio.Channel, seconds: float) -> Traffic:
    """Calls of PAYLOADS_PER_CALL payloads, one at a time."""
    payload = users_payload()
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)

    async def publish() -> None:
        call: Any = stub.PublishInstanceUserMetadata(timeout=60)
        await call.write(USERS_METADATA)
        for _ in range(PAYLOADS_PER_CALL):
            await call.write(payload)
        await call.done_writing()
        await call

    calls, taken = await _timed_async(publish, seconds)
    return calls * PAYLOADS_PER_CALL * BATCH, calls * PAYLOADS_PER_CALL, taken


AIO_CLIENTS: dict[str, Callable[[grpc.aio.Channel, float], Awaitable[Traffic]]] = {
    "RecordEvents": _aio_record_events_client,
    "RecordEvent": _aio_record_event_client,
    "PublishInstanceUserMetadata": _aio_publish_client,
}


def _sync_record_events_client(channel: grpc.Channel, seconds: float) -> Traffic:
    """As the aio client: the request iterator is fed one payload per response."""
    data = workload.batch(BATCH)
    outbox: queue.SimpleQueue[pb.RecordEventsRequest | None] = queue.SimpleQueue()

    def requests() -> Iterator[pb.RecordEventsRequest]:
        while (item := outbox.get()) is not None:
            yield item

    outbox.put(METADATA)
    responses = pb_grpc.TelemeteryGatewayServiceStub(channel).RecordEvents(requests(), timeout=600)

    def payload() -> None:
        outbox.put(data)
        next(responses)

    try:
        payloads, taken = _timed(payload, seconds)
    finally:
        outbox.put(None)
    for _ in responses:
        pass
    return payloads * BATCH, payloads, taken


def _sync_record_event_client(channel: grpc.Channel, seconds: float) -> Traffic:
    requests = itertools.cycle(unary_requests())
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    calls, taken = _timed(lambda: stub.RecordEvent(next(requests), metadata=BEARER, timeout=60), seconds)
    return calls, calls, taken


def _sync_publish_client(channel: grpc.Channel, seconds: float) -> Traffic:
    messages = [USERS_METADATA] + [users_payload()] * PAYLOADS_PER_CALL
    stub = pb_grpc.TelemeteryGatewayServiceStub(channel)
    calls, taken = _timed(lambda: stub.PublishInstanceUserMetadata(iter(messages), timeout=60), seconds)
    return calls * PAYLOADS_PER_CALL * BATCH, calls * PAYLOADS_PER_CALL, taken


SYNC_CLIENTS: dict[str, Callable[[grpc.Channel, float], Traffic]] = {
    "RecordEvents": _sync_record_events_client,
    "RecordEvent": _sync_record_event_client,
    "PublishInstanceUserMetadata": _sync_publish_client,
}


# -- the cells: each side's traffic with and without the guard, in alternating rounds ---------------------

Cells = dict[tuple[str, str], tuple[Cell, Cell]]


def _measure(
    sides: dict[str, tuple[Any, Any]], rpcs: list[str], rounds: int, seconds: float, run: Callable[..., Traffic]
) -> Cells:
    """Each (side, RPC) without and with the guard, alternating round by round after a warm-up;
    sides: name -> (channel without the guard, channel with it); run(channel, rpc, seconds)."""
    cells = {(side, rpc): (Cell(), Cell()) for side in sides for rpc in rpcs}
    for side, rpc in cells:
        for channel in sides[side]:  # warm-up, not measured
            run(channel, rpc, seconds / 4)
    for _ in range(rounds):
        for (side, rpc), pair in cells.items():
            for cell, channel in zip(pair, sides[side], strict=True):
                cpu = time.process_time()
                units, messages, taken = run(channel, rpc, seconds)
                cell.add(units, messages, taken, time.process_time() - cpu)
    return cells


class _NoOpStreamStream(grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(details, request_iterator)


class _NoOpUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(details, request)


class _NoOpStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(details, request_iterator)


FLOOR = "grpc.aio channel, do-nothing interceptors (the floor)"


def _aio_cells(policy: Policy, rpcs: list[str], rounds: int, seconds: float) -> Cells:
    loop = asyncio.new_event_loop()  # driven step by step, so that _measure serves both kinds of client
    asyncio.set_event_loop(loop)  # grpc.aio binds servers and channels to the current loop
    servers = []
    ports = {}
    for name, interceptors in (("plain", []), ("guarded", [AsyncGuardServerInterceptor(policy)])):
        server = grpc.aio.server(interceptors=interceptors)
        server.add_generic_rpc_handlers((_service(_aio_record_events, _aio_record_event, _aio_publish),))
        ports[name] = server.add_insecure_port(f"{HOST}:0")
        loop.run_until_complete(server.start())
        servers.append(server)

    async def channels() -> tuple[grpc.aio.Channel, ...]:  # made in the loop they run in
        no_ops = [_NoOpStreamStream(), _NoOpUnaryUnary(), _NoOpStreamUnary()]
        return (
            grpc.aio.insecure_channel(f"{HOST}:{ports['plain']}"),
            grpc.aio.insecure_channel(f"{HOST}:{ports['guarded']}"),
            grpc.aio.insecure_channel(f"{HOST}:{ports['plain']}", interceptors=aio_client_interceptors(policy)),
            grpc.aio.insecure_channel(f"{HOST}:{ports['plain']}", interceptors=no_ops),
        )

    plain, to_guarded, guarded, no_op = loop.run_until_complete(channels())
    sides = {"grpc.aio server": (plain, to_guarded), "grpc.aio channel": (plain, guarded), FLOOR: (plain, no_op)}
    try:
        return _measure(
            sides, rpcs, rounds, seconds, lambda ch, rpc, s: loop.run_until_complete(AIO_CLIENTS[rpc](ch, s))
        )
    finally:
        for channel in (plain, to_guarded, guarded, no_op):
            loop.run_until_complete(channel.close())
        for server in servers:
            loop.run_until_complete(server.stop(0))
        asyncio.set_event_loop(None)
        loop.close()


def _sync_cells(policy: Policy, rpcs: list[str], rounds: int, seconds: float) -> Cells:
    servers = []
    ports = {}
    guarding: list[grpc.ServerInterceptor] = [GuardServerInterceptor(policy)]
    for name, interceptors in (("plain", []), ("guarded", guarding)):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
        server.add_generic_rpc_handlers((_service(_sync_record_events, _record_event, _sync_publish),))
        ports[name] = server.add_insecure_port(f"{HOST}:0")
        server.start()
        servers.append(server)
    plain = grpc.insecure_channel(f"{HOST}:{ports['plain']}")
    to_guarded = grpc.insecure_channel(f"{HOST}:{ports['guarded']}")
    guarded = wrap_channel(grpc.insecure_channel(f"{HOST}:{ports['plain']}"), policy)
    sides = {"sync server": (plain, to_guarded), "sync channel": (plain, guarded)}
    try:
        return _measure(sides, rpcs, rounds, seconds, lambda ch, rpc, s: SYNC_CLIENTS[rpc](ch, s))
    finally:
        for channel in (plain, to_guarded, guarded):
            channel.close()
        for server in servers:
            server.stop(0)


def _row(side: str, rpc: str, base: Cell, guarded: Cell) -> str:
    return (
        f"| {side} | {rpc} | {base.rate:,.0f} {UNITS[rpc]}/s | {guarded.rate:,.0f} | {guarded.rate / base.rate:.2f} | "
        f"{base.cpu_us:,.0f} | {guarded.cpu_us:,.0f} | {guarded.cpu_us / base.cpu_us:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 1 s per cell")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per cell (default: 5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per round (default: 2)")
    parser.add_argument("--rpc", action="append", choices=RPCS, help="only this RPC (repeat; default: all three)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 2.0)
    rpcs = [rpc for rpc in RPCS if rpc in (args.rpc or RPCS)]
    policy = bench_policy()
    print(
        f"# interceptors benchmark: Python {platform.python_version()}, grpcio {grpc.__version__}, protobuf "
        f"{google.protobuf.__version__}; in one process, one call or payload in flight; {BATCH} events or users "
        f"per payload; {rounds} alternating round(s) of {seconds:g} s per cell (rates: the median round)"
    )
    print("# reproduce: python -m bench.interceptors")
    cells = _aio_cells(policy, rpcs, rounds, seconds)
    cells.update(_sync_cells(policy, rpcs, rounds, seconds))
    print()
    print(
        "| guard on | RPC | without | with | with / without "
        "| without CPU us/message | with CPU us/message | CPU ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (side, rpc), (base, guarded) in cells.items():
        print(_row(side, rpc, base, guarded))
    print()
    for rpc in rpcs:
        worst = min(g.rate / b.rate for (side, name), (b, g) in cells.items() if name == rpc and side != FLOOR)
        verdict = "met" if worst >= TARGET else "NOT met"
        floor = cells[(FLOOR, rpc)]
        print(
            f"{rpc}: with / without at worst {worst:.2f} (target {TARGET:.2f}: {verdict}); "
            f"a grpc.aio channel with do-nothing interceptors: {floor[1].rate / floor[0].rate:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
