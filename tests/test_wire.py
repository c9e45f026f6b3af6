"""Wire compatibility of telemetrygateway.v1, proved without trusting our .proto.

Every message of shared/protocol/WIRE.md is written down below (SPEC) with the field
numbers of that page. Bytes are encoded BY HAND from SPEC with the tiny encoder of
this file, parsed with the generated classes and compared field by field (by name);
and our messages are serialized and decoded by hand back to SPEC's numbers and wire
types. google.protobuf's Struct, Value, ListValue and Timestamp are written down too,
from the well-known types' published numbers.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from telemetry_guard.policy.kinds import RPCS, method_path
from telemetrygateway.v1 import telemetrygateway_pb2 as pb
from telemetrygateway.v1 import telemetrygateway_pb2_grpc as pb_grpc

# --- a tiny protobuf encoder/decoder ------------------------------------------------------

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 are sign-extended to 10 bytes
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def ld(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def fields_of(data: bytes) -> list[tuple[int, int, Any]]:
    """Split a message into (number, wire type, raw value): int, 8/4 bytes or payload bytes."""
    out = []
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
        elif wire_type == I64:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == I32:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire_type == LEN:
            size, pos = read_varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise AssertionError(f"unexpected wire type {wire_type}")
        out.append((number, wire_type, value))
    return out


def signed64(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


# --- WIRE.md, written down -----------------------------------------------------------------
# type grammar: [optional |repeated ]BASE or map<string,BASE>; BASE: string int32 int64
# double bool enum msg:NAME. "optional" = explicit presence (also oneof members).

_STRS = lambda *names: [(n, i, "string") for i, n in enumerate(names, 1)]  # noqa: E731

SPEC: dict[str, list[tuple[str, int, str]]] = {
    "Identifier": [
        ("licensed_instance", 1, "optional msg:Identifier.LicensedInstanceIdentifier"),
        ("unlicensed_instance", 2, "optional msg:Identifier.UnlicensedInstanceIdentifier"),
        ("managed_service", 3, "optional msg:Identifier.ManagedServiceIdentifier"),
        ("workspace", 4, "optional msg:Identifier.WorkspaceIdentifier"),
    ],
    "Identifier.LicensedInstanceIdentifier": _STRS("license_key", "instance_id", "external_url"),
    "Identifier.UnlicensedInstanceIdentifier": _STRS("instance_id", "external_url"),
    "Identifier.ManagedServiceIdentifier": [
        ("service_id", 1, "string"),
        ("service_environment", 2, "optional string"),
    ],
    "Identifier.WorkspaceIdentifier": _STRS("workspace_id", "external_url"),
    "RecordEventsRequestMetadata": [("request_id", 1, "string"), ("identifier", 2, "msg:Identifier")],
    "RecordEventsRequest": [
        ("metadata", 1, "optional msg:RecordEventsRequestMetadata"),
        ("events", 2, "optional msg:RecordEventsRequest.EventsPayload"),
    ],
    "RecordEventsRequest.EventsPayload": [("events", 1, "repeated msg:Event")],
    "RecordEventsResponse": [("succeeded_events", 1, "repeated string")],
    "RecordEventRequest": [("metadata", 1, "msg:RecordEventsRequestMetadata"), ("event", 2, "msg:Event")],
    "RecordEventResponse": [],
    "Event": [
        ("id", 1, "string"),
        ("timestamp", 2, "msg:google.protobuf.Timestamp"),
        ("feature", 3, "string"),
        ("action", 4, "string"),
        ("source", 5, "msg:EventSource"),
        ("parameters", 6, "msg:EventParameters"),
        ("user", 7, "optional msg:EventUser"),
        ("feature_flags", 8, "optional msg:EventFeatureFlags"),
        ("marketing_tracking", 9, "optional msg:EventMarketingTracking"),
        ("interaction", 10, "optional msg:EventInteraction"),
    ],
    "EventSource": [
        ("server", 1, "msg:EventSource.Server"),
        ("client", 2, "optional msg:EventSource.Client"),
    ],
    "EventSource.Server": [
        ("version", 1, "string"),
        ("request_client", 2, "optional msg:EventSource.Server.RequestClient"),
    ],
    "EventSource.Server.RequestClient": _STRS(
        "user_agent", "api_client_name", "api_client_version", "requested_with", "api_client_feature"
    ),
    "EventSource.Client": [("name", 1, "string"), ("version", 2, "optional string")],
    "EventParameters": [
        ("version", 1, "int32"),
        ("legacy_metadata", 2, "map<string,int64>"),
        ("private_metadata", 3, "optional msg:google.protobuf.Struct"),
        ("billing_metadata", 4, "optional msg:EventBillingMetadata"),
        ("metadata", 5, "map<string,double>"),
    ],
    "EventBillingMetadata": _STRS("product", "category"),
    "EventUser": [
        ("user_id", 1, "optional int64"),
        ("anonymous_user_id", 2, "optional string"),
        ("sams_external_id", 3, "optional string"),
    ],
    "EventFeatureFlags": [("flags", 1, "map<string,string>")],
    "EventMarketingTracking": [
        ("url", 1, "optional string"),
        ("cohort_id", 3, "optional string"),
        ("referrer", 4, "optional string"),
        ("last_page_seen_url", 9, "optional string"),
        ("most_recent_referrer_url", 10, "optional string"),
        ("first_page_seen_url", 11, "optional string"),
        ("utm_campaign", 12, "optional string"),
        ("utm_content", 13, "optional string"),
        ("utm_medium", 14, "optional string"),
        ("utm_source", 15, "optional string"),
        ("utm_term", 16, "optional string"),
    ],
    "EventInteraction": [
        ("trace_id", 1, "optional string"),
        ("interaction_id", 2, "optional string"),
        ("geolocation", 3, "optional msg:EventInteraction.Geolocation"),
        ("parent_interaction_id", 4, "optional string"),
        ("root_interaction_id", 5, "optional string"),
        ("session_id", 6, "optional string"),
    ],
    "EventInteraction.Geolocation": _STRS("country_code"),
    "PublishInstanceUserMetadataRequest": [
        ("metadata", 1, "optional msg:PublishInstanceUserMetadataRequestMetadata"),
        ("user_metadata", 2, "optional msg:PublishInstanceUserMetadataRequest.UserMetadataPayload"),
        ("organization_metadata", 3, "optional msg:PublishInstanceUserMetadataRequest.OrganizationMetadataPayload"),
    ],
    "PublishInstanceUserMetadataRequest.UserMetadataPayload": [
        ("users", 1, "repeated msg:InstanceUserMetadata"),
    ],
    "PublishInstanceUserMetadataRequest.OrganizationMetadataPayload": [
        ("organizations", 1, "repeated msg:InstanceOrganizationMetadata"),
    ],
    "PublishInstanceUserMetadataRequestMetadata": [
        ("request_id", 1, "string"),
        ("identifier", 2, "msg:Identifier"),
    ],
    "PublishInstanceUserMetadataResponse": [],
    "InstanceUserMetadata": [
        ("id", 1, "int64"),
        ("username", 2, "string"),
        ("primary_email", 3, "string"),
        ("assigned_rbac_roles", 4, "repeated string"),
    ],
    "InstanceOrganizationMetadata": [
        ("id", 1, "int64"),
        ("name", 2, "string"),
        ("display_name", 3, "string"),
        ("user_ids", 4, "repeated int64"),
    ],
    # Well-known types (google/protobuf/struct.proto, timestamp.proto).
    "google.protobuf.Timestamp": [("seconds", 1, "int64"), ("nanos", 2, "int32")],
    "google.protobuf.Struct": [("fields", 1, "map<string,msg:google.protobuf.Value>")],
    "google.protobuf.Value": [
        ("null_value", 1, "optional enum"),
        ("number_value", 2, "optional double"),
        ("string_value", 3, "optional string"),
        ("bool_value", 4, "optional bool"),
        ("struct_value", 5, "optional msg:google.protobuf.Struct"),
        ("list_value", 6, "optional msg:google.protobuf.ListValue"),
    ],
    "google.protobuf.ListValue": [("values", 1, "repeated msg:google.protobuf.Value")],
}

ONEOFS = {
    "Identifier": (
        "identifier",
        ["licensed_instance", "unlicensed_instance", "managed_service", "workspace"],
    ),
    "RecordEventsRequest": ("payload", ["metadata", "events"]),
    "PublishInstanceUserMetadataRequest": ("payload", ["metadata", "user_metadata", "organization_metadata"]),
    "google.protobuf.Value": (
        "kind",
        ["null_value", "number_value", "string_value", "bool_value", "struct_value", "list_value"],
    ),
}

OURS = [name for name in SPEC if not name.startswith("google.")]


def message_class(name: str) -> type[Message]:
    cls: Any = pb
    for part in name.split("."):
        cls = getattr(cls, part)
    return cls  # type: ignore[no-any-return]


def parse_type(typ: str) -> tuple[str, str]:
    """('optional'|'repeated'|'map'|'', base)."""
    if typ.startswith("map<string,"):
        return "map", typ[len("map<string,") : -1]
    label, _, base = typ.rpartition(" ")
    return label, base


# --- hand encoding from plain data ---------------------------------------------------------


def encode_value(base: str, value: Any) -> tuple[int, bytes]:
    if base == "string":
        return LEN, value.encode("utf-8")
    if base in ("int32", "int64", "enum", "bool"):
        return VARINT, varint(int(value))
    if base == "double":
        return I64, struct.pack("<d", value)
    if base.startswith("msg:"):
        return LEN, encode(base[4:], value)
    raise AssertionError(base)


def encode_field(number: int, base: str, value: Any) -> bytes:
    wire_type, payload = encode_value(base, value)
    if wire_type == LEN:
        return ld(number, payload)
    return tag(number, wire_type) + payload


def encode(name: str, data: dict[str, Any]) -> bytes:
    """Encode plain data (field name -> value) as message `name`, using SPEC's numbers only."""
    out = b""
    for field, number, typ in SPEC[name]:
        if field not in data:
            continue
        label, base = parse_type(typ)
        value = data[field]
        if label == "map":
            for key, item in value.items():
                out += ld(number, encode_field(1, "string", key) + encode_field(2, base, item))
        elif label == "repeated" and base in ("int32", "int64"):
            out += ld(number, b"".join(varint(v) for v in value))  # proto3 packs repeated scalars
        elif label == "repeated":
            out += b"".join(encode_field(number, base, v) for v in value)
        else:
            out += encode_field(number, base, value)
    return out


