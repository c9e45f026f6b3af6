"""Fuzz cases, made from a source of choices: hypothesis draws, atheris' data provider or a seeded RNG.

A case is one request message of one RPC, as bytes, for one policy, kind and identifier. The
request is built from realistic parts (allowlisted and other event types, private_metadata
Structs nested up to past protobuf's parser limit, marketing tracking, legacy metadata,
every droppable field, unknown fields anywhere), serialized, then re-encoded (tags, lengths
and varints widened to 1-10 bytes, high bits set on varints, fields repeated or left out)
and mutated byte by byte (flipped, cut, inserted, repeated). Every private_metadata string
and marketing value carries MARKER, which no decision record may ever contain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from telemetry_guard.policy.kinds import KINDS
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

MARKER = "SECRET"
RECORD_EVENTS, RECORD_EVENT, PUBLISH = "RecordEvents", "RecordEvent", "PublishInstanceUserMetadata"
BUFFERS = ("bytes", "bytearray", "memoryview")  # how record_events_bytes is handed the payload

ALLOWLISTED = [
    ("cody.completion", "accepted"),
    ("cody.hoverCommands", "visible"),
    ("blob.codeintel", "hovered"),
    ("cody.chatResponse", "shown"),
    ("cody.command.fix", "executed"),
]
FEATURES = ["cody.chat", "cody", "search", "searchResults", "blob.view", "cody.chat-question", "", "Bad", "a b"]
ACTIONS = ["submitted", "executed", "viewed", "*", "", "x"]
KEYS = ["languageId", "otherCompletionProviders", "chatModel", "model", "prompt", "query", "", "k"]
UNKNOWN_NUMBERS = (100, 19, 2047, 536870911)  # beyond every message here, one- to five-byte tags


class Source(Protocol):
    """Where a case's choices come from."""

    def integer(self, low: int, high: int) -> int: ...

    def raw(self, max_size: int) -> bytes: ...


