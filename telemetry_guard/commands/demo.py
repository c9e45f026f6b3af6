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
from telemetry_guard.policy.lint import display_path
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
    parser.add_argument(
        "--full", action="store_true", help="also print each event in full (protobuf JSON) as sent and as received"
    )
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


def _why(removals: list[dict[str, Any]]) -> list[str]:
    """One line per removal: what, and the rule that removed it."""
    lines = []
    for removal in removals:
        keys = f" [{', '.join(removal['keys'])}]" if removal.get("keys") else ""
        lines.append(f"{removal['action']} {removal['path']}{keys} by {removal['rule']}")
    return lines


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


# What a policy decides about, shown first in `in:` lines: private_metadata key by key (with the
# values: their type matters too), marketing_tracking as a whole (its field names).
_SHOWN_MAPS = ("parameters.private_metadata", "marketing_tracking")
MAX_VALUE_CHARS = 40


def _count(number: int, noun: str) -> str:
    """'1 event', '5 events'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _value(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 2] + '..."'


def _at(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data


def _compact(message: Message) -> list[str]:
    """What came in, in a few short lines: what the policy decides about (private_metadata and
    marketing_tracking with their values), then the names of the other fields and unknown field numbers."""
    data = _dict(message)
    lines = []
    for path in _SHOWN_MAPS:
        found = _at(data, path)
        if isinstance(found, dict) and found:
            shown = dict(sorted(found.items())) if path.endswith("private_metadata") else dict.fromkeys(found)
            items = (k if v is None else f"{k}={_value(v)}" for k, v in shown.items())
            lines.append(f"{path.rsplit('.', 1)[-1]}: " + ", ".join(items))
    other = [
        f"{key}.{sub}" if key == "parameters" else key
        for key, value in data.items()
        for sub in (value if key == "parameters" and isinstance(value, dict) else [None])
        if key not in ("id", "feature", "action", "marketing_tracking")
        and f"{key}.{sub}" not in _SHOWN_MAPS
        and not (key == "parameters" and sub is None)
    ]
    rest = f"also: {', '.join(other)}" if other else ""
    unknown = _unknown(message)
    if unknown:
        rest += (
            "; " if rest else ""
        ) + f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))}"
    return [*lines, rest] if rest else lines


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
    content = [m for m in call.messages if not _is_stream_metadata(m)]
    what = _count(len(sent), "event") if sent else _count(len(content), "message")
    print(f"   client sent:   {what} ({call.rpc} as {kind}{', with a bearer token' if call.authorization else ''})")
    if answer.code == grpc.StatusCode.OK:
        acked = len(answer.acknowledged & {e.id for e in sent})
        print("   client got:    OK" + (f", {acked} of {_count(len(sent), 'event')} acknowledged" if sent else ""))
    else:
        tally.refused[answer.code.name] = tally.refused.get(answer.code.name, 0) + 1
        print(f"   client got:    {answer.code.name}: {answer.details}")
    if not received:
        got = "nothing"
    elif sent:
        got = f"{_count(len(left), 'event')} in {_count(len(received), 'message')}"
    else:
        got = _count(len(received), "message")
    print(f"   gateway got:   {got}")
    removals = audit.removals()
    for event in sent:
        acked = event.id in answer.acknowledged
        tally.acknowledged += acked
        print(f"   - {event.feature}/{event.action}  (event {event.id[-4:]}{', acknowledged' if acked else ''})")
        shown = _compact(event)
        for i, line in enumerate(shown or ["(no other field)"]):
            print(f"       {'in:' if i == 0 else '':<5} {line}")
        if full:
            print(f"       sent: {_json(event)}")
        out = left.get(event.id)
        if out is None:
            if answer.code == grpc.StatusCode.OK:
                tally.removed_whole += 1
                print(f"       out:  nothing: removed whole by {_dropped_rule(engine, kind, event)}")
            else:
                print("       out:  nothing: the call was refused")
            continue
        unknown = _unknown(event)
        changes = _diff(_dict(event), _dict(out))
        changes += [f"- unknown field {n}" for n in unknown if n not in _unknown(out)]
        print(f"       out:  {'the same, except: ' + ', '.join(changes) if changes else 'unchanged'}")
        if full:
            print(f"       left: {_json(out)}")
        for i, reason in enumerate(_why(removals.get(event.id, []))):
            print(f"       {'why:' if i == 0 else '':<5} {reason}")
        problem = validity.event_problem(event)
        if problem:
            print(f"       note: forwarded although the gateway will reject it ({problem})")
    for message in content:
        if isinstance(message, pb.PublishInstanceUserMetadataRequest) and message.WhichOneof("payload") in (
            "user_metadata",
            "organization_metadata",
        ):
            payload = message.WhichOneof("payload")
            print(f"   - {payload}")
            print(f"       in:   {_json(message) if full else _user_metadata(message)}")
            outs = [m for _, m in received if isinstance(m, pb.PublishInstanceUserMetadataRequest)]
            match = [m for m in outs if m.WhichOneof("payload") == payload]
            if match:
                changes = _diff(_dict(message), _dict(match[0]))
                print(f"       out:  {'the same, except: ' + ', '.join(changes) if changes else 'unchanged'}")
            elif answer.code != grpc.StatusCode.OK:
                print("       out:  nothing: the call was refused")
            else:
                print("       out:  nothing")


def _is_stream_metadata(message: Message) -> bool:
    return isinstance(message, pb.RecordEventsRequest | pb.PublishInstanceUserMetadataRequest) and (
        message.WhichOneof("payload") == "metadata"
    )


def _user_metadata(message: pb.PublishInstanceUserMetadataRequest) -> str:
    """'1 user: id, username, primary_email' (field names, not values)."""
    data = _dict(message)
    payload = message.WhichOneof("payload") or ""
    items: list[dict[str, Any]] = next(iter(data.get(payload, {}).values()), [])
    names = list(dict.fromkeys(key for item in items for key in item))
    noun = "user" if payload == "user_metadata" else "organization"
    return f"{_count(len(items), noun)}: {', '.join(names)}"


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
        tally = Tally()
        try:
            loaded = sidecar.reloader.policy
            print(
                f"sidecar on 127.0.0.1:{port} -> embedded gateway on 127.0.0.1:{sidecar.gateway_port}\n"
                f"policy {loaded.name} (sha256 {loaded.sha256[:12]}), read from:\n"
                + "".join(f"  {display_path(file)}\n" for file in loaded.files)
                + "each event: what the client sent (in: what the policy decides about, then the names of the\n"
                "other fields), what reached the gateway (out), the rule behind each removal (why); --full: all of it"
            )
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
    refused = ", ".join(f"{count} {code}" for code, count in sorted(tally.refused.items()))
    calls_refused = _count(sum(tally.refused.values()), "call") + " refused" + (f" ({refused})" if refused else "")
    print(
        f"\nsummary: {_count(tally.sent, 'event')} sent; {tally.left} reached the gateway, "
        f"{tally.removed_whole} removed whole, {tally.acknowledged} acknowledged.\n"
        f"         {calls_refused}.\n"
        "Put the sidecar in front of a gateway: telemetry-guard serve --listen 0.0.0.0:10085 --upstream HOST:PORT"
    )
    return 0