# --- hand decoding to a canonical tree -----------------------------------------------------


def decode_value(base: str, wire_type: int, raw: Any) -> Any:
    if base == "string":
        assert wire_type == LEN
        return raw.decode("utf-8")
    if base in ("int32", "int64", "enum"):
        assert wire_type == VARINT
        return signed64(raw)
    if base == "bool":
        assert wire_type == VARINT
        return bool(raw)
    if base == "double":
        assert wire_type == I64
        return struct.unpack("<d", raw)[0]
    assert wire_type == LEN and base.startswith("msg:")
    return decode(base[4:], raw)


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Decode bytes as message `name` with SPEC's numbers; every number must be known to SPEC."""
    by_number = {number: (field, typ) for field, number, typ in SPEC[name]}
    out: dict[str, Any] = {}
    for number, wire_type, raw in fields_of(data):
        assert number in by_number, f"{name}: field number {number} is not in WIRE.md"
        field, typ = by_number[number]
        label, base = parse_type(typ)
        if label == "map":
            assert wire_type == LEN
            entry = {n: (wt, v) for n, wt, v in fields_of(raw)}
            key = decode_value("string", *entry[1]) if 1 in entry else ""
            value = decode_value(base, *entry[2]) if 2 in entry else None
            out.setdefault(field, {})[key] = value
        elif label == "repeated" and base in ("int32", "int64"):
            values = out.setdefault(field, [])
            if wire_type == LEN:  # packed
                pos = 0
                while pos < len(raw):
                    v, pos = read_varint(raw, pos)
                    values.append(signed64(v))
            else:
                values.append(decode_value(base, wire_type, raw))
        elif label == "repeated":
            out.setdefault(field, []).append(decode_value(base, wire_type, raw))
        else:
            out[field] = decode_value(base, wire_type, raw)  # last one wins, as in protobuf
    return out


