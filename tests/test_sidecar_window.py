"""The sidecar's window: at most `window` events payloads per stream go upstream unanswered.

In process, over loopback: a Forwarder with a window of 2 between a grpc.aio client and an upstream
that answers only when the test lets it. The client writes every payload at once; the upstream must
see the window's worth, one more for each answer, and in the end every payload, answered in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from test_sidecar_support import POLICY, TIMEOUT, event, metadata, payload

from telemetry_guard.interceptors.audit import AuditLog
from telemetry_guard.interceptors.guard import Guard
from telemetry_guard.policy import Engine, load_policy
from telemetry_guard.policy.kinds import SERVICE
from telemetry_guard.sidecar.forward import Forwarder
from telemetry_guard.sidecar.metrics import Metrics
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

WINDOW = 2
PAYLOADS = 5
HOST = "127.0.0.1"


class HeldUpstream:
    """RecordEvents that records each request and answers an events payload only once released."""

    def __init__(self) -> None:
        self.requests: list[pb.RecordEventsRequest] = []
        self.answers = asyncio.Semaphore(0)
        self.changed = asyncio.Event()

    async def record_events(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        waiting: asyncio.Queue[pb.RecordEventsRequest | None] = asyncio.Queue()

        async def read() -> None:  # every request as it comes, answered or not
            async for raw in requests:
                request = pb.RecordEventsRequest.FromString(raw)
                self.requests.append(request)
                self.changed.set()
                if request.WhichOneof("payload") == "events":
                    waiting.put_nowait(request)
            waiting.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (request := await waiting.get()) is not None:
                await self.answers.acquire()
                ids = [e.id for e in request.events.events]
                yield pb.RecordEventsResponse(succeeded_events=ids).SerializeToString()
        finally:
            reader.cancel()

    def payloads(self) -> int:
        return sum(r.WhichOneof("payload") == "events" for r in self.requests)

    async def until(self, count: int) -> None:
        """Until the upstream has received `count` events payloads (bounded by TIMEOUT)."""

        async def wait() -> None:
            while self.payloads() < count:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), TIMEOUT)


async def _serve(handler: grpc.GenericRpcHandler) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    return server, port


async def _window(engine: Engine) -> tuple[list[int], list[list[str]], Metrics]:
    upstream = HeldUpstream()
    upstream_server, upstream_port = await _serve(
        grpc.method_handlers_generic_handler(
            SERVICE, {"RecordEvents": grpc.stream_stream_rpc_method_handler(upstream.record_events)}
        )
    )
    metrics = Metrics()
    guard = Guard(engine, audit=AuditLog(), side="server", tally=metrics.tally)
    channel = grpc.aio.insecure_channel(f"{HOST}:{upstream_port}")
    sidecar, sidecar_port = await _serve(Forwarder(channel, lambda: guard, metrics, window=WINDOW).handler())
    client = grpc.aio.insecure_channel(f"{HOST}:{sidecar_port}")
    seen: list[int] = []
    try:
        call: Any = client.stream_stream(f"/{SERVICE}/RecordEvents")(timeout=TIMEOUT * 3)
        await call.write(metadata("unlicensed_instance").SerializeToString())
        for n in range(PAYLOADS):
            await call.write(payload(event(f"e{n}")).SerializeToString())
        await call.done_writing()
        await upstream.until(WINDOW)
        await asyncio.sleep(0.2)  # room for a payload beyond the window to arrive, were it sent
        seen.append(upstream.payloads())
        upstream.answers.release()  # one answer: room for one more
        await upstream.until(WINDOW + 1)
        await asyncio.sleep(0.2)
        seen.append(upstream.payloads())
        for _ in range(PAYLOADS):
            upstream.answers.release()
        responses = []
        while (response := await asyncio.wait_for(call.read(), TIMEOUT)) is not grpc.aio.EOF:
            responses.append(list(pb.RecordEventsResponse.FromString(response).succeeded_events))
        assert await call.code() == grpc.StatusCode.OK
        seen.append(upstream.payloads())
        return seen, responses, metrics
    finally:
        await client.close()
        await sidecar.stop(0)
        await channel.close()
        await upstream_server.stop(0)


def test_at_most_the_window_of_payloads_waits_upstream_unanswered(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    seen, responses, metrics = asyncio.run(_window(Engine(load_policy(path))))
    assert seen == [WINDOW, WINDOW + 1, PAYLOADS]
    assert responses == [[f"e{n}"] for n in range(PAYLOADS)]
    # Each payload's round trip observed once, published by the call's end; the first two waited two holds.
    latency = metrics.registry.get_sample_value
    assert latency("telemetry_guard_upstream_latency_seconds_count", {"rpc": "RecordEvents"}) == PAYLOADS
    assert (latency("telemetry_guard_upstream_latency_seconds_sum", {"rpc": "RecordEvents"}) or 0) >= 2 * 0.2
