"""telemetry-guard demo: the sidecar and an embedded gateway, a mixed workload sent over real gRPC.

Starts, in this process, the sidecar (exactly what `telemetry-guard serve` runs) with its
embedded gateway, both on 127.0.0.1 ephemeral ports; sends the workload of
telemetry_guard/sample.py through it with a grpc.aio client; and prints, per event, what the
client sent, what the gateway received (as a difference: what the policy took out), whether
the client got it acknowledged, and the rule behind each removal (from the audit log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from telemetry_guard.policy import Engine, validity
from telemetry_guard.sample import Call, calls
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

HELP = "run the sidecar with an embedded gateway and show what a mixed workload looks like before and after"
TIMEOUT = 10.0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help=HELP,
        description=HELP + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  telemetry-guard demo\n  telemetry-guard demo --policy docs/examples/strict.yaml --full",
    )
    parser.add_argument("--policy", help="policy file (default: the built-in default policy)")
    parser.add_argument("--full", action="store_true", help="also print each event as the gateway received it")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args.policy, args.full))


# -- what the demo observes -----------------------------------------------------------------


@dataclass
class Answer:
    """How a call ended for the client."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    details: str = ""
    acknowledged: set[str] = field(default_factory=set)


class AuditCapture(logging.Handler):
    """The audit log's records (DEBUG: with removed key names), kept instead of printed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "telemetry_guard", None)
        if isinstance(fields, dict):
            self.records.append(fields)

    def removals(self) -> dict[str, list[dict[str, Any]]]:
        """Event id -> removals, from the removed_keys records."""
        out: dict[str, list[dict[str, Any]]] = {}
        for rec in self.records:
            if rec.get("audit") == "removed_keys":
                for event in rec.get("events", ()):
                    out.setdefault(event["id"], []).extend(event["removals"])
        return out

    @contextmanager
    def attached(self, name: str) -> Iterator[None]:
        logger = logging.getLogger(name)
        saved = (logger.level, logger.propagate)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        logger.addHandler(self)
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


async def _send(stub: pb_grpc.TelemeteryGatewayServiceAsyncStub, call: Call) -> Answer:
    metadata = (("authorization", call.authorization),) if call.authorization else ()
    answer = Answer()
    try:
        if call.rpc == "RecordEvents":
            requests = [m for m in call.messages if isinstance(m, pb.RecordEventsRequest)]
            stream = stub.RecordEvents(iter(requests), metadata=metadata, timeout=TIMEOUT)
            async for response in stream:
                answer.acknowledged.update(response.succeeded_events)
        elif call.rpc == "RecordEvent":
            request = call.messages[0]
            if not isinstance(request, pb.RecordEventRequest):
                raise TypeError(type(request).__name__)
            await stub.RecordEvent(request, metadata=metadata, timeout=TIMEOUT)
            answer.acknowledged.add(request.event.id)
        else:
            publish = [m for m in call.messages if isinstance(m, pb.PublishInstanceUserMetadataRequest)]
            await stub.PublishInstanceUserMetadata(iter(publish), metadata=metadata, timeout=TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        answer.code = exc.code()
        answer.details = exc.details() or ""
    return answer


# -- printing ---------------------------------------------------------------------------------


def _dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _json(message: Message) -> str:
    return json.dumps(_dict(message), separators=(", ", ": "))


def _unknown(message: Message) -> list[int]:
    found: Iterable[Any] = UnknownFieldSet(message)  # type: ignore[assignment]  # iterable; the stubs omit it
    return sorted({f.field_number for f in found})


def _diff(before: Any, after: Any, path: str = "") -> list[str]:
    """What changed from before to after, as '- path' (removed), '+ path', '~ path' lines."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for key in [*before, *(k for k in after if k not in before)]:
            sub = f"{path}.{key}" if path else key
            if key not in after:
                out.append(f"- {sub}")
            elif key not in before:
                out.append(f"+ {sub}")
            else:
                out.extend(_diff(before[key], after[key], sub))
        return out
    return [] if before == after else [f"~ {path}"]


def _events(messages: tuple[Message, ...] | list[Message]) -> list[pb.Event]:
    found: list[pb.Event] = []
    for message in messages:
        if isinstance(message, pb.RecordEventsRequest) and message.WhichOneof("payload") == "events":
            found.extend(message.events.events)
        elif isinstance(message, pb.RecordEventRequest) and message.HasField("event"):
            found.append(message.event)
    return found


def _why(removals: list[dict[str, Any]]) -> str:
    parts = []
    for removal in removals:
        keys = f" [{', '.join(removal['keys'])}]" if removal.get("keys") else ""
        parts.append(f"{removal['action']} {removal['path']}{keys} by {removal['rule']}")
    return "; ".join(parts)


def _dropped_rule(engine: Engine, kind: str | None, event: pb.Event) -> str:
    if kind is None:
        return "the policy"
    found = engine.event_type(kind, event.feature, event.action).dropped_by
    return found or engine.policy.kinds[kind].invalid_events.rule


