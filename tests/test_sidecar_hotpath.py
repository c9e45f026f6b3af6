"""The sidecar's per-message path outside the policy engine, in process (no gRPC): the shortcuts it
takes for speed give exactly what the slower forms gave.

- acknowledgements stay exact when the ledger reads the forwarded ids from the bytes that leave;
- removals per rule and removed ids, known before a decision's per-event records are built,
  equal what those records say once built;
- the audit trail builds no record when its logger would write none;
- the JSON formatter's cached head gives the same line as encoding the head each time;
- a call's decision records encoded from its template (DecisionLines, their one encoder) are the text
  json gives for the record's dict, and a call's counters published in batches count the same as published at once;
- an events payload judged under the stream's admitted kind (Engine.record_events_admitted) gets the
  outcome record_events_bytes gives it with the stream's identifier.

policy/wire.py's own tests (the payload sniff, the ids reader) are in test_policy_wire.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st
from test_policy_wire import PAYLOADS
from test_properties import SETTINGS, scenarios
from test_sidecar_support import POLICY, dropped, event, identifier, invalid, metadata, payload, sensitive

from telemetry_guard.interceptors.audit import AUDIT_LOGGER_NAME, AuditLog, DecisionLines, identity
from telemetry_guard.interceptors.errors import GuardError
from telemetry_guard.interceptors.guard import Guard
from telemetry_guard.interceptors.stream import StreamGuard
from telemetry_guard.policy import Decision, Engine, default_policy, load_policy
from telemetry_guard.policy.decision import EventRecord, Removal, clip
from telemetry_guard.policy.engine import RECORD_EVENTS, Outcome
from telemetry_guard.sidecar.logs import FIELDS, JsonFormatter
from telemetry_guard.sidecar.metrics import Metrics, StreamTally
from telemetrygateway.v1 import telemetrygateway_pb2 as pb


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = Path(tmp_path_factory.mktemp("policy")) / "policy.yaml"
    path.write_text(POLICY)
    return Engine(load_policy(path))


def _stream(engine: Engine, kind: str = "unlicensed_instance") -> StreamGuard:
    metrics = Metrics()
    guard = Guard(engine, audit=AuditLog(), side="server", tally=metrics.tally)
    stream = StreamGuard(guard, "RecordEvents", None)
    assert stream.accept(metadata(kind).SerializeToString()) is not None
    return stream


def test_acknowledgements_stay_exact_when_a_removed_id_is_also_forwarded(engine: Engine) -> None:
    stream = _stream(engine)
    raw = payload(event("keep"), dropped("gone"), invalid("bad"), dropped("dup"), event("dup"), dropped(""))
    out = stream.accept(raw.SerializeToString())
    assert out is not None
    assert [e.id for e in pb.RecordEventsRequest.FromString(out).events.events] == ["keep", "dup"]
    # The upstream acknowledges "keep" only: "dup" was forwarded and not acknowledged, so it stays unacknowledged.
    answer = pb.RecordEventsResponse(succeeded_events=["keep"]).SerializeToString()
    merged = pb.RecordEventsResponse.FromString(stream.merge(answer))
    assert list(merged.succeeded_events) == ["keep", "gone", "bad"]


def test_a_payload_with_nothing_removed_whole_is_answered_unchanged(engine: Engine) -> None:
    stream = _stream(engine)
    stream.accept(payload(sensitive("s1"), event("e2")).SerializeToString())
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
    call = StreamGuard(Guard(engine, audit=AuditLog(logger), tally=metrics.tally), "RecordEvents", None)
    assert call.accept(metadata("licensed_instance").SerializeToString()) is not None
    request = payload(sensitive("c1"), dropped("c2"))
    decision = engine.record_events_bytes(request.SerializeToString(), identifier("licensed_instance")).decision
    call.audit(decision)
    call.tally.flush()
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

    from telemetry_guard.sidecar import logs

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
    from telemetry_guard.sidecar import logs

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


def test_the_audit_sink_makes_in_one_format_the_line_the_formatter_splices(
    configured_logs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's opening of a line stands for the record's brace: byte for byte the line JsonFormatter.audit_line
    makes of the record, at each level, across millisecond, second and hour boundaries."""
    from telemetry_guard.sidecar import logs

    sink = logs.audit_sink()
    assert sink is not None
    formatter = JsonFormatter()
    lines = DecisionLines("server", "RecordEvents", identifier("licensed_instance"), 'q"uote%s')
    decision = Decision("RecordEvents", "licensed_instance", unknown_fields="kept", events_in=3, events_out=2)
    record = lines.encode(decision, 7, {"r": 2})
    written = 0
    for step in (0.0, 0.001, 0.0015, 0.5, 0.999, 0.9999, 1.0, 61.5, 3600.25):
        created = 1_700_000_000.0 + step
        monkeypatch.setattr(logs.time, "time", itertools.repeat(created).__next__)
        for level in (logging.INFO, logging.DEBUG, logging.WARNING, logging.INFO):
            name = logging.getLevelName(level)
            sink.write(lines.encode(decision, 7, {"r": 2}, sink.opening(level)))
            written += 1
            line = configured_logs.getvalue().splitlines()[-1]
            assert line == formatter.audit_line(name, AUDIT_LOGGER_NAME, os.getpid(), record, created)
            logged = logging.getLogger(AUDIT_LOGGER_NAME).makeRecord(AUDIT_LOGGER_NAME, level, "", 1, record, (), None)
            logged.created, logged.msecs = created, (created - int(created)) * 1000
            assert line == _reference(logged)  # the head as json.dumps writes it
    assert len(configured_logs.getvalue().splitlines()) == written


