"""telemetry-guard demo: the policy applied to a small mixed workload, before and after."""

from __future__ import annotations

import argparse
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from policy import Denial, Engine, Outcome, default_policy, load_policy, validity
from policy.decision import EventRecord
from telemetry_guard.sample import Call, calls
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

HELP = "apply a policy to a built-in mixed workload and show each event before and after"


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "demo",
        help=HELP,
        description=HELP + ".",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  telemetry-guard demo\n  telemetry-guard demo --policy docs/examples/strict.yaml",
    )
    parser.add_argument("--policy", help="policy file (default: the built-in default policy)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy) if args.policy else default_policy()
    engine = Engine(policy)
    print(f"policy {policy.name} (sha256 {policy.sha256[:12]}), files: {', '.join(policy.files)}")
    for call in calls():
        _play(engine, call)
    return 0


def _play(engine: Engine, call: Call) -> None:
    print(f"\n== {call.title} ==")
    access = engine.check_access(call.rpc, call.identifier, call.authorization)
    if isinstance(access, Denial):
        print(f"   refused before anything is forwarded: {access}")
        return
    for message in call.messages:
        original = type(message)()
        original.CopyFrom(message)  # the engine filters in place
        outcome = _apply(engine, call, message)
        if outcome.denial is not None:
            print(f"   refused: {outcome.denial}")
            return
        _show(original, outcome)


def _apply(engine: Engine, call: Call, message: Message) -> Outcome[Any]:
    if isinstance(message, pb.RecordEventsRequest):
        return engine.record_events(message, call.identifier, detailed=True)
    if isinstance(message, pb.RecordEventRequest):
        return engine.record_event(message, detailed=True)
    if isinstance(message, pb.PublishInstanceUserMetadataRequest):
        return engine.publish_instance_user_metadata(message, call.identifier)
    raise TypeError(f"not a telemetrygateway.v1 request: {type(message).__name__}")


def _show(original: Message, outcome: Outcome[Any]) -> None:
    decision = outcome.decision
    after = outcome.request
    if isinstance(after, pb.RecordEventsRequest) and after.WhichOneof("payload") == "metadata":
        print(f"   metadata: request_id={after.metadata.request_id!r}, kind {decision.kind}: accepted")
        return
    if isinstance(after, pb.PublishInstanceUserMetadataRequest):
        print(f"   after:   {_json(after)}")
        for removal in decision.removals:
            print(f"   removed: {removal.path} x{removal.count} ({removal.rule})")
        return
    records = {record.index: record for record in decision.events}
    print(f"   {decision.events_in} event(s) in, {decision.events_out} out")
    kept = (
        list(after.events.events)
        if isinstance(after, pb.RecordEventsRequest)
        else ([after.event] if after.HasField("event") else [])
    )
    originals = _events(original)
    position = 0
    for index, event in enumerate(originals):
        record = records.get(index)
        print(f"   - {event.feature}/{event.action} ({event.id})")
        print(f"     before: {_json(event)}{_unknown(event)}")
        if record is not None and record.dropped_by:
            print(f"     after:  (removed whole by {record.dropped_by})")
            continue
        print(f"     after:  {_json(kept[position])}{_unknown(kept[position])}")
        position += 1
        if record is not None:
            print(f"     why:    {_why(record)}")
        problem = validity.event_problem(event)
        if problem:
            print(f"     note:   forwarded although the gateway will reject it ({problem})")


def _events(message: Message) -> list[pb.Event]:
    if isinstance(message, pb.RecordEventsRequest):
        return list(message.events.events)
    if isinstance(message, pb.RecordEventRequest):
        return [message.event]
    return []


def _json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message), separators=(", ", ": "))


def _unknown(message: Message) -> str:
    numbers = sorted({field.field_number for field in UnknownFieldSet(message)})
    return f"  + unknown field(s) {numbers}" if numbers else ""


def _why(record: EventRecord) -> str:
    parts = []
    for removal in record.removals:
        keys = f" [{', '.join(removal.keys)}]" if removal.keys else ""
        parts.append(f"{removal.action} {removal.path}{keys} by {removal.rule}")
    return "; ".join(parts)
