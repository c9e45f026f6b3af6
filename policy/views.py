"""Per-kind "view" message classes: telemetrygateway.v1 with some fields retyped.

A view parses and serializes exactly the same bytes as telemetrygateway.v1, but
represents what a kind removes or filters anyway more cheaply:
- Event.marketing_tracking, when dropped, is `bytes`: a slice, not a tree of
  sub-messages (parse, unknown-field discard and serialize all skip it);
- EventParameters.private_metadata, when dropped or allowlisted, is a RawStruct:
  `repeated bytes fields = 1`, the Struct's map entries left unparsed. Being a
  message, it merges like the Struct it stands for when the field occurs twice on
  the wire (a bytes field would keep only the last occurrence).
Presence, and so the decision record, are kept. Nothing inside a retyped field ever
leaves unexamined: a dropped field is cleared, and an allowlisted private_metadata is
parsed as a Struct, filtered, and stripped of unknown fields before it is written back.
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
RAW_STRUCT = "RawStruct"  # a Struct with its entries unparsed (views only)


@cache
def view_class(as_bytes: frozenset[tuple[str, str]], message: str = "RecordEventsRequest") -> type[Message]:
    """The class of `message` in a pool where the fields in as_bytes are retyped (see above)."""
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
    raw_struct = proto.message_type.add(name=RAW_STRUCT)
    raw_struct.field.add(
        name="fields",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    for message_proto in proto.message_type:
        for field in message_proto.field:
            if (message_proto.name, field.name) == PRIVATE and PRIVATE in as_bytes:
                field.type_name = f".{proto.package}.{RAW_STRUCT}"
            elif (message_proto.name, field.name) in as_bytes:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                field.ClearField("type_name")
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{proto.package}.{message}"))
