"""Policy unit tests written in YAML: a request in, what is expected out.

A cases file holds named cases. Each gives an input - the RPC, the caller's
identifier (and authorization header), the request message as protobuf JSON - and
expectations about what the engine does with it: the exact message that leaves,
removals that must happen (a case can assert that something was removed), the events
dropped, or the denial code, or the override whose rules applied. Cases run on the same
Engine as the interceptors; `override: NAME` runs a case as if its identifier matched that
override (one matched on a license key fingerprint: a cases file never holds the key).

    version: 1
    cases:
      - name: marketing tracking never leaves a licensed instance
        rpc: RecordEvents
        identifier: {licensed_instance: {license_key: test-key}}
        request: {events: {events: [{id: e1, feature: cody.chat, action: submitted,
                                      timestamp: "2024-05-01T00:00:00Z",
                                      marketing_tracking: {url: "https://example.com/x"}}]}}
        expect:
          removed: [{path: marketing_tracking, event: e1}]

A failing case reports a diff of the output. The diff shows what leaves; a value the
case expected that does not leave is never printed (it may be the very value the
policy removed), and neither are map keys (private_metadata keys) unless asked.
"""

from __future__ import annotations

import difflib
import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from telemetry_guard.policy import access, loader
from telemetry_guard.policy.decision import Decision
from telemetry_guard.policy.engine import Engine, Outcome
from telemetry_guard.policy.errors import PolicyError, Problem
from telemetry_guard.policy.kinds import RPCS
from telemetry_guard.policy.yamlsource import Located, Path_, read_all
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

REQUEST_TYPES: Final[Mapping[str, type[Message]]] = {
    "RecordEvents": pb.RecordEventsRequest,
    "RecordEvent": pb.RecordEventRequest,
    "PublishInstanceUserMetadata": pb.PublishInstanceUserMetadataRequest,
}

STATUS_CODES: Final = tuple(code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK)

# Fields whose JSON object keys are data (map keys, Struct keys), not field names.
_KEYED_FIELDS: Final = frozenset({"private_metadata", "metadata", "legacy_metadata", "flags"})

_REMOVAL: Final[dict[str, Any]] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {
            "type": "string",
            "minLength": 1,
            "description": "Field path the removal is recorded under (marketing_tracking, "
            "parameters.private_metadata, users.primary_email, (event) for a whole event).",
        },
        "rule": {"type": "string", "minLength": 1, "description": "The policy key that removed it."},
        "keys": {
            "type": "array",
            "items": {"type": "string"},
            "description": "private_metadata keys (or field names) that must be among those removed.",
        },
        "event": {"type": ["integer", "string"], "description": "The event: its index in the request, or its id."},
        "action": {"enum": ["removed", "replaced", "merged"]},
    },
}

