"""The audit trail: one JSON record per request message, on the logger `telemetry_guard.audit`.

A record says which RPC, side (server or client), identifier kind and publisher id
(instance_id, service_id or workspace_id; never the license key), the request_id, the
position of the message in its stream, how many things each rule removed, the ids of the
events removed whole, and the refusal (code, rule, message, and the reason where the caller
was given the gateway's own short or opaque message) if the call was refused.
It never holds a removed value.

Names of removed private_metadata keys can say something about the data themselves, so they
go only to a second record at DEBUG level, emitted only when the logger is enabled for
DEBUG. Each record's message is the JSON text; through logging, the same record as a dict is
attached to the LogRecord as the attribute `telemetry_guard` for structured handlers.

A decision's record has one encoder, whatever the output: the call's DecisionLines, a template
of the fields that are constant in the call, made once per call (AuditLog.write_decision). A
process that writes the records itself (a Sink: the sidecar) gets the same line as logging
would write, without a LogRecord per message and without building the dict: the sink's
opening of the line (time, level, logger, pid) takes the place of the record's "{" in the
one format that makes the line.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from telemetry_guard.interceptors.errors import GuardError
from telemetry_guard.policy import Decision, Removal
from telemetry_guard.policy.decision import clip
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

AUDIT_LOGGER_NAME = "telemetry_guard.audit"

# json.dumps(record, sort_keys=True), without building an encoder per record (one record per message).
_encode = json.JSONEncoder(sort_keys=True).encode
_encode_str = json.encoder.encode_basestring_ascii  # what _encode writes for a str (ensure_ascii), key or value

_INT = frozenset((int,))  # counts written as they are (bool, a subclass, is not: JSON writes it true or false)
_SHAPES = 64  # the removed_per_rule templates a call keeps, at most (a few sets of rules remove something)

# The fields of a decision record that change from message to message, in sorted order (a %s each in a template).
_VARIABLE = ("dropped_event_ids", "events_in", "events_out", "message", "removed_per_rule", "unknown_fields")

# The fields of each identifier kind that name the publisher (the license key is a secret).
_IDENTITY_FIELDS: dict[str, tuple[str, ...]] = {
    "licensed_instance": ("instance_id",),
    "unlicensed_instance": ("instance_id",),
    "managed_service": ("service_id", "service_environment"),
    "workspace": ("workspace_id",),
}


def identity(identifier: pb.Identifier | None) -> dict[str, str]:
    """The publisher id fields of an identifier (empty ones left out)."""
    kind = None if identifier is None else identifier.WhichOneof("identifier")
    if kind is None or identifier is None:
        return {}
    member = getattr(identifier, kind)
    return {name: value for name in _IDENTITY_FIELDS[kind] if (value := getattr(member, name))}


def _removal(removal: Removal) -> dict[str, Any]:
    return {"rule": removal.rule, "path": removal.path, "action": removal.action, "keys": list(removal.keys)}


class Sink(Protocol):
    """Where a process that owns its log stream writes the audit trail itself, in place of logger.log (see AuditLog)."""

    def opening(self, level: int) -> str:
        """The text of a line at this level, written now, that takes the place of its record's opening brace."""
        ...

    def write(self, line: str) -> None:
        """One whole line (the newline is the sink's), written and flushed before it returns: record first."""
        ...


def _variable(with_message: bool, with_unknown: bool) -> tuple[str, ...]:
    """The variable fields of a decision record, in sorted order: message and unknown_fields only when given."""
    left_out = {"message"} if not with_message else set()
    if not with_unknown:
        left_out.add("unknown_fields")
    return tuple(name for name in _VARIABLE if name not in left_out)


def _template(constant: dict[str, Any], variable: tuple[str, ...]) -> str:
    """_encode of a record with these constant fields as a %-format: a %s for its opening brace (or a line's opening
    that stands for it), then a %s for each variable field's JSON."""
    fields = []
    for key in sorted([*constant, *variable]):  # the order sort_keys gives: keys are distinct strings
        if key in constant:
            fields.append(_encode({key: constant[key]})[1:-1].replace("%", "%%"))
        else:
            fields.append(f"{_encode_str(key)}: %s")
    return "%s" + ", ".join(fields) + "}"