# --- building and checking our messages by field name --------------------------------------


def build(name: str, message: Message, data: dict[str, Any]) -> Message:
    """Fill one of our messages from plain data, by field name (the reverse of check)."""
    for field, _number, typ in SPEC[name]:
        if field not in data:
            continue
        label, base = parse_type(typ)
        value = data[field]
        target = getattr(message, field)
        if label == "map":
            for key, item in value.items():
                if base.startswith("msg:"):
                    build(base[4:], target[key], item)
                else:
                    target[key] = item
        elif label == "repeated":
            for item in value:
                if base.startswith("msg:"):
                    build(base[4:], target.add(), item)
                else:
                    target.append(item)
        elif base.startswith("msg:"):
            target.SetInParent()
            build(base[4:], target, value)
        else:
            setattr(message, field, value)
    return message


def check(name: str, message: Message, data: dict[str, Any]) -> None:
    """message holds exactly data (field name -> value); nothing else, no unknown fields."""
    assert len(UnknownFieldSet(message)) == 0, f"{name}: unknown fields {list(UnknownFieldSet(message))}"
    for field, _number, typ in SPEC[name]:
        label, base = parse_type(typ)
        actual = getattr(message, field)
        present = field in data
        if label == "map":
            expected = data.get(field, {})
            assert sorted(actual) == sorted(expected), f"{name}.{field}"
            for key, item in expected.items():
                if base.startswith("msg:"):
                    check(base[4:], actual[key], item)
                else:
                    assert actual[key] == item, f"{name}.{field}[{key}]"
        elif label == "repeated":
            expected = data.get(field, [])
            assert len(actual) == len(expected), f"{name}.{field}"
            for got, item in zip(actual, expected, strict=True):
                if base.startswith("msg:"):
                    check(base[4:], got, item)
                else:
                    assert got == item, f"{name}.{field}"
        elif base.startswith("msg:") or label == "optional":
            assert message.HasField(field) == present, f"{name}.{field}: presence"
            if present:
                if base.startswith("msg:"):
                    check(base[4:], actual, data[field])
                else:
                    assert actual == data[field], f"{name}.{field}"
        else:
            assert actual == data.get(field, type(actual)()), f"{name}.{field}"
    if name in ONEOFS:
        oneof, members = ONEOFS[name]
        chosen = [m for m in members if m in data]
        assert message.WhichOneof(oneof) == (chosen[-1] if chosen else None)