CASES_SCHEMA: Final[dict[str, Any]] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "telemetry-guard policy test cases",
    "type": "object",
    "additionalProperties": False,
    "required": ["cases"],
    "properties": {
        "version": {"const": 1},
        "description": {"type": "string"},
        "policy": {
            "type": ["string", "array"],
            "items": {"type": "string", "minLength": 1},
            "minLength": 1,
            "minItems": 1,
            "description": "The policy (or policies) these cases are for: a path relative to this file, or "
            "builtin:default. `test POLICY DIR` runs only the files for POLICY (and those that name none).",
        },
        "cases": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "request", "expect"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "description": {"type": "string"},
                    "rpc": {"enum": list(RPCS), "description": "Default: RecordEvents."},
                    "identifier": {
                        "type": "object",
                        "description": "The caller's Identifier as protobuf JSON (for stream RPCs whose "
                        "request is not the metadata message).",
                    },
                    "override": {
                        "type": "string",
                        "minLength": 1,
                        "description": "Run the case as if the identifier matched the policy's override of this "
                        "name (for an override matched on a license key fingerprint, whose key a cases file must "
                        "not hold). Without it, an override applies when the identifier matches it.",
                    },
                    "authorization": {
                        "type": "string",
                        "description": "The authorization request metadata, e.g. 'Bearer test'.",
                    },
                    "request": {"type": "object", "description": "The request message as protobuf JSON."},
                    "expect": {
                        "type": "object",
                        "additionalProperties": False,
                        "minProperties": 1,
                        "properties": {
                            "output": {
                                "type": ["object", "null"],
                                "description": "The exact message that leaves (null: nothing leaves).",
                            },
                            "denial": {
                                "description": "A status code name, {code, rule}, or null: must not be denied.",
                                "oneOf": [
                                    {"type": "null"},
                                    {"enum": list(STATUS_CODES)},
                                    {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["code"],
                                        "properties": {
                                            "code": {"enum": list(STATUS_CODES)},
                                            "rule": {"type": "string"},
                                        },
                                    },
                                ],
                            },
                            "removed": {
                                "type": "array",
                                "items": _REMOVAL,
                                "description": "Removals that must be in the decision record; [] = nothing removed.",
                            },
                            "dropped_events": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                            "override": {
                                "type": ["string", "null"],
                                "description": "The override whose rules must apply (its name), or null: none.",
                            },
                        },
                    },
                },
            },
        },
    },
}


class CaseFileError(PolicyError):
    """A cases file cannot be used: every problem, with file, line and column."""


@dataclass(frozen=True, slots=True)
class RemovalSpec:
    path: str
    rule: str | None = None
    keys: tuple[str, ...] = ()
    event: int | str | None = None
    action: str | None = None

    def __str__(self) -> str:
        parts = [f"path {self.path}"]
        if self.rule:
            parts.append(f"rule {self.rule}")
        if self.event is not None:
            parts.append(f"event {self.event}")
        if self.action:
            parts.append(f"action {self.action}")
        if self.keys:
            parts.append(f"keys {', '.join(self.keys)}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Case:
    file: str
    line: int
    name: str
    rpc: str
    identifier: pb.Identifier | None
    authorization: str | None
    request: Message  # never passed to the engine itself (it filters in place): see message()
    output: Mapping[str, Any] | None = None  # as to_json() writes it, so it compares with what leaves
    expects_output: bool = False
    denial: tuple[str, str | None] | None = None  # (code, rule)
    expects_denial: bool = False
    removed: tuple[RemovalSpec, ...] = ()
    expects_no_removal: bool = False  # removed: [] - nothing may be removed
    dropped_events: tuple[str, ...] | None = None
    override: str | None = None  # run as if the identifier matched this override (Engine.pinned)
    expected_override: str | None = None
    expects_override: bool = False

    def message(self) -> Message:
        """A fresh copy of the request message."""
        return _copy(self.request)


@dataclass(frozen=True)
class CaseResult:
    case: Case
    failures: tuple[str, ...]
    diff: tuple[str, ...]
    leaves: Mapping[str, Any] | None  # what left, as protobuf JSON (None: nothing)
    decision: Decision
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class CaseFileResult:
    file: str
    results: tuple[CaseResult, ...]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.results if not r.passed)


# -- loading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseFile:
    """A cases file: its cases, and the policies it says they are for (as written; none: any)."""

    file: Path
    cases: tuple[Case, ...]
    policies: tuple[str, ...]

    def is_for(self, policy: str) -> bool:
        """Whether policy (a path, or builtin:default) is one this file names; True when it names none."""
        if not self.policies:
            return True
        return _policy_file(policy, Path.cwd()) in {_policy_file(ref, self.file.parent) for ref in self.policies}

    def named(self) -> str:
        """The policies it is for, as a reader finds them: relative to the working directory."""
        shown = []
        for ref in self.policies:
            path = _policy_file(ref, self.file.parent)
            if ref == loader.BUILTIN_DEFAULT or not path.is_relative_to(Path.cwd()):
                shown.append(ref if ref == loader.BUILTIN_DEFAULT else str(path))
            else:
                shown.append(str(path.relative_to(Path.cwd())))
        return " or ".join(shown)


