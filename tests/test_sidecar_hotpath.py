"""The sidecar's per-message path outside the policy engine, in process (no gRPC): the shortcuts it
takes for speed give exactly what the slower forms gave.

- the forwarded ids for the acknowledgement ledger, read from the bytes that leave (wire.events_by_id),
  are the ids a full parse gives, and acknowledgements stay exact;
- removals per rule and removed ids, known before a decision's per-event records are built,
  equal what those records say once built;
- the audit trail builds no record when its logger would write none;
- the JSON formatter's cached head gives the same line as encoding the head each time.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from test_sidecar_support import POLICY, dropped, event, identifier, invalid, metadata, payload, sensitive

from interceptors.audit import AUDIT_LOGGER_NAME, AuditLog
from interceptors.errors import GuardError
from interceptors.guard import Guard
from interceptors.stream import StreamGuard
from policy import Decision, Engine, load_policy
from policy.decision import EventRecord, Removal
from sidecar import wire
from sidecar.forward import Forwarder
from sidecar.logs import FIELDS, JsonFormatter
from sidecar.metrics import Metrics, MetricsAudit
from telemetrygateway.v1 import telemetrygateway_pb2 as pb


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = Path(tmp_path_factory.mktemp("policy")) / "policy.yaml"
    path.write_text(POLICY)
    return Engine(load_policy(path))


class _NoChannel:
    """What Forwarder takes from a channel at construction; nothing is ever called."""

    def stream_stream(self, *args: Any) -> None:
        return None

    def unary_unary(self, *args: Any) -> None:
        return None

    def stream_unary(self, *args: Any) -> None:
        return None


def _stream(engine: Engine, kind: str = "unlicensed_instance") -> tuple[Forwarder, StreamGuard]:
    metrics = Metrics()
    guard = Guard(engine, audit=MetricsAudit(metrics), side="server")
    forwarder = Forwarder(_NoChannel(), lambda: guard, metrics)  # type: ignore[arg-type]
    stream = StreamGuard(guard, "RecordEvents", None)
    assert stream.accept(metadata(kind).SerializeToString()) is not None
    return forwarder, stream


PAYLOADS = {
    "plain": payload(event("a"), event("b")),
    "empty": payload(),
    "unknown fields": payload(event("u1", unknown=True), sensitive("u2")),
    "duplicates and unicode": payload(event("d"), event("d"), event("ü-ñ-\u6f22"), event("")),
    "metadata message": metadata("licensed_instance"),
    "no payload": pb.RecordEventsRequest(),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_events_by_id_reads_the_ids_a_full_parse_reads(name: str) -> None:
    data = PAYLOADS[name].SerializeToString()
    full = pb.RecordEventsRequest.FromString(data)
    expected = [e.id for e in full.events.events] if full.WhichOneof("payload") == "events" else []
    assert [e.id for e in wire.events_by_id(data)] == expected


def test_events_by_id_refuses_what_does_not_parse() -> None:
    with pytest.raises(DecodeError):
        wire.events_by_id(b"\x12\x05\x0a")  # events payload longer than the bytes


def test_acknowledgements_stay_exact_when_a_removed_id_is_also_forwarded(engine: Engine) -> None:
    forwarder, stream = _stream(engine)
    raw = payload(event("keep"), dropped("gone"), invalid("bad"), dropped("dup"), event("dup"), dropped(""))
    out = forwarder._filter_events(stream, raw.SerializeToString())
    assert out is not None
    assert [e.id for e in pb.RecordEventsRequest.FromString(out).events.events] == ["keep", "dup"]
    # The upstream acknowledges "keep" only: "dup" was forwarded and not acknowledged, so it stays unacknowledged.
    answer = pb.RecordEventsResponse(succeeded_events=["keep"]).SerializeToString()
    merged = pb.RecordEventsResponse.FromString(stream.merge(answer))
    assert list(merged.succeeded_events) == ["keep", "gone", "bad"]


def test_a_payload_with_nothing_removed_whole_is_answered_unchanged(engine: Engine) -> None:
    forwarder, stream = _stream(engine)
    forwarder._filter_events(stream, payload(sensitive("s1"), event("e2")).SerializeToString())
    answer = pb.RecordEventsResponse(succeeded_events=["e2"]).SerializeToString()
    assert stream.merge(answer) == answer


def _decisions(engine: Engine) -> list[Decision]:
    out = []
    for kind in ("licensed_instance", "unlicensed_instance", "managed_service"):
        for request in PAYLOADS.values():
            outcome = engine.record_events_bytes(request.SerializeToString(), identifier(kind), detailed=True)
            out.append(outcome.decision)
        mixed = payload(sensitive("m1"), dropped("m2"), invalid("m3"), sensitive("m4"), event("m5", unknown=True))
        mixed.MergeFromString(b"\x9a\x06\x01x")  # an unknown field outside the events
        out.append(engine.record_events_bytes(mixed.SerializeToString(), identifier(kind)).decision)
    by_hand = Decision("RecordEvents", kind="workspace")
    by_hand.events.append(EventRecord(0, "x", "f", "a", dropped_by="events"))
    by_hand.events.append(
        EventRecord(1, "y", "f", "a", removals=[Removal("r1", "p", ("k1", "k2")), Removal("events", "q")])
    )
    by_hand.removals.append(Removal("r1", "unknown", ("a", "b", "c")))
    out.append(by_hand)
    return out


def test_counts_and_removed_ids_known_up_front_match_the_records(engine: Engine) -> None:
    decisions = _decisions(engine)
    assert any(d.counts() for d in decisions)
    for decision in decisions:
        counts, removed = decision.counts(), decision.dropped_event_ids  # before the records exist
        by_records: dict[str, int] = {}
        for record in decision.events:
            if record.dropped_by is not None:
                by_records[record.dropped_by] = by_records.get(record.dropped_by, 0) + 1
            for removal in record.removals:
                by_records[removal.rule] = by_records.get(removal.rule, 0) + removal.count
        for removal in decision.removals:
            by_records[removal.rule] = by_records.get(removal.rule, 0) + removal.count
        assert counts == by_records
        assert removed == [r.event_id for r in decision.events if r.dropped_by is not None]


class _Untouchable:
    """A decision that must not be looked at."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"decision.{name} read although nothing is written")


