"""Acknowledging the events the policy removed whole, in the response to their payload.

An exporter retries every event that is not in `succeeded_events`. An event the policy
removed whole (feature filter, invalid event) will never be sent, so it is reported as
succeeded in the RecordEventsResponse that answers its payload, or the exporter would retry
it forever. Nothing else is added: an event the servicer (or upstream) did not acknowledge is
never reported as succeeded, and an id removed from a payload that still carries a forwarded
event with the same id is not added either.

A payload whose events were all removed is forwarded empty: the servicer (the gateway
answers every events payload, an empty one with an empty response) answers it, and its
removed ids are merged into that answer. This keeps one response per payload, in order,
with no response invented by the guard and no thread to interleave one.

Responses answer payloads in order, so a FIFO of the removed ids of each forwarded payload
is enough. The ledger is thread-safe without a lock: a sync server's request iterator and
response iterator may run on different threads, but there is one of each (one appends, one
takes), and a deque's append and popleft are atomic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from telemetry_guard.policy import wire
from telemetrygateway.v1 import telemetrygateway_pb2 as pb


class AckLedger:
    """Removed-whole ids of forwarded payloads, waiting for the responses that answer them."""

    def __init__(self) -> None:
        self._pending: deque[tuple[str, ...]] = deque()

    def forwarded(self, request: bytes | None, removed_ids: Sequence[str]) -> None:
        """Call for every events payload, before it is passed on.

        request: the serialized RecordEventsRequest that is passed on (its ids are read only when something
        was removed whole: an id both removed and forwarded is not acknowledged by us).
        """
        ids: tuple[str, ...] = ()
        if removed_ids:
            removed = [i for i in dict.fromkeys(removed_ids) if i]
            if removed:
                kept = {event.id for event in wire.events_by_id(request or b"")}
                ids = tuple(i for i in removed if i not in kept)
        self._pending.append(ids)

    def merge(self, response: Any) -> Any:
        """The response to the oldest unanswered payload, its removed ids added.

        Accepts what the servicer or channel produces: a RecordEventsResponse (copied, never
        changed in place) or its serialized bytes (raw-bytes handlers and channels); returns
        the same form. A response with no payload waiting passes unchanged.
        """
        try:
            ids = self._pending.popleft()
        except IndexError:  # no payload waiting
            return response
        if not ids:
            return response
        if isinstance(response, bytes | bytearray):
            merged = pb.RecordEventsResponse.FromString(bytes(response))
            _add(merged, ids)
            return merged.SerializeToString()
        if not isinstance(response, pb.RecordEventsResponse):
            raise TypeError(f"RecordEvents response of type {type(response).__name__}")
        merged = pb.RecordEventsResponse()
        merged.CopyFrom(response)
        _add(merged, ids)
        return merged


def _add(response: pb.RecordEventsResponse, ids: tuple[str, ...]) -> None:
    present = set(response.succeeded_events)
    response.succeeded_events.extend(i for i in ids if i not in present)
