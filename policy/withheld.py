"""PublishInstanceUserMetadata's withheld fields, counted and removed by the parser instead of item by item.

A payload holds up to thousands of users or organizations, and a Python step per item and field (read the
field, clear it) costs more than parsing the whole payload. Here the payload is serialized once and two view
classes read it back:
- a count view, whose `items` field is singular: every item merges into one message, in which each withheld
  field is `repeated`, so that its length is how many items had the field set (a proto3 serializer writes an
  implicit-presence field once per item, and only when it is not its default: exactly when reading it is
  truthy, which is what the item-by-item reference counts);
- a kept view, whose items lack the withheld fields: they are parsed as unknown fields and discarded with
  any other unknown field, so this path serves only kinds that discard unknown fields.
A withheld number field is counted once the payload's unknown fields are discarded: an unknown field of its
number with another wire type (length-delimited) would read as a packed list in the count view. Fields for
which "set" and "not its default" differ (explicit presence; floats, whose -0.0 is written but false), repeated
fields, and items holding messages or enums are not handled: `plan` answers None, and the engine takes the
item-by-item path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

_FD = FieldDescriptor
# Types whose "set" is not "not its default" (floats: -0.0), or that the views cannot copy by type alone.
_UNCOUNTABLE = frozenset({_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT, _FD.TYPE_MESSAGE, _FD.TYPE_GROUP, _FD.TYPE_ENUM})
_PACKAGE = "telemetry_guard.withheld"


def _countable(fd: FieldDescriptor) -> bool:
    return not fd.is_repeated and not fd.has_presence and fd.type not in _UNCOUNTABLE


class WithheldPlan:
    """One payload type's withheld fields: removed from a payload, with how many items had each set."""

    def __init__(self, payload: Descriptor, items: str, names: Sequence[str]) -> None:
        self.names = tuple(names)
        field = payload.fields_by_name[items]
        item = _item(payload, items)
        self._numeric = any(item.fields_by_name[n].type not in (_FD.TYPE_STRING, _FD.TYPE_BYTES) for n in names)
        self._items = items
        proto = descriptor_pb2.FileDescriptorProto(
            name=f"telemetry_guard/withheld/{item.name}.proto", package=_PACKAGE, syntax="proto3"
        )  # a pool of its own per plan
        fields = descriptor_pb2.DescriptorProto()
        item.CopyToProto(fields)
        counted = proto.message_type.add(name="Counted")
        kept = proto.message_type.add(name="Kept")
        for fd in fields.field:
            if fd.name in self.names:
                counted.field.add(name=fd.name, number=fd.number, type=fd.type, label=_FD.LABEL_REPEATED)
            else:
                kept.field.add().CopyFrom(fd)
        for name, of in (("CountedPayload", "Counted"), ("KeptPayload", "Kept")):
            label = _FD.LABEL_OPTIONAL if of == "Counted" else _FD.LABEL_REPEATED  # Counted: all items merge
            proto.message_type.add(name=name).field.add(
                name=items, number=field.number, type=_FD.TYPE_MESSAGE, label=label, type_name=f".{_PACKAGE}.{of}"
            )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        self._counted: Any = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.CountedPayload"))
        self._kept: Any = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.KeptPayload"))

    def remove(self, payload: Message) -> tuple[bytes, list[tuple[str, int]]]:
        """The payload serialized without the withheld fields and without unknown fields, and (field, items that
        had it set) for each field some item had set, in the order an item-by-item pass meets them: by the first
        item that has it, then by the field's position among the names. The payload keeps its fields (its unknown
        ones may be discarded).
        """
        if self._numeric:  # an unknown field of a number withheld could read as a packed list in the count view
            payload.DiscardUnknownFields()  # the item types hold no Struct: upb's own discard reaches every field
        data = payload.SerializeToString()
        counted = getattr(self._counted.FromString(data), self._items)
        found = []
        items = getattr(payload, self._items)
        for position, name in enumerate(self.names):
            count = len(getattr(counted, name))
            if count:
                first = next((i for i, item in enumerate(items) if getattr(item, name)), None)
                if first is None:  # the count and the items disagree: never guess (fail closed)
                    raise ValueError(f"{self._items}.{name}: counted {count} but no item has it set")
                found.append((first, position, name, count))
        kept = self._kept.FromString(data)
        kept.DiscardUnknownFields()  # the fields withheld, which the kept view does not know, and any unknown
        return kept.SerializeToString(), [(name, count) for _, _, name, count in sorted(found)]


def plan(payload: Descriptor, items: str, names: Sequence[str]) -> WithheldPlan | None:
    """The WithheldPlan of these fields of the payload's items, or None when one of them is not countable
    this way (or the items are not flat messages): then each item is looked at in Python."""
    item = _item(payload, items)
    if any(fd.message_type is not None or fd.enum_type is not None for fd in item.fields):
        return None  # the views copy the item's fields by type alone
    if not all(_countable(item.fields_by_name[name]) for name in names):
        return None
    return WithheldPlan(payload, items, names)


def _item(payload: Descriptor, items: str) -> Descriptor:
    item = payload.fields_by_name[items].message_type
    if item is None:
        raise ValueError(f"{payload.full_name}.{items} is not a message field")
    return item
