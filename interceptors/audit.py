"""The audit trail: one JSON record per request message, on the logger `telemetry_guard.audit`.

A record says which RPC, side (server or client), identifier kind and publisher id
(instance_id, service_id or workspace_id; never the license key), the request_id, the
position of the message in its stream, how many things each rule removed, the ids of the
events removed whole, and the refusal (code, rule, message) if the call was refused.
It never holds a removed value.

Names of removed private_metadata keys can say something about the data themselves, so they
go only to a second record at DEBUG level, emitted only when the logger is enabled for
DEBUG. Each record's message is the JSON text; the same dict is attached to the LogRecord
as the attribute `telemetry_guard` for structured handlers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from interceptors.errors import GuardError
from policy import Decision, Removal
from policy.decision import clip
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

AUDIT_LOGGER_NAME = "telemetry_guard.audit"

# json.dumps(record, sort_keys=True), without building an encoder per record (one record per message).
_encode = json.JSONEncoder(sort_keys=True).encode

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


# Writes one encoded audit record at a level, in place of logger.log (see AuditLog).
Sink = Callable[[int, str], None]


class AuditLog:
    """Writes decisions and refusals. One instance may serve several interceptors.

    sink: a process that owns its log stream (the sidecar) writes the encoded records there
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

        counts: decision.counts(), when the caller has it already.
        """
        level = logging.WARNING if refusal is not None else logging.INFO
        if not self.logger.isEnabledFor(level):
            return  # nothing would be written (the DEBUG record needs INFO enabled too): build nothing
        kind = identifier.WhichOneof("identifier") if identifier is not None else None
        record: dict[str, Any] = {
            "audit": "decision",
            "side": side,
            "rpc": rpc,
            "kind": decision.kind if decision is not None and decision.kind else kind,
        }
        record.update(identity(identifier))
        record["request_id"] = request_id or (decision.request_id if decision is not None else "")
        if message is not None:
            record["message"] = message
        if decision is not None:
            record["events_in"] = decision.events_in
            record["events_out"] = decision.events_out
            record["removed_per_rule"] = decision.counts() if counts is None else counts
            record["dropped_event_ids"] = [clip(i) for i in decision.dropped_event_ids]
            if decision.unknown_fields:
                record["unknown_fields"] = decision.unknown_fields
        if refusal is not None:
            record["refused"] = {"code": refusal.code.name, "rule": refusal.rule, "message": refusal.message}
        self._emit(level, record)
        if decision is not None and self.logger.isEnabledFor(logging.DEBUG):
            self._debug_keys(record, decision)

    def _debug_keys(self, base: dict[str, Any], decision: Decision) -> None:
        """Key names removed, per event (by index and id) and outside events. DEBUG only."""
        events = [
            {"index": e.index, "id": clip(e.event_id), "removals": [_removal(r) for r in e.removals]}
            for e in decision.events
            if e.removals
        ]
        if not events and not decision.removals:
            return
        record: dict[str, Any] = {k: base[k] for k in ("side", "rpc", "kind", "request_id", "message") if k in base}
        record["audit"] = "removed_keys"
        record["events"] = events
        record["removals"] = [_removal(r) for r in decision.removals]
        self._emit(logging.DEBUG, record)

    def _emit(self, level: int, record: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(level):
            if self._sink is not None:
                self._sink(level, _encode(record))
            else:
                self.logger.log(level, _encode(record), extra={"telemetry_guard": record})
