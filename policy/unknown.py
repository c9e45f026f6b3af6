"""Unknown fields discarded at every depth protobuf's parser accepts.

upb's DiscardUnknownFields() descends 64 message levels (map entries not counted), while its
parser accepts messages nested 100 levels deep: unknown fields in between would survive it.
In this protocol only google.protobuf.Struct (private_metadata) nests that deep, so below a
Struct that is big enough to reach that far the discard is started again on the Values at
RESTART levels, whose own discard reaches past the parser's limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

PARSER_DEPTH = 100  # upb refuses messages nested deeper (DecodeError)
REACH = 64  # levels DiscardUnknownFields() descends
RESTART = 40  # a Value at this level or the next one (< REACH) is discarded anew: it reaches past PARSER_DEPTH
STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name


def discard_unknown(message: Message) -> None:
    """DiscardUnknownFields(), at every depth."""
    message.DiscardUnknownFields()
    for struct, level in _structs(message, 0):
        # Every level below the Struct takes at least two bytes (a tag and a length): a small one cannot reach.
        if struct.ByteSize() >= 2 * (RESTART - level):
            _restart(struct.fields.values(), level + 1)


def _restart(values: Iterable[Any], level: int) -> None:
    """Discard anew on the Values below `values` (Values at `level`) that are RESTART levels deep."""
    for value in values:
        kind = value.WhichOneof("kind")
        if kind == "struct_value":
            inner = value.struct_value.fields.values()
        elif kind == "list_value":
            inner = value.list_value.values
        else:
            continue
        if level >= RESTART:
            value.DiscardUnknownFields()
        else:
            _restart(inner, level + 2)


def _structs(message: Any, level: int) -> list[tuple[Any, int]]:
    """The Structs in a message tree, with their levels (map entries not counted), path by path."""
    if message.DESCRIPTOR.full_name == STRUCT:
        return [(message, level)]
    found: list[tuple[Any, int]] = []
    for path in _paths(message.DESCRIPTOR):
        items = [message]
        for name, how in path:
            if how == "one":
                items = [getattr(item, name) for item in items if item.HasField(name)]
            elif how == "many":
                items = [sub for item in items for sub in getattr(item, name)]
            else:
                items = [sub for item in items for sub in getattr(item, name).values()]
        found.extend((struct, level + len(path)) for struct in items)
    return found


@cache
def _paths(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The field paths from a message type to the Structs it can hold: ((field, one | many | map), ...).
    A message type that holds itself is not entered again (no such type here but Struct's own)."""
    paths: list[tuple[tuple[str, str], ...]] = []
    seen = seen | {descriptor.full_name}
    for fd in descriptor.fields:
        inner = fd.message_type
        if inner is None:
            continue
        if inner.GetOptions().map_entry:
            inner, how = inner.fields_by_name["value"].message_type, "map"
        else:
            how = "many" if fd.is_repeated else "one"
        if inner is None or inner.full_name in seen or not _reaches(inner):
            continue
        step = ((fd.name, how),)
        paths += [step] if inner.full_name == STRUCT else [step + rest for rest in _paths(inner, seen)]
    return tuple(paths)


@cache
def _reaches(descriptor: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    if descriptor.full_name == STRUCT:
        return True
    if descriptor.full_name in seen:
        return False
    inside = seen | {descriptor.full_name}
    return any(fd.message_type is not None and _reaches(fd.message_type, inside) for fd in descriptor.fields)
