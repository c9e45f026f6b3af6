"""The embedded gateway: stands in for the Telemetry Gateway when serve has no --upstream.

It accepts all three RPCs, acknowledges every event it receives and writes each request message
as one JSON line (protobuf JSON, field names as in the proto) to a file or stdout:

    {"rpc": "RecordEvents", "call": 3, "request": {"events": {"events": [...]}}}

`call` numbers the calls, so the lines of one stream can be grouped. It never checks the
stream protocol or credentials (the sidecar in front of it does) and never writes the call's
metadata (the authorization token stays out of the file). It runs on a grpc.aio server of its
own on 127.0.0.1, so that the sidecar forwards to it over real gRPC, exactly as it forwards to
a real gateway.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import IO, TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message

from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

Sink = Callable[[str, int, Message], None]  # (rpc, call number, request message as received)


def record(rpc: str, call: int, message: Message) -> dict[str, Any]:
    """The JSON line of one request message."""
    return {"rpc": rpc, "call": call, "request": json_format.MessageToDict(message, preserving_proto_field_name=True)}


class JsonLines:
    """A sink writing one JSON line per record to a file (appending) or to stdout ("-")."""

    def __init__(self, target: str = "-") -> None:
        self._lock = threading.Lock()
        self._owned: IO[str] | None = None
        if target == "-":
            self._out: IO[str] = sys.stdout
        else:
            # O_APPEND: the workers of one sidecar may share the file; each line is one write.
            self._owned = self._out = open(target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self.target = target

    def __call__(self, rpc: str, call: int, message: Message) -> None:
        line = json.dumps(record(rpc, call, message), separators=(",", ":")) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


class EmbeddedGateway(pb_grpc.TelemeteryGatewayServiceServicer):
    """Acknowledges every event; hands every request message to `sink`."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._calls = itertools.count(1)

    async def RecordEvents(
        self, request_iterator: AsyncIterator[pb.RecordEventsRequest], context: Context
    ) -> AsyncIterator[pb.RecordEventsResponse]:
        call = next(self._calls)
        async for request in request_iterator:
            self._sink("RecordEvents", call, request)
            if request.WhichOneof("payload") == "events":
                yield pb.RecordEventsResponse(succeeded_events=[event.id for event in request.events.events])

    async def RecordEvent(self, request: pb.RecordEventRequest, context: Context) -> pb.RecordEventResponse:
        self._sink("RecordEvent", next(self._calls), request)
        return pb.RecordEventResponse()

    async def PublishInstanceUserMetadata(
        self, request_iterator: AsyncIterator[pb.PublishInstanceUserMetadataRequest], context: Context
    ) -> pb.PublishInstanceUserMetadataResponse:
        call = next(self._calls)
        async for request in request_iterator:
            self._sink("PublishInstanceUserMetadata", call, request)
        return pb.PublishInstanceUserMetadataResponse()


async def start(sink: Sink, max_message_bytes: int, host: str = "127.0.0.1") -> tuple[grpc.aio.Server, int]:
    """The embedded gateway on host:<ephemeral port>, started; (server, port)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(EmbeddedGateway(sink), server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    return server, port