@dataclass
class Tally:
    sent: int = 0
    left: int = 0
    removed_whole: int = 0
    acknowledged: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def _show(
    *,
    number: int,
    call: Call,
    answer: Answer,
    received: list[tuple[str, Message]],
    audit: AuditCapture,
    engine: Engine,
    full: bool,
    tally: Tally,
) -> None:
    kind = call.identifier.WhichOneof("identifier")
    sent = _events(call.messages)
    left = {event.id: event for event in _events([m for _, m in received])}
    tally.sent += len(sent)
    tally.left += len(left)
    print(f"\n== {number}. {call.title} ==")
    print(
        f"   client sent:   {call.rpc} as {kind}, {len(sent)} event(s)"
        + (", with a bearer token" * bool(call.authorization))
    )
    if answer.code == grpc.StatusCode.OK:
        print(f"   client got:    OK, {len(answer.acknowledged & {e.id for e in sent})} of {len(sent)} acknowledged")
    else:
        tally.refused[answer.code.name] = tally.refused.get(answer.code.name, 0) + 1
        print(f"   client got:    {answer.code.name}: {answer.details}")
    print(f"   gateway got:   {len(received)} message(s), {len(left)} event(s)")
    removals = audit.removals()
    for event in sent:
        acked = event.id in answer.acknowledged
        tally.acknowledged += acked
        print(f"   - {event.feature}/{event.action} ({event.id}){'  acknowledged' if acked else ''}")
        unknown = _unknown(event)
        print(f"       in:   {_json(event)}" + (f"  + unknown field(s) {unknown}" if unknown else ""))
        out = left.get(event.id)
        if out is None:
            if answer.code == grpc.StatusCode.OK:
                tally.removed_whole += 1
                print(f"       out:  nothing: removed whole by {_dropped_rule(engine, kind, event)}")
            else:
                print("       out:  nothing: the call was refused")
            continue
        changes = _diff(_dict(event), _dict(out))
        changes += [f"- unknown field {n}" for n in unknown if n not in _unknown(out)]
        print(f"       out:  {'the same, except: ' + ', '.join(changes) if changes else 'unchanged'}")
        if full:
            print(f"       left: {_json(out)}")
        if event.id in removals:
            print(f"       why:  {_why(removals[event.id])}")
        problem = validity.event_problem(event)
        if problem:
            print(f"       note: forwarded although the gateway will reject it ({problem})")
    for message in call.messages:
        if isinstance(message, pb.PublishInstanceUserMetadataRequest) and message.WhichOneof("payload") in (
            "user_metadata",
            "organization_metadata",
        ):
            print(f"   - {message.WhichOneof('payload')}")
            print(f"       in:   {_json(message)}")
            outs = [m for _, m in received if isinstance(m, pb.PublishInstanceUserMetadataRequest)]
            match = [m for m in outs if m.WhichOneof("payload") == message.WhichOneof("payload")]
            if match:
                changes = _diff(_dict(message), _dict(match[0]))
                print(f"       out:  {'the same, except: ' + ', '.join(changes) if changes else 'unchanged'}")
            else:
                print("       out:  nothing")


async def _demo(policy: str | None, full: bool) -> int:
    from telemetry_guard.interceptors.audit import AUDIT_LOGGER_NAME
    from telemetry_guard.sidecar.server import Config, Sidecar

    logging.getLogger("telemetry_guard.sidecar").setLevel(logging.ERROR)
    received: list[tuple[str, Message]] = []
    audit = AuditCapture()
    with audit.attached(AUDIT_LOGGER_NAME):
        sidecar = Sidecar(
            Config(listen="127.0.0.1:0", policy=policy, reload_interval=0),
            sink=lambda rpc, _call, message: received.append((rpc, message)),
        )
        port = await sidecar.start()
        loaded = sidecar.reloader.policy
        print(
            f"sidecar on 127.0.0.1:{port} -> embedded gateway on 127.0.0.1:{sidecar.gateway_port}\n"
            f"policy {loaded.name} (sha256 {loaded.sha256[:12]}), files: {', '.join(loaded.files)}\n"
            "each event: what the client sent (in), what reached the gateway (out), the rule behind each removal"
        )
        tally = Tally()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub: pb_grpc.TelemeteryGatewayServiceAsyncStub = pb_grpc.TelemeteryGatewayServiceStub(channel)
                for number, call in enumerate(calls(), 1):
                    received.clear()
                    audit.records.clear()
                    answer = await _send(stub, call)
                    _show(
                        number=number,
                        call=call,
                        answer=answer,
                        received=received,
                        audit=audit,
                        engine=sidecar.reloader.current.engine,
                        full=full,
                        tally=tally,
                    )
        finally:
            await sidecar.stop(0)
    refused = ", ".join(f"{count} {code}" for code, count in sorted(tally.refused.items())) or "none"
    print(
        f"\nsummary: {tally.sent} events sent, {tally.left} reached the gateway, {tally.removed_whole} removed whole, "
        f"{tally.acknowledged} acknowledged; calls refused: {refused}.\n"
        "Put the sidecar in front of a gateway: telemetry-guard serve --listen 0.0.0.0:10085 --upstream HOST:PORT"
    )
    return 0