class DecisionLines:
    """The one encoder of a call's decision records: their JSON text, whichever the output (sink or logging).

    side, rpc, kind, the publisher id, the override and request_id are the same for every message of a call:
    they are encoded once, into a template; only the message index, the counts and the ids change. encode()
    gives exactly the text of json.dumps(record(...), sort_keys=True) (tests compare them on generated
    decisions). A decision with a kind, override or request_id of its own (a stream's metadata message,
    judged by its own identifier) is encoded from a template made for those (kept for the call).
    """

    __slots__ = (
        "_constant",
        "_others",
        "_shapes",
        "_templates",
        "identifier",
        "kind",
        "override",
        "request_id",
        "rpc",
        "side",
    )

    def __init__(
        self,
        side: str,
        rpc: str,
        identifier: pb.Identifier | None,
        request_id: str,
        override: str | None = None,
        kind: str | None = None,
    ) -> None:
        """kind: the record's kind when it is not the identifier's (a decision's own)."""
        self.side = side
        self.rpc = rpc
        self.identifier = identifier
        self.request_id = request_id
        self.override = override
        self.kind = kind or (identifier.WhichOneof("identifier") if identifier is not None else None)
        constant: dict[str, Any] = {"audit": "decision", "side": side, "rpc": rpc, "kind": self.kind}
        constant.update(identity(identifier))
        if override is not None:
            constant["override"] = override
        constant["request_id"] = request_id
        self._constant = constant
        self._templates: tuple[str, ...] = ()  # made at the first encode()
        self._shapes: dict[tuple[str, ...], tuple[tuple[str, ...], str]] = {}  # removed_per_rule: see _counts
        self._others: dict[tuple[str | None, str | None, str], DecisionLines] = {}

    def for_decision(self, decision: Decision) -> DecisionLines:
        """The template of this decision's record: the call's, unless the decision has fields of its own."""
        kind = decision.kind or self.kind
        request_id = self.request_id or decision.request_id
        override = decision.override
        if kind == self.kind and override == self.override and request_id == self.request_id:
            return self
        key = (kind, override, request_id)
        other = self._others.get(key)
        if other is None:
            other = self._others[key] = DecisionLines(self.side, self.rpc, self.identifier, request_id, override, kind)
        return other

    def _made(self) -> tuple[str, ...]:
        """The templates, indexed by (message given) * 2 + (unknown_fields given): a record's two optional fields."""
        if not self._templates:
            self._templates = tuple(
                _template(self._constant, _variable(with_message, with_unknown))
                for with_message in (False, True)
                for with_unknown in (False, True)
            )
        return self._templates

    def encode(
        self, decision: Decision, message: int | None = None, counts: dict[str, int] | None = None, opening: str = "{"
    ) -> str:
        """The JSON text of the record of this decision of the call (counts: decision.counts(), if known).

        opening: what stands for the record's "{": a sink's opening of its line makes the whole line in this one format.
        """
        if (
            (decision.kind and decision.kind != self.kind)
            or decision.override != self.override
            or (decision.request_id and not self.request_id)
        ):
            return self.for_decision(decision).encode(decision, message, counts, opening)
        # Decision.fields, read field by field (no dict per message): tests hold the two to the same text.
        events_in: Any = decision.events_in
        events_out: Any = decision.events_out
        if type(events_in) is not int:
            events_in = _encode(events_in)  # bool or float: as the encoder writes them
        if type(events_out) is not int:
            events_out = _encode(events_out)
        ids = decision.dropped_event_ids
        dropped = _encode([clip(i) for i in ids]) if ids else "[]"
        removed = self._counts(decision.counts() if counts is None else counts)
        given = decision.unknown_fields
        unknown = (_encode_str(given) if type(given) is str else _encode(given)) if given else ""
        templates = self._templates or self._made()
        if message is None:
            if unknown:
                return templates[1] % (opening, dropped, events_in, events_out, removed, unknown)
            return templates[0] % (opening, dropped, events_in, events_out, removed)
        index: Any = message if type(message) is int else _encode(message)
        if unknown:
            return templates[3] % (opening, dropped, events_in, events_out, index, removed, unknown)
        return templates[2] % (opening, dropped, events_in, events_out, index, removed)

    def _counts(self, counts: dict[str, int]) -> str:
        """_encode(counts): from a template per set of rules that removed something (keyed by the rules in the
        dict's order), made once per call; the counts are what change from message to message."""
        if not counts:
            return "{}"
        shape = self._shapes.get(tuple(counts))
        if shape is None:
            shape = self._shape(counts)
            if shape is None:
                return _encode(counts)
        rules, template = shape
        values = tuple(map(counts.__getitem__, rules))
        if _INT.issuperset(map(type, values)):
            return template % values
        return _encode(counts)  # a count that is not an int: as the encoder writes it

    def _shape(self, counts: dict[str, int]) -> tuple[tuple[str, ...], str] | None:
        """The rules of counts in sorted order and the template of their JSON object; None for a rule that is not
        a str (the encoder then writes the dict)."""
        if not all(type(rule) is str for rule in counts):
            return None
        rules = tuple(sorted(counts))
        fields = (_encode_str(rule).replace("%", "%%") + ": %s" for rule in rules)
        shape = rules, "{" + ", ".join(fields) + "}"
        if len(self._shapes) < _SHAPES:
            self._shapes[tuple(counts)] = shape
        return shape

    def record(
        self, decision: Decision, message: int | None = None, counts: dict[str, int] | None = None
    ) -> dict[str, Any]:
        """The record encode() writes, as a dict: what logging attaches for structured handlers."""
        lines = self.for_decision(decision)
        record = dict(lines._constant)
        if message is not None:
            record["message"] = message
        record.update(decision.fields(counts))
        return record


