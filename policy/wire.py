"""Which payload a serialized RecordEventsRequest carries, read from its top-level tags only.

An events payload after the metadata is filtered on its bytes (Engine.record_events_admitted, one
parse into the kind's view class); every other message goes through the stream protocol checks of
interceptors.stream.StreamGuard, which parses it whole. Telling the two apart must not cost a
parse: this walks the top-level fields (usually one tag and one length) and answers as the
protobuf parser would decide the `payload` oneof: the last member present wins.
Anything irregular answers IRREGULAR, and the full parser judges it.

events_by_id: the ids of a payload's events, for the acknowledgement ledger, without parsing the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

NONE = 0  # no payload: the message is skipped, as the gateway skips it
METADATA = 1  # RecordEventsRequest.metadata
EVENTS = 2  # RecordEventsRequest.events
IRREGULAR = -1  # not a well-formed sequence of fields, or a oneof member with the wrong wire type


# Bytes of a varint: tags and length prefixes take 5 at most (protobuf's upb refuses longer ones with
# DecodeError), other varints 10.
TAG_WIDTH, VALUE_WIDTH = 5, 10


def _varint(data: bytes, pos: int, width: int = TAG_WIDTH) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        byte = data[pos]  # IndexError past the end: handled by the caller
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 7 * width:
            raise ValueError("varint too long")


def payload(data: bytes) -> int:
    """NONE, METADATA, EVENTS or IRREGULAR for the bytes of a RecordEventsRequest."""
    end = len(data)
    if end > 1 and data[0] == 0x12:  # events (field 2, length-delimited) first: the usual payload
        pos = 1
        length = shift = 0
        while pos < end and pos <= TAG_WIDTH:  # the length: a varint of at most 5 bytes, as _varint reads it
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if pos + length == end:
                    return EVENTS  # the only field: what _walk answers, without walking
                break
            shift += 7
    return _walk(data)


def _walk(data: bytes) -> int:
    """payload() field by field (the reference: tests compare the shortcut above with it)."""
    pos = 0
    end = len(data)
    found = NONE
    try:
        while pos < end:
            tag, pos = _varint(data, pos)
            number = tag >> 3
            wire_type = tag & 7
            if wire_type == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire_type == 0:
                _, pos = _varint(data, pos, VALUE_WIDTH)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            else:  # groups and invalid wire types
                return IRREGULAR
            if number == 0 or tag > 0xFFFFFFFF or pos > end:  # upb: a tag is 32 bits
                return IRREGULAR
            if number in (METADATA, EVENTS):
                if wire_type != 2:
                    return IRREGULAR
                found = number
    except (IndexError, ValueError):
        return IRREGULAR
    return found


def _ids_class() -> type[Message]:
    """RecordEventsRequest as far as the ids of its events go; every other field is left unparsed."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="telemetry_guard/policy/event_ids.proto", package="telemetry_guard.policy", syntax="proto3"
    )
    event = proto.message_type.add(name="EventId")  # telemetrygateway.v1.Event: string id = 1
    event.field.add(name="id", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    payload = proto.message_type.add(name="EventIds")  # RecordEventsRequest.EventsPayload: repeated Event events = 1
    payload.field.add(
        name="events",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".telemetry_guard.policy.EventId",
    )
    request = proto.message_type.add(name="RequestEventIds")  # RecordEventsRequest: EventsPayload events = 2
    request.field.add(
        name="events",
        number=EVENTS,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_OPTIONAL,
        type_name=".telemetry_guard.policy.EventIds",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("telemetry_guard.policy.RequestEventIds"))


_IDS = _ids_class()


def events_by_id(data: bytes) -> Sequence[Any]:
    """The events of a serialized RecordEventsRequest, in order, as messages that hold their `id` only.

    For AckLedger.forwarded: a quarter of the time of a full parse (the rest of each event is
    kept as unparsed bytes). Raises DecodeError like the full parser on bytes that are not a message.
    """
    request: Any = _IDS.FromString(data)
    events: Sequence[Any] = request.events.events
    return events