def test_no_audit_record_is_built_when_the_logger_would_write_none() -> None:
    logger = logging.getLogger(f"{AUDIT_LOGGER_NAME}.test-quiet")
    logger.setLevel(logging.WARNING)
    AuditLog(logger).record(side="server", rpc="RecordEvents", identifier=None, decision=_Untouchable())  # type: ignore[arg-type]


def test_metrics_are_counted_even_when_no_record_is_written(engine: Engine) -> None:
    logger = logging.getLogger(f"{AUDIT_LOGGER_NAME}.test-metrics")
    logger.setLevel(logging.WARNING)
    metrics = Metrics()
    audit = MetricsAudit(metrics, logger)
    request = payload(sensitive("c1"), dropped("c2"))
    decision = engine.record_events_bytes(request.SerializeToString(), identifier("licensed_instance")).decision
    audit.record(side="server", rpc="RecordEvents", identifier=identifier("licensed_instance"), decision=decision)
    text = metrics.expose().decode()
    for rule, count in decision.counts().items():
        assert f'rule="{rule}"}} {float(count)}' in text


def _reference(record: logging.LogRecord) -> str:
    """The line before the head was cached: the head dict encoded for every record."""
    head = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(),
        "logger": record.name,
        "pid": record.process,
    }
    message = record.getMessage()
    return json.dumps(head)[:-1] + (", " + message[1:] if len(message) > 2 else "}")


def test_the_json_formatter_writes_audit_lines_as_before() -> None:
    formatter = JsonFormatter()
    logger = logging.getLogger(AUDIT_LOGGER_NAME)
    fields = {"audit": "decision", "rpc": "RecordEvents", "removed_per_rule": {"r": 2}, "kind": 'q"uote'}
    created = 1_700_000_000.0
    for level in (logging.INFO, logging.WARNING, logging.DEBUG, logging.INFO):
        for step in (0.0, 0.001, 0.999, 1.0, 61.5, 3600.25):
            for text in (json.dumps(fields, sort_keys=True), "{}"):
                record = logger.makeRecord(logger.name, level, __file__, 1, text, (), None, None, {FIELDS: fields})
                record.created = created + step
                record.msecs = (record.created - int(record.created)) * 1000
                line = formatter.format(record)
                assert line == _reference(record)
                assert json.loads(line)["level"] == logging.getLevelName(level).lower()


def test_the_json_formatter_keeps_other_records_whole() -> None:
    record = logging.getLogger("telemetry_guard.sidecar").makeRecord(
        "telemetry_guard.sidecar", logging.INFO, __file__, 1, "serving", (), None, None, {FIELDS: {"port": 1}}
    )
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["port"], line["level"], line["logger"]) == ("serving", 1, "info", record.name)


@pytest.fixture
def configured_logs() -> Any:
    """sidecar.logs.configure() into a StringIO, everything it changes in logging put back after."""
    import io

    from sidecar import logs

    root = logging.getLogger()
    saved = (
        list(root.handlers),
        root.level,
        logging.getLogger("grpc").level,
        logging.logThreads,
        logging.logMultiprocessing,
        logging._srcfile,
    )
    out = io.StringIO()
    logs.configure("debug", out)
    try:
        yield out
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handlers, level, grpc_level, threads, multiprocessing, srcfile = saved
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("grpc").setLevel(grpc_level)
        logging.logThreads, logging.logMultiprocessing, logging._srcfile = threads, multiprocessing, srcfile
        logs._configured.clear()


def test_the_audit_sink_writes_the_lines_logging_writes(engine: Engine, configured_logs: Any) -> None:
    """The sidecar's audit trail skips logging's machinery, not a character of its lines."""
    from sidecar import logs

    sink = logs.audit_sink()
    assert sink is not None
    decisions = _decisions(engine)
    refusal = GuardError(grpc.StatusCode.PERMISSION_DENIED, "access.RecordEvents", 'kind "x" refused')
    for via in (None, sink):
        audit = AuditLog(sink=via)
        for index, decision in enumerate(decisions):
            audit.record(
                side="server",
                rpc="RecordEvents",
                identifier=identifier("licensed_instance"),
                decision=decision,
                message=index,
            )
        audit.record(side="server", rpc="RecordEvents", identifier=None, refusal=refusal)
    lines = configured_logs.getvalue().splitlines()
    assert len(lines) % 2 == 0 and len(lines) > 2 * len(decisions)  # DEBUG adds the removed-keys records
    by_logging, by_sink = lines[: len(lines) // 2], lines[len(lines) // 2 :]
    for old, new in zip(by_logging, by_sink, strict=True):
        assert old.split(", ", 1)[1] == new.split(", ", 1)[1]  # all but the time
        assert json.loads(old).keys() == json.loads(new).keys()
    assert {json.loads(line)["level"] for line in by_sink} == {"info", "debug", "warning"}