class RandomSource:
    """Choices from a seeded RNG (bench.fuzz without atheris, and the sanitizer run)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def raw(self, max_size: int) -> bytes:
        return self._rng.randbytes(self._rng.randint(0, max_size))


@dataclass(frozen=True)
class Case:
    rpc: str
    policy: str
    kind: str
    identifier: pb.Identifier | None
    data: bytes
    buffer: str = "bytes"

    def __str__(self) -> str:
        ident = None if self.identifier is None else self.identifier.SerializeToString().hex()
        return f"Case({self.rpc!r}, {self.policy!r}, {self.kind!r}, identifier={ident}, data={self.data.hex()!r})"


def case(source: Source, policies: list[str], rpc: str | None = None) -> Case:
    """One fuzz case. The choices a source answers with its lowest value (atheris, out of input) make a
    well-formed request: what is irregular takes choices."""
    rpc = rpc or choice(source, [RECORD_EVENTS] * 6 + [RECORD_EVENT, PUBLISH])
    policy = choice(source, policies)
    kind = choice(source, list(KINDS))
    ident = identifier(source, kind)
    message: Message
    if rpc == RECORD_EVENTS:
        message = record_events_request(source)
    elif rpc == RECORD_EVENT:
        message = pb.RecordEventRequest(event=event(source, 0))
        if ident is not None:
            message.metadata.identifier.CopyFrom(ident)
    else:
        message = publish_request(source)
    for _ in range(source.integer(0, 3)):
        add_unknown(source, message)
    data = message.SerializeToString()
    if rpc != PUBLISH and source.integer(0, 5) == 5:  # appended fields merge: one more event, or into the event
        deep = deep_private_metadata(source)
        data += ld(2, ld(1, event(source, 9).SerializeToString() + deep)) if rpc == RECORD_EVENTS else ld(2, deep)
    if flip(source):
        data = reencode(source, data)
    if source.integer(0, 3) == 3:
        data = mutate(source, data)
    return Case(rpc, policy, kind, ident, data, choice(source, list(BUFFERS)))


def choice(source: Source, options: list[Any]) -> Any:
    return options[source.integer(0, len(options) - 1)]


def flip(source: Source) -> bool:
    return source.integer(0, 1) == 1


def secret(source: Source) -> str:
    return f"{MARKER}_{source.integer(0, 9999)}_END"


def identifier(source: Source, kind: str) -> pb.Identifier | None:
    """Mostly a valid identifier of kind; sometimes none, an empty one or an empty required field."""
    refused = 29 - source.integer(0, 29)  # an empty choice (atheris' short inputs) is a valid identifier
    if refused == 0:
        return None
    ident = pb.Identifier()
    if refused == 1:
        return ident
    value = "" if refused == 2 else f"id-{source.integer(0, 9)}"
    fields = {
        "licensed_instance": "license_key",
        "unlicensed_instance": "instance_id",
        "managed_service": "service_id",
        "workspace": "workspace_id",
    }
    setattr(getattr(ident, kind), fields[kind], value)
    return ident


def record_events_request(source: Source) -> pb.RecordEventsRequest:
    if source.integer(0, 9) == 0:  # the stream's metadata message
        request = pb.RecordEventsRequest(metadata=pb.RecordEventsRequestMetadata(request_id="r"))
        ident = identifier(source, choice(source, list(KINDS)))
        if ident is not None:
            request.metadata.identifier.CopyFrom(ident)
        return request
    request = pb.RecordEventsRequest()
    request.events.SetInParent()
    for index in range(source.integer(0, 5)):
        request.events.events.append(event(source, index))
    return request


def event(source: Source, index: int) -> pb.Event:
    if flip(source):
        feature, action = choice(source, ALLOWLISTED)
    else:
        feature, action = choice(source, FEATURES), choice(source, ACTIONS)
    ev = pb.Event(id=choice(source, [f"ev-{index}", f"ev-{index}", ""]), feature=feature, action=action)
    if source.integer(0, 9):
        ev.timestamp.FromSeconds(source.integer(0, 2**33))
    if flip(source):
        for _ in range(source.integer(0, 4)):
            ev.parameters.private_metadata.fields[choice(source, KEYS)].CopyFrom(value(source, 0))
    if source.integer(0, 3) == 0:
        ev.parameters.legacy_metadata[choice(source, KEYS)] = source.integer(-(2**40), 2**40)
    if source.integer(0, 3) == 0:
        ev.parameters.metadata[choice(source, KEYS)] = source.integer(-(2**20), 2**20) / 8
    if flip(source):
        ev.parameters.version = choice(source, [0, 1, 2**31 - 1, -1])
    if source.integer(0, 3) == 0:
        ev.parameters.billing_metadata.product = "p"
    if flip(source):
        tracking = ev.marketing_tracking
        tracking.url = f"https://mkt.example/{secret(source)}"
        if flip(source):
            tracking.utm_source = secret(source)
    if flip(source):
        ev.user.user_id = choice(source, [0, 1, 2**40])
        if flip(source):
            ev.user.anonymous_user_id = "anon"
    if flip(source):
        ev.interaction.geolocation.country_code = "NL"
        ev.interaction.trace_id = "trace"
    if source.integer(0, 3) == 0:
        ev.feature_flags.flags[choice(source, KEYS)] = "true"
    if flip(source):
        ev.source.server.version = "6.0"
        ev.source.client.name = "client"
        if flip(source):
            ev.source.client.version = "1"
        if flip(source):
            ev.source.server.request_client.user_agent = "agent"
    return ev


def value(source: Source, depth: int) -> struct_pb2.Value:
    """A Struct Value: a string (marked), a number, a bool, null, or (shallow) a list or a Struct."""
    out = struct_pb2.Value()
    pick = source.integer(0, 6 if depth < 3 else 4)
    if pick <= 1:
        out.string_value = secret(source)
    elif pick == 2:
        out.number_value = source.integer(-(2**40), 2**40) / 4
    elif pick == 3:
        out.bool_value = flip(source)
    elif pick == 4:
        out.null_value = struct_pb2.NULL_VALUE
    elif pick == 5:
        out.list_value.values.extend(value(source, depth + 1) for _ in range(source.integer(0, 2)))
    else:
        for _ in range(source.integer(0, 2)):
            out.struct_value.fields[choice(source, KEYS)].CopyFrom(value(source, depth + 1))
    return out


def deep_private_metadata(source: Source) -> bytes:
    """Event fields that add a private_metadata entry nested 10 to 50 levels in Structs and lists, a string
    and an unknown field at the bottom: around and past the depth protobuf's parser accepts. Written by
    hand (a message that deep cannot be built), to be appended to a serialized Event."""
    text = secret(source).encode()
    value = ld(3, text) + unknown(source)
    for _ in range(source.integer(10, 50)):
        value = ld(5, ld(1, ld(1, b"k") + ld(2, value))) if flip(source) else ld(6, ld(1, value))
    entry = ld(1, choice(source, KEYS).encode()) + ld(2, value)
    return ld(6, ld(3, ld(1, entry)))


def ld(number: int, content: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(content)) + content


def add_unknown(source: Source, message: Message) -> None:
    """An unknown field in a message of the tree, picked at random (depth first)."""
    found = [message]
    todo = [message]
    while todo:
        for fd, item in todo.pop().ListFields():
            if fd.message_type is None or fd.message_type.GetOptions().map_entry:
                continue
            for sub in item if fd.is_repeated else [item]:
                found.append(sub)
                todo.append(sub)
    append_unknown(source, choice(source, found))


def append_unknown(source: Source, message: Message) -> None:
    message.MergeFromString(unknown(source))


def unknown(source: Source) -> bytes:
    """One field with a number no message here knows, of any wire type."""
    number = choice(source, list(UNKNOWN_NUMBERS))
    wire_type = choice(source, [0, 1, 2, 5])
    payload = {0: varint(source.integer(0, 2**64 - 1)), 1: b"\x00" * 8, 5: b"\x01" * 4}.get(wire_type)
    if payload is None:
        text = secret(source).encode()
        payload = varint(len(text)) + text
    return varint(number << 3 | wire_type) + payload


def publish_request(source: Source) -> pb.PublishInstanceUserMetadataRequest:
    request = pb.PublishInstanceUserMetadataRequest()
    pick = source.integer(0, 4)
    if pick == 0:
        request.metadata.request_id = "r"
    elif pick <= 2:
        request.user_metadata.SetInParent()
        for i in range(source.integer(0, 3)):
            request.user_metadata.users.add(
                id=i, username=f"u{i}", primary_email=f"{secret(source)}@example.com", assigned_rbac_roles=["admin"]
            )
    else:
        request.organization_metadata.SetInParent()
        for i in range(source.integer(0, 3)):
            request.organization_metadata.organizations.add(id=i, name="org", display_name="Org", user_ids=[1, i])
    return request


# --- encodings ---------------------------------------------------------------------------------------


def varint(n: int, width: int = 0) -> bytes:
    """n as a varint, padded to `width` bytes when wider than needed (an overlong encoding)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            break
    while len(out) < width:
        out[-1] |= 0x80
        out.append(0)
    return bytes(out)