# --- sample data: every field of every message set to a distinct value ---------------------

STRUCT_SAMPLE = {
    "fields": {
        "text": {"string_value": "prompt text é"},
        "number": {"number_value": 2.5},
        "flag": {"bool_value": True},
        "nothing": {"null_value": 0},
        "object": {"struct_value": {"fields": {"inner": {"string_value": "deep"}}}},
        "list": {
            "list_value": {"values": [{"number_value": -1.0}, {"string_value": "x"}, {"bool_value": False}]},
        },
    }
}


def sample(name: str, choice: str | None = None) -> dict[str, Any]:
    """Every field of `name` set (for a oneof, only `choice`, default its first member)."""
    if name == "google.protobuf.Struct":
        return STRUCT_SAMPLE
    skip: set[str] = set()
    if name in ONEOFS:
        members = ONEOFS[name][1]
        skip = set(members) - {choice or members[0]}
    out: dict[str, Any] = {}
    for field, number, typ in SPEC[name]:
        if field in skip:
            continue
        label, base = parse_type(typ)
        if base.startswith("msg:"):
            one: Any = sample(base[4:])
        elif base == "string":
            one = f"{name}.{field}"
        elif base == "int64":
            one = -(2**40) - number
        elif base == "int32":
            one = -number - 100
        elif base == "double":
            one = number + 0.25
        else:
            raise AssertionError(base)
        if label == "map":
            out[field] = {f"{field}-a": one, f"{field}-b": one if base.startswith("msg:") else _other(one)}
        elif label == "repeated":
            out[field] = [one, one if base.startswith("msg:") else _other(one)]
        else:
            out[field] = one
    return out