def _policy_file(ref: str, base: Path) -> Path:
    if ref == loader.BUILTIN_DEFAULT:
        return loader.default_policy_path()
    return (base / ref).resolve()


def load_case_file(path: str | Path) -> CaseFile:
    """Read and check a cases file; raise CaseFileError listing every problem (as the policy loader words them)."""
    cases, doc = _load(Path(path))
    named = doc.data.get("policy", ())
    return CaseFile(Path(path), cases, (named,) if isinstance(named, str) else tuple(named))


def load_cases(path: str | Path) -> tuple[Case, ...]:
    """The cases of a cases file (load_case_file)."""
    return load_case_file(path).cases


def _load(path: Path) -> tuple[tuple[Case, ...], Located]:
    doc, problems = read_all(Path(path))
    if doc is None:
        raise CaseFileError(problems)
    problems += loader.schema_problems(doc, CASES_SCHEMA)
    if problems:
        raise CaseFileError(problems)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(doc.data["cases"]):
        name = item["name"]
        if name in seen:
            first = seen[name]
            problems.append(doc.problem(("cases", i, "name"), f"duplicate case name {name!r} (first at line {first})"))
            continue
        seen[name] = doc.where(("cases", i))[0]
        case = _case(doc, i, item, problems)
        if case is not None:
            cases.append(case)
    if problems:
        raise CaseFileError(problems)
    return tuple(cases), doc


def _parse(doc: Located, where: Path_, data: Mapping[str, Any], message: Message, problems: list[Problem]) -> bool:
    try:
        json_format.ParseDict(dict(data), message)
    except json_format.ParseError as exc:
        path, sentence = _parse_problem(str(exc), message)
        problems.append(doc.problem((*where, *path), sentence))
        return False
    return True


_MISSING_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w{1,100})" at "([\w.\[\]]+)"')


def _parse_problem(text: str, message: Message) -> tuple[Path_, str]:
    """Where in the request a protobuf JSON error is (relative to it), and a plain sentence for it."""
    type_name = message.DESCRIPTOR.name
    missing = _MISSING_FIELD.search(text)
    if missing is None:
        places = _FIELD_AT.findall(text)
        return (_json_path(places[-1].rstrip(".")) if places else ()), parse_error_text(Exception(text), type_name)
    full_name, field, at = missing.groups()
    descriptor = message.DESCRIPTOR.file.pool.FindMessageTypeByName(full_name)
    names = [f.name for f in descriptor.fields]
    close = difflib.get_close_matches(field, names, n=1, cutoff=0.6)
    suggestion = f" (did you mean {close[0]}?)" if close else ""
    sentence = f"{descriptor.name} has no field {field!r}{suggestion}; its fields: {', '.join(names)}"
    return (*_json_path(at), field), sentence


def _json_path(at: str) -> Path_:
    """'RecordEventsRequest.events.events[0]' -> ('events', 'events', 0): below the request message."""
    out: list[str | int] = []
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", at)[1:]:
        out.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(out)


