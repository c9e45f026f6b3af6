"""What the sidecar tests share: the real `telemetry-guard serve` process, a recording upstream, clients.

- Sidecar: `python -m telemetry_guard serve --listen 127.0.0.1:0 ...` as a subprocess, its JSON
  logs in a file; the bound port is read from its "serving" log line. Always killed on exit.
- Upstream: a grpc.server on 127.0.0.1 recording every call it receives (messages, metadata,
  deadline, how the call ended); it acknowledges every event but `fail_ids`, and can abort a
  RecordEvents stream after some payloads.
- Builders for identifiers, events and requests, and a lockstep client for RecordEvents.

Every wait is bounded (TIMEOUT); everything listens on 127.0.0.1 only. This module holds no tests.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent
SERVICE = "telemetrygateway.v1.TelemeteryGatewayService"
TOKEN = "tok-good"
BEARER = (("authorization", f"Bearer {TOKEN}"),)

# Values the test policy removes: none may appear upstream, in a log line or in an error message.
SECRETS = (
    "SECRET-PRIVATE-VALUE",
    "https://secret.example.com/marketing",
    "secret-cohort",
    "SECRET-IN-DROPPED-EVENT",
    "SECRET-UNKNOWN-FIELD",
    "secret@example.com",
    "SECRET-ANONYMOUS-ID",
    "987654321",  # a number under an allowlisted key (non_string: drop)
    "SECRET-ORG-NAME-NOT",  # an organization display_name (the policy keeps id and name)
)

POLICY = """\
version: 1
allowlists: [builtin:sourcegraph]
access:
  RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]
  RecordEvent: [managed_service, workspace]
  PublishInstanceUserMetadata: [licensed_instance, unlicensed_instance]
credentials:
  required_for: [managed_service, workspace]
user_metadata:
  enabled: true
  user_fields: [id, username]
  organization_fields: [id, name]
defaults:
  marketing_tracking: drop
  private_metadata: {mode: allowlist, non_string: drop}
  events: {include: ["*"], exclude: ["internal.*"]}
  invalid_events: drop
  unknown_fields: discard
  legacy_metadata: merge
  drop_fields: [user.anonymous_user_id]
"""

# Every call a test makes carries `x-test: <tag>` (a client interceptor); the sidecars of these tests
# pass it upstream (--forward-metadata), and the upstream counts only the calls of the current tag:
# a call that a previous test left behind cannot be counted in the next test.
TAG_KEY = "x-test"
FORWARD_TAG = ["--forward-metadata", "authorization", "--forward-metadata", TAG_KEY]
CURRENT = {"tag": ""}

# Field 99 of Event, length-delimited: a field this proto does not know.
UNKNOWN_FIELD = b"\x9a\x06\x14SECRET-UNKNOWN-FIELD"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- messages ------------------------------------------------------------------------------


def identifier(kind: str) -> pb.Identifier:
    ident = pb.Identifier()
    if kind == "licensed_instance":
        ident.licensed_instance.license_key = "lic-key"
        ident.licensed_instance.instance_id = "inst-1"
    elif kind == "unlicensed_instance":
        ident.unlicensed_instance.instance_id = "inst-2"
    elif kind == "managed_service":
        ident.managed_service.service_id = "svc-1"
    elif kind == "workspace":
        ident.workspace.workspace_id = "ws-1"
    elif kind == "incomplete":
        ident.unlicensed_instance.instance_id = ""
        ident.unlicensed_instance.external_url = "https://x.example"
    elif kind != "none":
        raise ValueError(kind)
    return ident


def event(
    event_id: str,
    feature: str = "cody.completion",
    action: str = "accepted",
    *,
    private: dict[str, Any] | None = None,
    marketing: bool = False,
    unknown: bool = False,
    pad: int = 0,
) -> pb.Event:
    ev = pb.Event(id=event_id, feature=feature, action=action, timestamp=timestamp_pb2.Timestamp(seconds=1_700_000_000))
    ev.parameters.metadata["count"] = 1.0
    if private is not None:
        struct = struct_pb2.Struct()
        struct.update(private)
        ev.parameters.private_metadata.CopyFrom(struct)
    if marketing:
        ev.marketing_tracking.url = "https://secret.example.com/marketing"
        ev.marketing_tracking.cohort_id = "secret-cohort"
    if unknown:
        ev.MergeFromString(UNKNOWN_FIELD)
    if pad:
        ev.interaction.trace_id = "x" * pad
    return ev


def sensitive(event_id: str) -> pb.Event:
    """Allowlisted type (cody.completion) with something for every per-event rule of the test policy:
    a key not allowlisted, a non-string value under an allowlisted key, marketing, a dropped field
    (user.anonymous_user_id), legacy metadata to merge and an unknown field."""
    private = {"languageId": "go", "prompt": "SECRET-PRIVATE-VALUE", "otherCompletionProviders": 987654321}
    ev = event(event_id, private=private, marketing=True, unknown=True)
    ev.user.user_id = 7
    ev.user.anonymous_user_id = "SECRET-ANONYMOUS-ID"
    ev.parameters.legacy_metadata["legacyCount"] = 3
    return ev


def dropped(event_id: str) -> pb.Event:
    """Removed whole by the test policy's feature filter (internal.*)."""
    return event(event_id, feature="internal.debug", action="dumped", private={"blob": "SECRET-IN-DROPPED-EVENT"})