def _other(value: Any) -> Any:
    if isinstance(value, str):
        return value + "-2"
    if isinstance(value, float):
        return -value * 3
    return 2**62 + 1 if value < 0 else -value


VARIANTS = [(name, choice) for name in OURS for choice in (ONEOFS[name][1] if name in ONEOFS else [None])]


@pytest.mark.parametrize(("name", "choice"), VARIANTS, ids=[f"{n}-{c}" if c else n for n, c in VARIANTS])
def test_hand_encoded_bytes_parse_into_the_named_fields(name: str, choice: str | None) -> None:
    data = sample(name, choice)
    raw = encode(name, data)
    message = message_class(name).FromString(raw)
    check(name, message, data)


@pytest.mark.parametrize(("name", "choice"), VARIANTS, ids=[f"{n}-{c}" if c else n for n, c in VARIANTS])
def test_our_messages_serialize_to_the_numbers_of_wire_md(name: str, choice: str | None) -> None:
    data = sample(name, choice)
    ours = build(name, message_class(name)(), data)
    raw = ours.SerializeToString(deterministic=True)
    # decode() refuses any number WIRE.md does not give and checks every wire type.
    assert decode(name, raw) == data
    assert decode(name, encode(name, data)) == data  # the codec of this file is consistent


def test_sample_covers_every_field_of_wire_md() -> None:
    """The samples above really set every field (a test of this file's own table)."""
    for name in OURS:
        covered: set[str] = set()
        for choice in ONEOFS[name][1] if name in ONEOFS else [None]:
            covered |= set(sample(name, choice))
        assert covered == {f for f, _, _ in SPEC[name]}, name


@pytest.mark.parametrize("name", OURS)
def test_our_descriptor_has_exactly_the_fields_of_wire_md(name: str) -> None:
    descriptor = message_class(name).DESCRIPTOR
    assert descriptor.full_name == f"telemetrygateway.v1.{name}"
    ours = {(fd.name, fd.number) for fd in descriptor.fields}
    assert ours == {(field, number) for field, number, _ in SPEC[name]}
    for field, _number, typ in SPEC[name]:
        fd = descriptor.fields_by_name[field]
        label, _base = parse_type(typ)
        assert fd.is_repeated == (label in ("repeated", "map")), f"{name}.{field}"
        if label == "optional" or (label == "" and typ.startswith("msg:")):
            assert fd.has_presence, f"{name}.{field} must have explicit presence"
        elif label == "":
            assert not fd.has_presence, f"{name}.{field} is a plain proto3 scalar in WIRE.md"


OPTIONAL_SCALARS = [
    (name, field, number, typ)
    for name in OURS
    for field, number, typ in SPEC[name]
    if parse_type(typ)[0] == "optional" and not parse_type(typ)[1].startswith("msg:")
]


@pytest.mark.parametrize(
    ("name", "field", "number", "typ"), OPTIONAL_SCALARS, ids=[f"{n}.{f}" for n, f, _, _ in OPTIONAL_SCALARS]
)
def test_optional_scalar_set_to_its_default_keeps_presence(name: str, field: str, number: int, typ: str) -> None:
    base = parse_type(typ)[1]
    default: Any = "" if base == "string" else 0
    raw = encode_field(number, base, default)
    message = message_class(name).FromString(raw)
    assert message.HasField(field)
    assert message.SerializeToString() == raw
    plain = message_class(name)()
    setattr(plain, field, default)
    assert plain.SerializeToString() == raw


def test_plain_scalar_default_is_not_written() -> None:
    """Proto3 fields without `optional`: the empty string is not on the wire."""
    event = pb.Event(id="", feature="")
    assert event.SerializeToString() == b""
    assert pb.Event.FromString(ld(1, b"")).SerializeToString() == b""


# --- oneofs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ONEOFS)[:3])
def test_oneof_last_member_on_the_wire_wins(name: str) -> None:
    oneof, members = ONEOFS[name]
    numbers = {field: number for field, number, _ in SPEC[name]}
    first, last = members[0], members[-1]
    raw = ld(numbers[first], b"") + ld(numbers[last], b"")
    message = message_class(name).FromString(raw)
    assert message.WhichOneof(oneof) == last
    assert not message.HasField(first)
    assert fields_of(message.SerializeToString()) == [(numbers[last], LEN, b"")]
    # and in the other order
    message = message_class(name).FromString(ld(numbers[last], b"") + ld(numbers[first], b""))
    assert message.WhichOneof(oneof) == first