class AuditLog:
    """Writes decisions and refusals. One instance may serve several interceptors.

    sink: a process that owns its log stream (the sidecar) writes the records' lines there
    itself, the same line as through logging, without a LogRecord per message; the logger
    still decides which levels are written.
    """

    def __init__(self, logger: logging.Logger | None = None, *, sink: Sink | None = None) -> None:
        self.logger = logger or logging.getLogger(AUDIT_LOGGER_NAME)
        self._sink = sink

    def record(
        self,
        *,
        side: str,
        rpc: str,
        identifier: pb.Identifier | None,
        decision: Decision | None = None,
        refusal: GuardError | None = None,
        request_id: str = "",
        message: int | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        """One request message: what the policy did to it, or why the call was refused.

        A decision's record is written by write_decision (a template for this one record); a refusal's
        (once per call) is encoded from its dict. counts: decision.counts(), when the caller has it already.
        """
        if refusal is None:
            if decision is not None:
                self.write_decision(DecisionLines(side, rpc, identifier, request_id), decision, message, counts)
            return
        if not self.logger.isEnabledFor(logging.WARNING):
            return  # nothing would be written: build nothing
        kind = identifier.WhichOneof("identifier") if identifier is not None else None
        record: dict[str, Any] = {
            "audit": "decision",
            "side": side,
            "rpc": rpc,
            "kind": decision.kind if decision is not None and decision.kind else kind,
        }
        record.update(identity(identifier))
        if decision is not None and decision.override is not None:
            record["override"] = decision.override
        record["request_id"] = request_id or (decision.request_id if decision is not None else "")
        if message is not None:
            record["message"] = message
        if decision is not None:
            record.update(decision.fields(counts))
        record["refused"] = {"code": refusal.code.name, "rule": refusal.rule, "message": refusal.message}
        if refusal.reason:
            record["refused"]["reason"] = refusal.reason
        self.emit(logging.WARNING, record)

    def writes_decisions(self) -> bool:
        """Whether decisions are written at all (INFO enabled): a caller builds nothing for them otherwise."""
        return self.logger.isEnabledFor(logging.INFO)

    def write_decision(
        self, lines: DecisionLines, decision: Decision, message: int | None = None, counts: dict[str, int] | None = None
    ) -> None:
        """A decision's record (INFO), encoded by the call's DecisionLines for every output; with logging as the
        output its dict is attached too. At DEBUG, the removed key names follow in a record of their own."""
        logger = self.logger
        if not self.writes_decisions():
            return  # nothing would be written (the DEBUG record needs INFO enabled too): build nothing
        sink = self._sink
        if sink is not None:
            sink.write(lines.encode(decision, message, counts, sink.opening(logging.INFO)))
        else:
            extra = {"telemetry_guard": lines.record(decision, message, counts)}
            logger.log(logging.INFO, lines.encode(decision, message, counts), extra=extra)
        if logger.isEnabledFor(logging.DEBUG):
            self._debug_keys(lines.for_decision(decision), decision, message)

    def _debug_keys(self, lines: DecisionLines, decision: Decision, message: int | None) -> None:
        """Key names removed, per event (by index and id) and outside events. DEBUG only."""
        events = [
            {"index": e.index, "id": clip(e.event_id), "removals": [_removal(r) for r in e.removals]}
            for e in decision.events
            if e.removals
        ]
        if not events and not decision.removals:
            return
        record: dict[str, Any] = {"side": lines.side, "rpc": lines.rpc, "kind": lines.kind}
        record["request_id"] = lines.request_id
        if message is not None:
            record["message"] = message
        record["audit"] = "removed_keys"
        record["events"] = events
        record["removals"] = [_removal(r) for r in decision.removals]
        self.emit(logging.DEBUG, record)

    def emit(self, level: int, record: dict[str, Any]) -> None:
        """One record at a level: through the sink when there is one, else logging (the dict attached)."""
        if self.logger.isEnabledFor(level):
            sink = self._sink
            if sink is not None:
                sink.write(sink.opening(level) + _encode(record)[1:])  # a record is never empty
            else:
                self.logger.log(level, _encode(record), extra={"telemetry_guard": record})