def invalid(event_id: str) -> pb.Event:
    """Removed whole by invalid_events: drop (the action does not match the gateway's pattern)."""
    return event(event_id, action="Not Valid!")


def metadata(kind: str, request_id: str = "req-1") -> pb.RecordEventsRequest:
    md = pb.RecordEventsRequestMetadata(request_id=request_id)
    if kind != "none":
        md.identifier.CopyFrom(identifier(kind))
    return pb.RecordEventsRequest(metadata=md)


def payload(*events: pb.Event) -> pb.RecordEventsRequest:
    request = pb.RecordEventsRequest()
    request.events.events.extend(events)
    return request


def record_event_request(kind: str, ev: pb.Event | None, request_id: str = "req-u") -> pb.RecordEventRequest:
    request = pb.RecordEventRequest(metadata=pb.RecordEventsRequestMetadata(request_id=request_id))
    if kind != "none":
        request.metadata.identifier.CopyFrom(identifier(kind))
    if ev is not None:
        request.event.CopyFrom(ev)
    return request


def publish_metadata(kind: str, request_id: str = "req-p") -> pb.PublishInstanceUserMetadataRequest:
    return pb.PublishInstanceUserMetadataRequest(
        metadata=pb.PublishInstanceUserMetadataRequestMetadata(request_id=request_id, identifier=identifier(kind))
    )


def users() -> pb.PublishInstanceUserMetadataRequest:
    request = pb.PublishInstanceUserMetadataRequest()
    request.user_metadata.users.add(id=1, username="alice", primary_email="secret@example.com")
    return request


def organizations() -> pb.PublishInstanceUserMetadataRequest:
    request = pb.PublishInstanceUserMetadataRequest()
    request.organization_metadata.organizations.add(id=5, name="acme", display_name="SECRET-ORG-NAME-NOT")
    return request


# -- the recording upstream ------------------------------------------------------------------


@dataclass
class UpstreamCall:
    rpc: str
    metadata: dict[str, str | bytes]
    time_remaining: float | None
    messages: list[Any] = field(default_factory=list)
    completed: bool = False  # the request stream ended normally (half-close), not cancelled
    ended: threading.Event = field(default_factory=threading.Event)  # the RPC terminated, for any reason

    def events(self) -> list[pb.Event]:
        found: list[pb.Event] = []
        for message in self.messages:
            if isinstance(message, pb.RecordEventsRequest) and message.WhichOneof("payload") == "events":
                found.extend(message.events.events)
            elif isinstance(message, pb.RecordEventRequest):
                found.append(message.event)
        return found