@pytest.mark.parametrize("name", list(ONEOFS)[:3])
def test_oneof_empty_member_is_still_set(name: str) -> None:
    oneof, members = ONEOFS[name]
    numbers = {field: number for field, number, _ in SPEC[name]}
    for member in members:
        message = message_class(name).FromString(ld(numbers[member], b""))
        assert message.WhichOneof(oneof) == member
        assert message.SerializeToString() == ld(numbers[member], b"")
    assert message_class(name)().WhichOneof(oneof) is None


def test_identifier_kinds_in_number_order_match_policy_kinds() -> None:
    from telemetry_guard.policy.kinds import KINDS

    assert [field for field, _n, _t in SPEC["Identifier"]] == list(KINDS)
    assert [fd.name for fd in pb.Identifier.DESCRIPTOR.oneofs_by_name["identifier"].fields] == list(KINDS)


# --- specific encodings worth spelling out --------------------------------------------------


def test_private_metadata_struct_by_hand() -> None:
    struct_bytes = (
        ld(1, ld(1, b"model") + ld(2, ld(3, b"gpt")))  # string_value
        + ld(1, ld(1, b"n") + ld(2, tag(2, I64) + struct.pack("<d", 3.5)))  # number_value
        + ld(1, ld(1, b"b") + ld(2, tag(4, VARINT) + varint(1)))  # bool_value
        + ld(1, ld(1, b"z") + ld(2, tag(1, VARINT) + varint(0)))  # null_value
        + ld(1, ld(1, b"o") + ld(2, ld(5, ld(1, ld(1, b"k") + ld(2, ld(3, b"v"))))))  # struct_value
        + ld(1, ld(1, b"l") + ld(2, ld(6, ld(1, ld(3, b"a")) + ld(1, tag(4, VARINT) + varint(0)))))  # list
    )
    raw = ld(6, ld(3, struct_bytes))  # Event.parameters(6).private_metadata(3)
    event = pb.Event.FromString(raw)
    assert event.parameters.HasField("private_metadata")
    fields = event.parameters.private_metadata.fields
    assert fields["model"].string_value == "gpt"
    assert fields["n"].number_value == 3.5
    assert fields["b"].bool_value is True
    assert fields["z"].WhichOneof("kind") == "null_value"
    assert fields["o"].struct_value.fields["k"].string_value == "v"
    assert [v.WhichOneof("kind") for v in fields["l"].list_value.values] == ["string_value", "bool_value"]
    assert len(UnknownFieldSet(event.parameters.private_metadata)) == 0


def test_maps_accept_entries_missing_key_or_value_and_repeated_keys() -> None:
    raw = (
        ld(2, ld(1, b"a") + tag(2, VARINT) + varint(5))  # legacy_metadata a=5
        + ld(2, ld(1, b"a") + tag(2, VARINT) + varint(7))  # a again: last wins
        + ld(2, tag(2, VARINT) + varint(9))  # no key: ""
        + ld(5, ld(1, b"d"))  # metadata d, no value: 0.0
        + ld(5, ld(1, b"x") + tag(2, I64) + struct.pack("<d", -0.5))
    )
    params = pb.EventParameters.FromString(raw)
    assert dict(params.legacy_metadata) == {"a": 7, "": 9}
    assert dict(params.metadata) == {"d": 0.0, "x": -0.5}


def test_negative_int32_and_int64_are_ten_byte_varints() -> None:
    params = pb.EventParameters(version=-1)
    assert params.SerializeToString() == tag(1, VARINT) + b"\xff" * 9 + b"\x01"
    user = pb.EventUser(user_id=-2)
    assert fields_of(user.SerializeToString()) == [(1, VARINT, (1 << 64) - 2)]


