"""Per-kind "view" message classes: telemetrygateway.v1 with some fields retyped as bytes.

A field declared `bytes` instead of a message has the same wire format (length-
delimited), so a view parses and serializes exactly the same bytes. The engine uses
views for what a kind removes or filters anyway: Event.marketing_tracking when it is
dropped, EventParameters.private_metadata when it is dropped or allowlisted. Such a
field is then a cheap slice instead of a tree of sub-messages (parse, unknown-field
discard and serialize all skip it); presence, and so the decision record, are kept.

Nothing inside a bytes-typed field ever leaves unexamined: a dropped field is
cleared, and an allowlisted private_metadata is parsed as a Struct, filtered, and
stripped of unknown fields before it is written back.
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# (message, field) pairs a view may retype as bytes.
MARKETING = ("Event", "marketing_tracking")
PRIVATE = ("EventParameters", "private_metadata")
RETYPABLE = frozenset({MARKETING, PRIVATE})


@cache
def view_class(as_bytes: frozenset[tuple[str, str]], message: str = "RecordEventsRequest") -> type[Message]:
    """The class of `message` in a pool where the fields in as_bytes are bytes."""
    unknown = as_bytes - RETYPABLE
    if unknown:
        raise ValueError(f"fields that views cannot retype: {sorted(unknown)}")
    if not as_bytes:
        return message_factory.GetMessageClass(pb.DESCRIPTOR.message_types_by_name[message])
    pool = descriptor_pool.DescriptorPool()
    for dependency in (struct_pb2, timestamp_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        dependency.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    for message_proto in proto.message_type:
        for field in message_proto.field:
            if (message_proto.name, field.name) in as_bytes:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                field.ClearField("type_name")
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{message}"))