class Upstream(pb_grpc.TelemeteryGatewayServiceServicer):
    """A gateway that records. Configure fail_ids / abort_after / abort_code / delay per test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[UpstreamCall] = []
        self.reset()

    def reset(self, tag: str = "") -> None:
        """Forget every call; count only the calls tagged `tag` from now on (and tag the clients)."""
        CURRENT["tag"] = tag
        with self.lock:
            self.calls = []
        self.fail_ids: set[str] = set()
        self.abort_after: int | None = None  # abort RecordEvents after answering this many payloads
        self.abort_code = grpc.StatusCode.DATA_LOSS
        self.abort_details = "upstream broke on purpose"
        self.delay = 0.0  # seconds before answering each payload
        self.linger = 0.0  # seconds RecordEvents waits after its requests end, before it ends the call

    def _start(self, rpc: str, context: grpc.ServicerContext) -> UpstreamCall:
        md = {item[0]: item[1] for item in context.invocation_metadata() or ()}
        call = UpstreamCall(rpc, md, context.time_remaining())
        context.add_callback(call.ended.set)
        with self.lock:
            self.calls.append(call)
        return call

    def received(self, rpc: str | None = None) -> list[UpstreamCall]:
        tag = CURRENT["tag"]
        with self.lock:
            return [
                c for c in self.calls if (rpc is None or c.rpc == rpc) and (not tag or c.metadata.get(TAG_KEY) == tag)
            ]

    def events(self) -> list[pb.Event]:
        return [e for c in self.received() for e in c.events()]

    def RecordEvents(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        call = self._start("RecordEvents", context)
        answered = 0
        for request in request_iterator:
            call.messages.append(request)
            if request.WhichOneof("payload") != "events":
                continue
            if self.abort_after is not None and answered >= self.abort_after:
                context.abort(self.abort_code, self.abort_details)
            if self.delay:
                time.sleep(self.delay)
            answered += 1
            yield pb.RecordEventsResponse(
                succeeded_events=[e.id for e in request.events.events if e.id not in self.fail_ids]
            )
        if self.linger:  # a cancelled call's iterator may just end: its cancellation comes a moment later
            time.sleep(self.linger)
        call.completed = context.is_active()

    def RecordEvent(self, request: Any, context: grpc.ServicerContext) -> Any:
        call = self._start("RecordEvent", context)
        call.messages.append(request)
        call.completed = True
        return pb.RecordEventResponse()

    def PublishInstanceUserMetadata(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        call = self._start("PublishInstanceUserMetadata", context)
        call.messages.extend(request_iterator)
        call.completed = True
        return pb.PublishInstanceUserMetadataResponse()


@dataclass
class ServedUpstream:
    servicer: Upstream
    server: grpc.Server
    port: int

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def stop(self) -> None:
        self.server.stop(None)


def serve_upstream(credentials: grpc.ServerCredentials | None = None) -> ServedUpstream:
    servicer = Upstream()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 16 * 1024 * 1024), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(servicer, server)
    address = f"{HOST}:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return ServedUpstream(servicer, server, port)


@pytest.fixture(scope="module", name="upstream")
def module_upstream() -> Iterator[ServedUpstream]:
    """One recording upstream for a whole module, under the name `upstream` (conftest's is per test): a
    module that starts its sidecars once imports this (`from test_sidecar_support import module_upstream`)."""
    served = serve_upstream()
    yield served
    served.stop()


# -- the sidecar process ---------------------------------------------------------------------


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Tagger(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds `x-test: <current tag>` to every call (sync interceptors may implement several kinds)."""

    @staticmethod
    def _tagged(details: Any) -> _Details:
        metadata = [*(details.metadata or ()), (TAG_KEY, CURRENT["tag"] or "none")]
        return _Details(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._tagged(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._tagged(details), requests)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._tagged(details), requests)


class Sidecar:
    """`telemetry-guard serve` as a subprocess; its JSON logs (stderr) in `log_path`."""

    def __init__(self, args: Sequence[str], tmp: Path, *, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"sidecar-{time.monotonic_ns()}.log"
        self.out_path = self.log_path.with_suffix(".out")
        command = [sys.executable, "-m", "telemetry_guard", "serve", "--listen", f"{HOST}:0", *args]
        with open(self.log_path, "wb") as err, open(self.out_path, "wb") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})}
            )
        self.port = 0
        self._channels: list[grpc.Channel] = []
        try:
            serving = wait_for(lambda: self._serving(workers), timeout=20, what=f"{workers} 'serving' log line(s)")
        except AssertionError:
            self.kill()
            raise AssertionError(f"sidecar did not start:\n{self.log_path.read_text()}") from None
        self.port = serving[0]["port"]

    def _serving(self, count: int) -> list[dict[str, Any]]:
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        found = self.logs(message="serving")
        return found if len(found) >= count else []

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    def logs(self, **match: Any) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if all(record.get(key) == value for key, value in match.items()):
                records.append(record)
        return records

    def log_text(self) -> str:
        return self.log_path.read_text()

    def channel(self, credentials: grpc.ChannelCredentials | None = None, **options: Any) -> grpc.Channel:
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1), *options.items()]
        if credentials is not None:
            channel = grpc.secure_channel(self.target, credentials, options=opts)
        else:
            channel = grpc.insecure_channel(self.target, options=opts)
        self._channels.append(channel)
        return grpc.intercept_channel(channel, _Tagger())

    def stub(self) -> pb_grpc.TelemeteryGatewayServiceStub:
        return pb_grpc.TelemeteryGatewayServiceStub(self.channel())

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        for channel in self._channels:
            channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Any]

    @property
    def acked(self) -> set[str]:
        return {i for r in self.responses for i in getattr(r, "succeeded_events", ())}


def record_events(
    stub: pb_grpc.TelemeteryGatewayServiceStub,
    requests: Sequence[Any],
    metadata: tuple[tuple[str, str | bytes], ...] = (),
    timeout: float = TIMEOUT,
) -> Outcome:
    responses: list[Any] = []
    try:
        for response in stub.RecordEvents(iter(requests), metadata=metadata, timeout=timeout):
            responses.append(response)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", responses)
    return Outcome(grpc.StatusCode.OK, "", responses)


def unary(call: Callable[..., Any], request: Any, metadata: tuple[tuple[str, str | bytes], ...] = ()) -> Outcome:
    try:
        response = call(request, metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", [])
    return Outcome(grpc.StatusCode.OK, "", [response])


class Lockstep:
    """A RecordEvents stream driven message by message: send(), then next_response()."""

    _END = object()

    def __init__(
        self,
        stub: pb_grpc.TelemeteryGatewayServiceStub,
        metadata: tuple[tuple[str, str | bytes], ...] = (),
        timeout: float = 30,
    ) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self.call = stub.RecordEvents(self._requests(), metadata=metadata, timeout=timeout)

    def _requests(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get(timeout=TIMEOUT * 3)
            except queue.Empty:
                return
            if item is self._END:
                return
            yield item

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(self._END)

    def next_response(self) -> Any:
        return next(self.call)

    def rest(self) -> Outcome:
        responses: list[Any] = []
        try:
            for response in self.call:
                responses.append(response)
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", responses)
        return Outcome(grpc.StatusCode.OK, "", responses)