def test_repeated_int64_is_packed_and_unpacked_input_is_accepted() -> None:
    org = pb.InstanceOrganizationMetadata(user_ids=[1, 300, -1])
    assert fields_of(org.SerializeToString()) == [(4, LEN, varint(1) + varint(300) + varint(-1))]
    unpacked = tag(4, VARINT) + varint(1) + tag(4, VARINT) + varint(300)
    assert list(pb.InstanceOrganizationMetadata.FromString(unpacked).user_ids) == [1, 300]


def test_timestamp_by_hand() -> None:
    event = pb.Event.FromString(ld(2, tag(1, VARINT) + varint(1_700_000_000) + tag(2, VARINT) + varint(5)))
    assert (event.timestamp.seconds, event.timestamp.nanos) == (1_700_000_000, 5)


# --- reserved numbers -----------------------------------------------------------------------

RESERVED = {
    2: "first_source_url",
    5: "last_source_url",
    6: "device_session_id",
    7: "session_referrer",
    8: "session_first_url",
}


def _reserved(proto: descriptor_pb2.DescriptorProto) -> tuple[set[int], set[str]]:
    numbers = {n for r in proto.reserved_range for n in range(r.start, r.end)}  # end is exclusive
    return numbers, set(proto.reserved_name)


def test_marketing_tracking_reserved_numbers_in_generated_descriptor() -> None:
    proto = descriptor_pb2.DescriptorProto()
    pb.EventMarketingTracking.DESCRIPTOR.CopyToProto(proto)
    assert _reserved(proto) == (set(RESERVED), set(RESERVED.values()))
    assert not set(RESERVED) & {fd.number for fd in pb.EventMarketingTracking.DESCRIPTOR.fields}


def test_marketing_tracking_reserved_numbers_in_proto_source(tmp_path: Any) -> None:
    """Compile proto/.../telemetrygateway.proto with protoc; its descriptor declares them too."""
    out = tmp_path / "set.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iproto",
            f"--descriptor_set_out={out}",
            "telemetrygateway/v1/telemetrygateway.proto",
        ],
        check=True,
        cwd=_repo_root(),
        capture_output=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (source,) = [f for f in files.file if f.name == "telemetrygateway/v1/telemetrygateway.proto"]
    (tracking,) = [m for m in source.message_type if m.name == "EventMarketingTracking"]
    assert _reserved(tracking) == (set(RESERVED), set(RESERVED.values()))
    # The compiled source and the generated module describe the same file (json_name aside:
    # protoc fills it in, the generated module leaves it out).
    generated = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(generated)
    _clear_json_names(source.message_type)
    assert list(source.message_type) == list(generated.message_type)
    assert list(source.service) == list(generated.service)


def _clear_json_names(messages: Any) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def _repo_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize("number", sorted(RESERVED))
def test_reserved_numbers_on_the_wire_are_unknown(number: int) -> None:
    raw = ld(number, b"old value")
    tracking = pb.EventMarketingTracking.FromString(raw)
    assert tracking.ListFields() == []
    assert [(f.field_number, f.wire_type) for f in UnknownFieldSet(tracking)] == [(number, LEN)]


def test_unknown_fields_survive_a_parse_and_serialize_until_discarded() -> None:
    raw = ld(1, b"id-1") + ld(99, b"from a newer proto") + tag(100, VARINT) + varint(7)
    event = pb.Event.FromString(raw)
    assert event.id == "id-1"
    assert sorted(fields_of(event.SerializeToString())) == sorted(fields_of(raw))
    event.DiscardUnknownFields()
    assert event.SerializeToString() == ld(1, b"id-1")


def test_package_and_imports() -> None:
    assert pb.DESCRIPTOR.package == "telemetrygateway.v1"
    assert {d.name for d in pb.DESCRIPTOR.dependencies} == {
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    }


# --- service ----------------------------------------------------------------------------------

SERVICE = "telemetrygateway.v1.TelemeteryGatewayService"
METHODS = {
    # name: (request, response, client streams, server streams)
    "RecordEvents": ("RecordEventsRequest", "RecordEventsResponse", True, True),
    "RecordEvent": ("RecordEventRequest", "RecordEventResponse", False, False),
    "PublishInstanceUserMetadata": (
        "PublishInstanceUserMetadataRequest",
        "PublishInstanceUserMetadataResponse",
        True,
        False,
    ),
}