# -- decision records from a call's template ---------------------------------------------------------


def _plain_record(
    side: str,
    rpc: str,
    ident: pb.Identifier | None,
    decision: Decision,
    request_id: str,
    message: int | None,
    counts: dict[str, int] | None,
) -> str:
    """The record's dict as AuditLog.record documents it, encoded as json.dumps(sort_keys=True) encodes it."""
    kind = ident.WhichOneof("identifier") if ident is not None else None
    record: dict[str, Any] = {"audit": "decision", "side": side, "rpc": rpc, "kind": decision.kind or kind}
    record.update(identity(ident))
    record["request_id"] = request_id or decision.request_id
    if message is not None:
        record["message"] = message
    record["events_in"] = decision.events_in
    record["events_out"] = decision.events_out
    record["removed_per_rule"] = decision.counts() if counts is None else counts
    record["dropped_event_ids"] = [clip(i) for i in decision.dropped_event_ids]
    if decision.unknown_fields:
        record["unknown_fields"] = decision.unknown_fields
    return json.JSONEncoder(sort_keys=True).encode(record)


_INFO = logging.getLogger(f"{AUDIT_LOGGER_NAME}.test-lines")
_INFO.setLevel(logging.INFO)


class _Into:
    """A sink that keeps the records written: its opening of a line is the record's own brace."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def opening(self, level: int) -> str:
        return "{"

    def write(self, line: str) -> None:
        self.lines.append(line)


def _into(lines: list[str]) -> _Into:
    return _Into(lines)


# Text that needs escaping in JSON, non-ASCII, %-format directives, long ids (clipped), and empty.
texts = st.text(max_size=12) | st.sampled_from(
    ["", "%s", "%%d", '"q"', "\\", "\u00e9", "\U0001f600", "\x00\n", "x" * 200]
)
names = st.sampled_from(["instance_id", "service_id", "service_environment", "workspace_id", "license_key"])


@st.composite
def identifiers(draw: st.DrawFn) -> pb.Identifier | None:
    kind = draw(st.sampled_from([None, "licensed_instance", "unlicensed_instance", "managed_service", "workspace"]))
    if kind is None:
        return None
    ident = pb.Identifier()
    member = getattr(ident, kind)
    member.SetInParent()  # the kind is set even when every field is empty
    for name in draw(st.lists(names, unique=True)):
        if name in member.DESCRIPTOR.fields_by_name:
            setattr(member, name, draw(texts))
    return ident


@st.composite
def decisions(draw: st.DrawFn, kind: str | None) -> Decision:
    decision = Decision(
        draw(texts),
        kind=draw(st.sampled_from([None, "", kind, "workspace"])),
        request_id=draw(st.sampled_from(["", "from-the-decision"])),
        unknown_fields=draw(st.sampled_from(["", "kept", "discarded"])),
        events_in=draw(st.integers(-(2**70), 2**70)),
        events_out=draw(st.integers(0, 10**6)),
    )
    rules = st.sampled_from(["kinds.licensed_instance.marketing_tracking", "r%s", 'q"uote', "\u00fcml", "events"])
    for index in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            decision.events.append(EventRecord(index, draw(texts), "f", "a", [], draw(rules)))
        else:
            keys = tuple(draw(st.lists(texts, max_size=3)))
            decision.events.append(EventRecord(index, draw(texts), "f", "a", [Removal(draw(rules), "p", keys)]))
    if draw(st.booleans()):
        decision.removals.append(Removal(draw(rules), "(unknown fields)"))
    return decision


@SETTINGS
@given(
    st.sampled_from(["server", "client"]) | texts,
    texts,
    identifiers(),
    texts,
    st.data(),
)
def test_decision_lines_encode_exactly_what_json_encodes(
    side: str, rpc: str, ident: pb.Identifier | None, request_id: str, data: st.DataObject
) -> None:
    lines = DecisionLines(side, rpc, ident, request_id)
    kind = ident.WhichOneof("identifier") if ident is not None else None
    for _ in range(3):  # one template, several messages
        decision = data.draw(decisions(kind))
        message = data.draw(st.none() | st.integers(0, 2**40))
        counts = data.draw(st.sampled_from([None, decision.counts()]))
        line = lines.encode(decision, message, counts)  # a kind or request_id of its own included
        assert line == _plain_record(side, rpc, ident, decision, request_id, message, counts)
        # ...which is also the line AuditLog.record writes.
        written: list[str] = []
        AuditLog(_INFO, sink=_into(written)).record(
            side=side, rpc=rpc, identifier=ident, decision=decision, request_id=request_id, message=message
        )
        assert written == [line]


@pytest.mark.parametrize(
    "odd",
    [
        {"events_in": True},
        {"events_out": 2.0},
        {"events_in": float("nan")},
        {"message": True},
        {"counts": {"r": True}},
        {"counts": {"r": 1.5}},
        {"counts": {1: 2}},
    ],
)
def test_decision_lines_encode_odd_values_as_json_encodes_them(odd: dict[str, Any]) -> None:
    decision = Decision("RecordEvents", "licensed_instance", unknown_fields="kept", events_in=3, events_out=2)
    for name in ("events_in", "events_out"):
        if name in odd:
            setattr(decision, name, odd[name])
    ident = identifier("licensed_instance")
    lines = DecisionLines("server", "RecordEvents", ident, "req")
    message, counts = odd.get("message", 1), odd.get("counts", {})
    expected = _plain_record("server", "RecordEvents", ident, decision, "req", message, counts)
    assert lines.encode(decision, message, counts) == expected
    written: list[str] = []
    audit = AuditLog(_INFO, sink=_into(written))
    audit.write_decision(lines, decision, odd.get("message", 1), odd.get("counts", {}))
    audit.record(
        side="server",
        rpc="RecordEvents",
        identifier=identifier("licensed_instance"),
        decision=decision,
        request_id="req",
        message=odd.get("message", 1),
        counts=odd.get("counts", {}),
    )
    assert len(written) == 2 and written[0] == written[1]


def test_removed_per_rule_is_exact_for_every_set_and_order_of_rules() -> None:
    """removed_per_rule is written from a template per set of rules (in the order the counts have them), a bounded
    number of them kept per call: exact for every set, order and count, past the bound too."""
    ident = identifier("licensed_instance")
    lines = DecisionLines("server", "RecordEvents", ident, "req")
    decision = Decision("RecordEvents", "licensed_instance", events_in=1, events_out=1)
    rules = ["b", "a%s", 'q"', "\u00fc", "kinds.x.y", "events"]
    for n, order in enumerate(itertools.permutations(rules, 3)):  # 120 orders of 20 sets: past the bound
        counts: dict[str, Any] = {rule: n + i for i, rule in enumerate(order)}
        for value in (counts, {**counts, order[1]: True}, counts):
            expected = _plain_record("server", "RecordEvents", ident, decision, "req", n, value)
            assert lines.encode(decision, n, value) == expected


def test_decision_records_through_logging_carry_the_dict_of_their_line(caplog: pytest.LogCaptureFixture) -> None:
    """One encoder for every output: through logging, the line is the call's template's and the dict attached for
    structured handlers says the same, for a decision of the call and for one with fields of its own."""
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER_NAME)
    lines = DecisionLines("server", "RecordEvents", identifier("licensed_instance"), "req", "overrides.x")
    ours = Decision("RecordEvents", "licensed_instance", events_in=2, events_out=1)
    ours.override = "overrides.x"
    own = Decision("RecordEvents", "workspace", request_id="its-own")  # no override: a stream's metadata message
    for decision in (ours, own):
        AuditLog().write_decision(lines, decision, 3)
    records = [r for r in caplog.records if r.name == AUDIT_LOGGER_NAME]
    written = [json.loads(r.getMessage()) for r in records]
    assert written == [r.telemetry_guard for r in records]  # type: ignore[attr-defined]
    assert [r.getMessage() for r in records] == [lines.encode(ours, 3), lines.encode(own, 3)]
    assert [(w["kind"], w.get("override"), w["request_id"]) for w in written] == [
        ("licensed_instance", "overrides.x", "req"),
        ("workspace", None, "req"),
    ]


def _without_created(metrics: Metrics) -> list[str]:
    """The exposition, without the creation timestamps of the counters."""
    return [line for line in metrics.expose().decode().splitlines() if "_created" not in line]


@pytest.mark.parametrize("level", ["info", "debug", "warning"])
def test_events_payloads_are_written_and_counted_alike_published_at_once_or_in_batches(
    engine: Engine, configured_logs: Any, level: str
) -> None:
    """The same lines and counters whether the call's counters are published after every message or in
    batches (the forwarder's way: at least every FLUSH_SECONDS, and when the stream ends)."""
    from telemetry_guard.sidecar import logs

    logging.getLogger().setLevel(level.upper())
    requests = [
        payload(event("a"), event("b")),
        payload(),
        payload(sensitive("s1"), dropped("d1"), invalid("i1"), event("e1", unknown=True)),
        payload(dropped("x"), dropped("x"), event("x")),
        pb.RecordEventsRequest(),  # skipped, audited by the stream protocol
        metadata("licensed_instance"),  # metadata twice: refused, audited and counted as a refusal
    ]
    outputs = []
    for split in (False, True):
        metrics = Metrics()
        guard = Guard(engine, audit=AuditLog(sink=logs.audit_sink()), side="server", tally=metrics.tally)
        stream = StreamGuard(guard, "RecordEvents", None)
        assert stream.accept(metadata("unlicensed_instance", "req-split").SerializeToString()) is not None
        tally = stream.tally
        out = []
        for request in requests:
            try:
                out.append(stream.accept(request.SerializeToString()))
            except GuardError as exc:
                out.append(exc.code.name)
            finally:
                if not split:
                    tally.flush()  # published at once
        tally.flush()  # as the pump does when the stream ends
        outputs.append((out, _without_created(metrics)))
    assert outputs[0] == outputs[1]
    assert outputs[0][1] != _without_created(Metrics())  # something was counted
    lines = [line.split(", ", 1)[1] for line in configured_logs.getvalue().splitlines()]  # all but the time
    assert len(lines) % 2 == 0 and lines[: len(lines) // 2] == lines[len(lines) // 2 :]
    # Each way: the metadata message, the four payloads (the empty message is skipped unrecorded), the refusal.
    assert sum('"refused"' in line for line in lines) == 2
    assert sum('"audit": "decision"' in line for line in lines) == (12 if level != "warning" else 2)
    assert sum('"audit": "removed_keys"' in line for line in lines) == (2 if level == "debug" else 0)  # one payload


def _tallied(metrics: Metrics) -> list[str]:
    return [line for line in _without_created(metrics) if line.startswith("telemetry_guard_") and "workspace" in line]


def test_a_tally_counts_each_decision_once() -> None:
    metrics = Metrics()
    tally = StreamTally(metrics, "RecordEvents")
    tally.judged("workspace", 3, 2, {"r": 1})
    tally.judged("workspace", 1, 0, {})
    tally.sent()
    assert _tallied(metrics) == []  # within FLUSH_SECONDS of the start: not published yet
    tally.flush()
    text = metrics.expose().decode()
    assert 'telemetry_guard_requests_received_total{kind="workspace",rpc="RecordEvents"} 2.0' in text
    assert 'telemetry_guard_events_received_total{kind="workspace",rpc="RecordEvents"} 4.0' in text
    assert 'telemetry_guard_events_forwarded_total{kind="workspace",rpc="RecordEvents"} 2.0' in text
    assert 'telemetry_guard_requests_forwarded_total{kind="workspace",rpc="RecordEvents"} 1.0' in text
    assert 'telemetry_guard_removals_total{kind="workspace",rpc="RecordEvents",rule="r"} 1.0' in text
    published = _tallied(metrics)
    tally.flush()  # nothing new: nothing changes
    assert _tallied(metrics) == published


def test_a_tally_counts_under_the_kind_it_was_given() -> None:
    """What was counted under one kind label is published under it, even when a later record brings another."""
    metrics = Metrics()
    tally = StreamTally(metrics, "RecordEvents")
    tally.judged(None, 1, 1, {})
    tally.judged("workspace", 3, 2, {"r": 1})
    tally.refused("licensed_instance", GuardError(grpc.StatusCode.PERMISSION_DENIED, "access", "refused"))
    text = metrics.expose().decode()
    assert 'telemetry_guard_events_received_total{kind="none",rpc="RecordEvents"} 1.0' in text
    assert 'telemetry_guard_events_received_total{kind="workspace",rpc="RecordEvents"} 3.0' in text
    assert 'telemetry_guard_removals_total{kind="workspace",rpc="RecordEvents",rule="r"} 1.0' in text
    assert 'telemetry_guard_requests_received_total{kind="licensed_instance",rpc="RecordEvents"} 1.0' in text
    assert 'telemetry_guard_denials_total{code="PERMISSION_DENIED",rpc="RecordEvents",rule="access"} 1.0' in text


def test_a_long_stream_publishes_its_counters_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream that never ends still reaches the registry every FLUSH_SECONDS, at its next count()."""
    metrics = Metrics()
    tally = StreamTally(metrics, "RecordEvents")
    tally.judged("workspace", 5, 5, {})
    assert _tallied(metrics) == []
    monkeypatch.setattr(StreamTally, "FLUSH_SECONDS", 0.0)
    tally.judged("workspace", 2, 1, {"r": 3})
    assert 'telemetry_guard_events_received_total{kind="workspace",rpc="RecordEvents"} 7.0' in _tallied(metrics)
    assert 'telemetry_guard_removals_total{kind="workspace",rpc="RecordEvents",rule="r"} 3.0' in _tallied(metrics)


# -- the stream's admitted kind ------------------------------------------------------------------------


def _judged(engine: Engine, data: bytes, how: Any) -> Outcome[bytes] | str:
    try:
        return how(data)  # type: ignore[no-any-return]
    except DecodeError:
        return "DecodeError"


def _same_outcome(a: Outcome[bytes] | str, b: Outcome[bytes] | str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    assert a.request == b.request
    assert a.decision.counts() == b.decision.counts()
    assert a.decision.dropped_event_ids == b.decision.dropped_event_ids
    assert a.decision == b.decision


@SETTINGS
@given(scenarios(), st.data())
def test_an_admitted_kind_gets_the_outcome_of_its_identifier(scenario: Any, data: st.DataObject) -> None:
    engine, _kind, ident, request = scenario
    kind = engine.check_access(RECORD_EVENTS, ident, "Bearer token")
    if not isinstance(kind, str):
        return  # not admitted: no stream to judge payloads for
    raw = bytearray(request.SerializeToString())
    for _ in range(data.draw(st.integers(0, 2))):  # now and then, bytes the parser refuses or reads otherwise
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=3))
    if data.draw(st.booleans()):
        raw = bytearray(metadata("workspace").SerializeToString())  # metadata again: judged by its own identifier
    slow = Engine(engine.policy, accelerate=False)
    for judge in (engine, slow):
        for detailed in (False, True):
            _same_outcome(
                _judged(judge, bytes(raw), lambda b: judge.record_events_admitted(b, kind, detailed=detailed)),  # noqa: B023
                _judged(judge, bytes(raw), lambda b: judge.record_events_bytes(b, ident, detailed=detailed)),  # noqa: B023
            )


def test_a_kind_not_allowed_is_denied_as_its_identifier_is(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        POLICY.replace(
            "RecordEvents: [licensed_instance, unlicensed_instance, managed_service, workspace]",
            "RecordEvents: [workspace]",
        )
    )
    engine = Engine(load_policy(path))
    data = payload(event("a")).SerializeToString()
    for kind in ("licensed_instance", "unlicensed_instance", "managed_service"):
        admitted = engine.record_events_admitted(data, kind)
        judged = engine.record_events_bytes(data, identifier(kind))
        assert admitted.request is None and admitted.denial is not None
        _same_outcome(admitted, judged)
    _same_outcome(
        engine.record_events_admitted(data, "workspace"), engine.record_events_bytes(data, identifier("workspace"))
    )
    default = Engine(default_policy())
    _same_outcome(
        default.record_events_admitted(data, "licensed_instance"),
        default.record_events_bytes(data, identifier("licensed_instance")),
    )
