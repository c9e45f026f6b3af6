"""Field paths into Event (interaction.geolocation, user.anonymous_user_id, ...).

Paths are checked against the generated descriptors at load time, so a typo is a load
error rather than a rule that silently removes nothing; each valid path compiles to
a small remover closure that the engine calls per event.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from telemetrygateway.v1 import telemetrygateway_pb2 as pb

# The gateway rejects an event without these: dropping them is a policy mistake.
REQUIRED_EVENT_FIELDS = frozenset({"id", "timestamp", "feature", "action"})

Remover = Callable[[Message], bool]


def resolve(path: str, root: Descriptor = pb.Event.DESCRIPTOR) -> list[FieldDescriptor] | str:
    """The fields along path, or a message saying why the path is not in the proto."""
    fields: list[FieldDescriptor] = []
    descriptor: Descriptor | None = root
    for depth, name in enumerate(path.split(".")):
        if descriptor is None:
            return f"{'.'.join(path.split('.')[:depth])} is not a message, so it has no field {name!r}"
        fd = descriptor.fields_by_name.get(name)
        if fd is None:
            known = ", ".join(sorted(descriptor.fields_by_name))
            return f"{descriptor.name} has no field {name!r} (it has: {known})"
        fields.append(fd)
        well_known = fd.message_type.full_name if fd.message_type is not None else ""
        if well_known.startswith("google.protobuf.") and depth != len(path.split(".")) - 1:
            return (
                f"{'.'.join(path.split('.')[: depth + 1])} is a {well_known}: a path can end "
                "there but not go inside it (private_metadata keys are governed by private_metadata rules)"
            )
        is_single_message = fd.message_type is not None and not _is_repeated(fd)
        descriptor = fd.message_type if is_single_message else None
    if len(fields) == 1 and fields[0].name in REQUIRED_EVENT_FIELDS:
        return f"Event.{fields[0].name} is required by the gateway; dropping it would make every event invalid"
    return fields


def _is_repeated(fd: FieldDescriptor) -> bool:
    return bool(fd.is_repeated)


def remover(fields: list[FieldDescriptor]) -> Remover:
    """A function that clears the field at the end of the path; True if something was there."""
    parents = [fd.name for fd in fields[:-1]]
    last = fields[-1]
    name = last.name

    def is_set(msg: Message) -> bool:
        if last.has_presence:
            return msg.HasField(name)
        value = getattr(msg, name)
        return bool(len(value)) if _is_repeated(last) else bool(value)

    def remove(event: Message) -> bool:
        msg = event
        for parent in parents:
            if not msg.HasField(parent):
                return False
            msg = getattr(msg, parent)
        if not is_set(msg):
            return False
        msg.ClearField(name)
        return True

    return remove