def test_service_descriptor_names_and_stream_shapes() -> None:
    service = pb.DESCRIPTOR.services_by_name["TelemeteryGatewayService"]
    assert service.full_name == SERVICE
    assert [m.name for m in service.methods] == list(METHODS)
    for method in service.methods:
        request, response, client_streaming, server_streaming = METHODS[method.name]
        assert method.input_type.full_name == f"telemetrygateway.v1.{request}"
        assert method.output_type.full_name == f"telemetrygateway.v1.{response}"
        assert (method.client_streaming, method.server_streaming) == (client_streaming, server_streaming)


def test_policy_method_paths() -> None:
    assert list(RPCS) == list(METHODS)
    assert [method_path(rpc) for rpc in RPCS] == [
        "/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents",
        "/telemetrygateway.v1.TelemeteryGatewayService/RecordEvent",
        "/telemetrygateway.v1.TelemeteryGatewayService/PublishInstanceUserMetadata",
    ]


class _Echo(pb_grpc.TelemeteryGatewayServiceServicer):
    """A gateway stand-in: answers with what it received, to prove paths, shapes and bytes."""

    def RecordEvents(self, request_iterator: Any, context: Any) -> Any:
        for request in request_iterator:
            yield pb.RecordEventsResponse(succeeded_events=[e.id for e in request.events.events])

    def RecordEvent(self, request: Any, context: Any) -> Any:
        context.set_trailing_metadata([("event-id", request.event.id)])
        return pb.RecordEventResponse()

    def PublishInstanceUserMetadata(self, request_iterator: Any, context: Any) -> Any:
        names = [u.username for r in request_iterator for u in r.user_metadata.users]
        context.set_trailing_metadata([("usernames", ",".join(names))])
        return pb.PublishInstanceUserMetadataResponse()


@pytest.fixture(scope="module")
def echo_channel() -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_TelemeteryGatewayServiceServicer_to_server(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(None)


def _events_payload(*ids: str) -> bytes:
    # RecordEventsRequest.events(2) -> EventsPayload.events(1) -> Event.id(1)
    return ld(2, b"".join(ld(1, ld(1, i.encode())) for i in ids))


def test_record_events_is_bidi_at_its_path_with_hand_encoded_bytes(echo_channel: Any) -> None:
    call = echo_channel.stream_stream("/telemetrygateway.v1.TelemeteryGatewayService/RecordEvents")
    metadata = ld(1, ld(1, b"req-1") + ld(2, ld(3, ld(1, b"svc"))))
    answers = list(call(iter([metadata, _events_payload("a", "b"), _events_payload("c")]), timeout=10))
    # one answer per message, succeeded_events = field 1
    assert [fields_of(a) for a in answers] == [[], [(1, LEN, b"a"), (1, LEN, b"b")], [(1, LEN, b"c")]]


def test_record_event_is_unary_at_its_path(echo_channel: Any) -> None:
    call = echo_channel.unary_unary("/telemetrygateway.v1.TelemeteryGatewayService/RecordEvent")
    answer, rpc = call.with_call(ld(2, ld(1, b"ev-9")), timeout=10)
    assert answer == b""
    assert ("event-id", "ev-9") in tuple(rpc.trailing_metadata())


def test_publish_user_metadata_is_client_stream_at_its_path(echo_channel: Any) -> None:
    call = echo_channel.stream_unary(f"/{SERVICE}/PublishInstanceUserMetadata")
    users = ld(2, ld(1, ld(2, b"ada")) + ld(1, ld(2, b"bob")))  # user_metadata(2).users(1).username(2)
    answer, rpc = call.with_call(iter([ld(1, ld(1, b"r")), users]), timeout=10)
    assert answer == b""
    assert ("usernames", "ada,bob") in tuple(rpc.trailing_metadata())


def test_unknown_method_path_is_unimplemented(echo_channel: Any) -> None:
    # The spelling corrected: not a path of this protocol.
    call = echo_channel.unary_unary("/telemetrygateway.v1.TelemetryGatewayService/RecordEvent")
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