def _case(doc: Located, i: int, item: Mapping[str, Any], problems: list[Problem]) -> Case | None:
    here: Path_ = ("cases", i)
    rpc = item.get("rpc", "RecordEvents")
    request = REQUEST_TYPES[rpc]()
    ok = _parse(doc, (*here, "request"), item["request"], request, problems)
    identifier: pb.Identifier | None = None
    if "identifier" in item:
        identifier = pb.Identifier()
        ok = _parse(doc, (*here, "identifier"), item["identifier"], identifier, problems) and ok
    expect = item["expect"]
    output: dict[str, Any] | None = None
    if expect.get("output") is not None:
        expected = REQUEST_TYPES[rpc]()
        ok = _parse(doc, (*here, "expect", "output"), expect["output"], expected, problems) and ok
        output = to_json(expected)
    denial: tuple[str, str | None] | None = None
    raw = expect.get("denial")
    if isinstance(raw, str):
        denial = (raw, None)
    elif isinstance(raw, dict):
        denial = (raw["code"], raw.get("rule"))
    if not ok:
        return None
    return Case(
        file=doc.file,
        line=doc.where(here)[0],
        name=item["name"],
        rpc=rpc,
        identifier=identifier,
        authorization=item.get("authorization"),
        request=request,
        output=output,
        expects_output="output" in expect,
        denial=denial,
        expects_denial="denial" in expect,
        removed=tuple(
            RemovalSpec(r["path"], r.get("rule"), tuple(r.get("keys", ())), r.get("event"), r.get("action"))
            for r in expect.get("removed", ())
        ),
        expects_no_removal=expect.get("removed") == [],
        dropped_events=tuple(expect["dropped_events"]) if "dropped_events" in expect else None,
        override=item.get("override"),
        expected_override=expect.get("override"),
        expects_override="override" in expect,
    )


# -- running -------------------------------------------------------------------------------


def stream_identifier(request: Message) -> pb.Identifier | None:
    """The identifier a request carries itself (a stream's metadata message, or RecordEvent's metadata)."""
    if isinstance(request, pb.RecordEventRequest):
        return request.metadata.identifier if request.HasField("metadata") else None
    if isinstance(request, pb.RecordEventsRequest | pb.PublishInstanceUserMetadataRequest):
        return request.metadata.identifier if request.WhichOneof("payload") == "metadata" else None
    return None


def apply_request(
    engine: Engine, request: Message, identifier: pb.Identifier | None, *, detailed: bool = True
) -> Outcome[Any]:
    """Run one request message through the engine method of its RPC (the request is filtered in place)."""
    if isinstance(request, pb.RecordEventsRequest):
        return engine.record_events(request, identifier, detailed=detailed)
    if isinstance(request, pb.RecordEventRequest):
        return engine.record_event(request, detailed=detailed)
    if isinstance(request, pb.PublishInstanceUserMetadataRequest):
        return engine.publish_instance_user_metadata(request, identifier)
    raise TypeError(f"not a request message of {', '.join(RPCS)}: {type(request).__name__}")


def evaluate(engine: Engine, case: Case) -> Outcome[Any]:
    """A case's outcome: access and credentials first (as the interceptors do), then the engine."""
    request = case.message()
    identifier = case.identifier or stream_identifier(request)
    payload = None if case.rpc == "RecordEvent" else request.WhichOneof("payload")
    if identifier is None and payload not in (None, "metadata"):  # a payload of a stream that sent no metadata
        return Outcome(None, Decision(case.rpc, denial=access.before_metadata(case.rpc, payload)))
    admitted = engine.check_access(case.rpc, identifier, case.authorization)
    if not isinstance(admitted, str):
        decision = Decision(case.rpc, denial=admitted)
        if identifier is not None:
            decision.kind = identifier.WhichOneof("identifier")
            matched = engine.override_for(identifier)
            decision.override = None if matched is None else matched.name
        return Outcome(None, decision)
    return apply_request(engine, request, case.identifier)