@dataclass
class Field:
    """One field as read off the wire; `inner`: its content read as fields, where it reads as a message."""

    number: int
    wire_type: int
    value: int | bytes
    inner: list[Field] | None = None


def fields(data: bytes, depth: int = 0) -> list[Field] | None:
    """data read as a message's fields, or None where it is not one (too deep: none either)."""
    out: list[Field] = []
    pos = 0
    try:
        while pos < len(data):
            tag, pos = read_varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                return None
            if wire_type == 0:
                got, pos = read_varint(data, pos)
                out.append(Field(number, 0, got))
            elif wire_type in (1, 5):
                size = 8 if wire_type == 1 else 4
                if pos + size > len(data):
                    return None
                out.append(Field(number, wire_type, data[pos : pos + size]))
                pos += size
            elif wire_type == 2:
                length, pos = read_varint(data, pos)
                if pos + length > len(data):
                    return None
                content = data[pos : pos + length]
                pos += length
                out.append(Field(number, 2, content, fields(content, depth + 1) if depth < 12 and content else None))
            else:
                return None
    except IndexError:
        return None
    return out


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def reencode(source: Source, data: bytes) -> bytes:
    """The same fields written another way at a few places: widened tags, lengths and varints, high bits
    set on a varint or a varint a 32-bit parser reads as 0, a field repeated or left out. Widths 6-10 for
    a tag or a length are refused by upb."""
    top = fields(data)
    if top is None:
        return data
    every: list[Field] = []
    todo = list(top)
    while todo:
        item = todo.pop()
        every.append(item)
        todo.extend(item.inner or ())
    if not every:
        return data
    changes: dict[int, str] = {}
    for _ in range(source.integer(1, 5)):
        change = choice(source, ["tag", "length", "value", "high", "zero32", "twice", "gone"])
        wire_type = {"length": 2, "value": 0, "high": 0, "zero32": 0}.get(change)
        fitting = [f for f in every if wire_type is None or f.wire_type == wire_type]
        if fitting:
            changes[id(choice(source, fitting))] = change
    widths = {id(f): source.integer(1, 10) for f in every if id(f) in changes}
    return write(top, changes, widths)


def write(items: list[Field], changes: dict[int, str], widths: dict[int, int]) -> bytes:
    out = bytearray()
    for item in items:
        change = changes.get(id(item))
        if change == "gone":
            continue
        width = widths.get(id(item), 0)
        tag = varint(item.number << 3 | item.wire_type, width if change == "tag" else 0)
        if item.wire_type == 0:
            assert isinstance(item.value, int)
            number = {"high": item.value | 1 << 32, "zero32": 1 << 32}.get(change or "", item.value)  # zero32: int32 0
            body = varint(number, width if change == "value" else 0)
        elif item.wire_type == 2:
            content = write(item.inner, changes, widths) if item.inner is not None else item.value
            assert isinstance(content, bytes)
            body = varint(len(content), width if change == "length" else 0) + content
        else:
            assert isinstance(item.value, bytes)
            body = item.value
        out += tag + body
        if change == "twice":
            out += tag + body
    return bytes(out)


def mutate(source: Source, data: bytes) -> bytes:
    """Bytes flipped, cut, inserted or repeated."""
    out = bytearray(data)
    for _ in range(source.integer(1, 3)):
        at = source.integer(0, len(out))
        how = source.integer(0, 3)
        if how == 0 and at < len(out):
            out[at] = source.integer(0, 255)
        elif how == 1:
            del out[at:]
        elif how == 2:
            out[at:at] = source.raw(4) or b"\x00"
        else:
            end = source.integer(at, len(out))
            out[end:end] = out[at:end]
    return bytes(out)
