"""What Sourcegraph's in-instance redaction writes in place of a non-string value of an allowlisted key.

Sourcegraph's redact.go (internal/telemetry/sensitivemetadataallowlist) replaces such a value with
fmt.Sprintf("ERROR: value of allowlisted key was not a string, got: %T", value.Kind): %T of the
google.protobuf.Value oneof wrapper the value holds (*structpb.Value_BoolValue, ...), and "<nil>"
for a Value with no kind set. `non_string: sourcegraph-marker` writes the same string, so that what
reaches the gateway is byte for byte what a Sourcegraph instance would have exported.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

PREFIX = "ERROR: value of allowlisted key was not a string, got: "
UNSET = "<nil>"  # Go's %T of a nil interface: a Value whose kind is not set

# The members of google.protobuf.Value's oneof, by field number (null_value = 1 ... list_value = 6).
VALUE_KINDS: dict[int, str] = {fd.number: fd.name for fd in struct_pb2.Value.DESCRIPTOR.oneofs_by_name["kind"].fields}


def go_type(kind: str | None) -> str:
    """The Go type protoc-gen-go gives a Value oneof member: bool_value -> *structpb.Value_BoolValue."""
    if kind is None:
        return UNSET
    return "*structpb.Value_" + "".join(word.capitalize() for word in kind.split("_"))


def sourcegraph_marker(kind: str | None) -> str:
    """The string Sourcegraph writes for a non-string value holding `kind` (None: no kind set)."""
    return PREFIX + go_type(kind)