def to_json(message: Message) -> dict[str, Any]:
    """A message as protobuf JSON with the .proto field names (the names policies use)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _pinned(engine: Engine, case: Case) -> Engine | str:
    """The engine a case with `override:` runs on, or why it cannot run."""
    if case.override is None:
        return engine
    found = next((o for o in engine.policy.overrides if o.name == case.override), None)
    if found is None:
        known = ", ".join(o.name for o in engine.policy.overrides) or "none"
        return f"the policy has no override {case.override!r} (it has: {known})"
    identifier = case.identifier or stream_identifier(case.request)
    kind = None if identifier is None else identifier.WhichOneof("identifier")
    if kind != found.kind:
        return f"override {case.override!r} matches {found.kind} identifiers; the case's identifier is {kind}"
    return engine.pinned(case.override)


def run_case(engine: Engine, case: Case, *, show_keys: bool = False) -> CaseResult:
    started = time.perf_counter()
    pinned = _pinned(engine, case)
    if isinstance(pinned, str):
        return CaseResult(case, (pinned,), (), None, Decision(case.rpc), time.perf_counter() - started)
    engine = pinned
    outcome = evaluate(engine, case)
    decision = outcome.decision
    leaves = None if outcome.request is None else to_json(outcome.request)
    failures: list[str] = []
    diff: list[str] = []

    denial = decision.denial
    if case.expects_denial:
        if case.denial is None and denial is not None:
            failures.append(f"expected no denial, got {denial.code.name} by rule {denial.rule}")
        elif case.denial is not None:
            code, rule = case.denial
            if denial is None:
                failures.append(f"expected denial {code}, but the request was let through")
            elif denial.code.name != code or (rule is not None and denial.rule != rule):
                want = code + (f" by rule {rule}" if rule else "")
                failures.append(f"expected denial {want}, got {denial.code.name} by rule {denial.rule}")

    if case.expects_output:
        expected = case.output
        if expected != leaves:
            if leaves is None:
                failures.append(
                    "expected an output message, but nothing leaves"
                    + (f" (denied: {denial.code.name} by rule {denial.rule})" if denial else "")
                )
            elif expected is None:
                failures.append("expected nothing to leave, but a message leaves")
            else:
                failures.append("the message that leaves differs from expect.output")
            diff = output_diff(expected, leaves, show_keys=show_keys)

    flat = list(_flat_removals(decision))
    if case.removed == () and case.expects_no_removal and flat:
        seen = "; ".join(_removal_text(r, show_keys) for r in flat)
        failures.append(f"expected nothing removed (removed: []); removed: {seen}")
    for spec in case.removed:
        if not any(_matches(spec, r) for r in flat):
            seen = "; ".join(_removal_text(r, show_keys) for r in flat) or "nothing"
            failures.append(f"expected a removal ({spec}); removed: {seen}")

    if case.dropped_events is not None and sorted(case.dropped_events) != sorted(decision.dropped_event_ids):
        failures.append(
            f"expected dropped events [{', '.join(sorted(case.dropped_events))}], "
            f"got [{', '.join(sorted(decision.dropped_event_ids))}]"
        )

    if case.expects_override and decision.override != case.expected_override:
        want, got = case.expected_override or "no override", decision.override or "no override"
        failures.append(f"expected {want} to apply, got {got}")

    if outcome.request is not None and denial is None and not failures:
        again = apply_request(engine, _copy(outcome.request), case.identifier or stream_identifier(outcome.request))
        if again.request is None or to_json(again.request) != leaves:
            failures.append("applying the policy again to what leaves changes it (the policy is not idempotent)")

    return CaseResult(case, tuple(failures), tuple(diff), leaves, decision, time.perf_counter() - started)


def _copy(message: Message) -> Message:
    out = type(message)()
    out.CopyFrom(message)
    return out


def run_cases(
    engine: Engine, files: Sequence[tuple[str, Sequence[Case]]], *, show_keys: bool = False
) -> tuple[CaseFileResult, ...]:
    return tuple(
        CaseFileResult(file, tuple(run_case(engine, case, show_keys=show_keys) for case in cases))
        for file, cases in files
    )


@dataclass(frozen=True, slots=True)
class _Flat:
    event_index: int | None
    event_id: str | None
    rule: str
    path: str
    keys: tuple[str, ...]
    action: str


def _flat_removals(decision: Decision) -> Iterator[_Flat]:
    for record in decision.events:
        if record.dropped_by is not None:
            yield _Flat(record.index, record.event_id, record.dropped_by, "(event)", (), "removed")
        for r in record.removals:
            yield _Flat(record.index, record.event_id, r.rule, r.path, r.keys, r.action)
    for r in decision.removals:
        yield _Flat(None, None, r.rule, r.path, r.keys, r.action)


def _matches(spec: RemovalSpec, r: _Flat) -> bool:
    if spec.path != r.path or (spec.rule is not None and spec.rule != r.rule):
        return False
    if spec.action is not None and spec.action != r.action:
        return False
    if isinstance(spec.event, int) and spec.event != r.event_index:
        return False
    if isinstance(spec.event, str) and spec.event != r.event_id:
        return False
    return set(spec.keys) <= set(r.keys)


def _removal_text(r: _Flat, show_keys: bool) -> str:
    where = f"event {r.event_index} " if r.event_index is not None else ""
    keys = ""
    if r.keys:
        n = len(r.keys)
        keys = f" keys {', '.join(dict.fromkeys(r.keys))}" if show_keys else f" ({n} key{'s' if n != 1 else ''})"
    return f"{where}{r.path} by {r.rule} ({r.action}){keys}"


# -- the output diff -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaf:
    value: Any
    masked: str  # the path with map and Struct keys (data, not field names) written {key}


def _flatten(
    value: Any,
    path: str = "",
    masked: str = "",
    *,
    name: str = "",
    keyed: bool = False,
    out: dict[str, _Leaf] | None = None,
) -> dict[str, _Leaf]:
    out = {} if out is None else out
    if isinstance(value, dict) and value:
        inner_keyed = keyed or name in _KEYED_FIELDS
        for key, inner in value.items():
            shown = "{key}" if inner_keyed else str(key)
            _flatten(
                inner,
                f"{path}.{key}" if path else str(key),
                f"{masked}.{shown}" if masked else shown,
                name=str(key),
                keyed=inner_keyed,
                out=out,
            )
    elif isinstance(value, list) and value:
        for i, inner in enumerate(value):
            _flatten(inner, f"{path}[{i}]", f"{masked}[{i}]", name=name, keyed=keyed, out=out)
    else:
        out[path] = _Leaf(value, masked)
    return out


def output_diff(
    expected: Mapping[str, Any] | None, actual: Mapping[str, Any] | None, *, show_keys: bool = False
) -> list[str]:
    """A diff of the expected output against what leaves, one line per field path.

    '-' lines: the case expected the path and it does not leave as expected; its value is
    never printed (it may be the value the policy removed) and map keys show as {key}
    unless show_keys. '+' lines: what leaves instead, with its value (it leaves anyway).
    """
    want = _flatten(expected or {})
    got = _flatten(actual or {})
    lines = ["--- expected (values not shown)", "+++ leaves"]
    for path in sorted(set(want) | set(got)):
        if path in want and path in got and json.dumps(want[path].value) == json.dumps(got[path].value):
            continue
        if path in want:
            lines.append(f"- {path if show_keys or path in got else want[path].masked}")
        if path in got:
            lines.append(f"+ {path} = {json.dumps(got[path].value, ensure_ascii=False)}")
    return lines


# -- protobuf JSON parse errors, without the values ----------------------------------------

_FIELD_AT = re.compile(r"\bat \"?([A-Za-z_][\w.\[\]]*)\"?")
_NO_FIELD = re.compile(r'has no field named "([^"]{0,100})"')


def parse_error_text(exc: Exception, type_name: str) -> str:
    """Why a line is not protobuf JSON of type_name, naming places but never a value from the input."""
    text = str(exc)
    if text.startswith("Failed to load JSON"):
        return f"not JSON ({text.removeprefix('Failed to load JSON: ').rstrip('.')})"
    missing = _NO_FIELD.search(text)
    places = _FIELD_AT.findall(text)
    where = f" at {places[-1].rstrip('.')}" if places else ""
    if missing:
        return f"not a {type_name}: no field named {missing.group(1)!r}{where}"
    fields = re.findall(r"Failed to parse (\w+) field", text)
    if fields:
        return f"not a {type_name}: field {fields[-1]} has a value of the wrong type or form{where}"
    if "multiple" in text and "oneof" in text:
        return f"not a {type_name}: more than one member of a oneof is set{where}"
    return f"not a {type_name} in protobuf JSON{where}"
