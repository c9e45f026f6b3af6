"""telemetry-guard apply: what would leave, for request messages read as protobuf JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

from google.protobuf import json_format

from telemetry_guard.policy import access
from telemetry_guard.policy.cases import REQUEST_TYPES, apply_request, parse_error_text, stream_identifier, to_json
from telemetry_guard.policy.engine import Engine
from telemetry_guard.policy.kinds import KINDS, RPCS
from telemetry_guard.render.common import (
    EXIT_OK,
    EXIT_USAGE,
    POLICY_HELP,
    add_parser,
    fail,
    load_policy_arg,
    override_problem,
)
from telemetrygateway.v1 import telemetrygateway_pb2 as pb

HELP = "apply a policy to request messages (protobuf JSON lines) and print what would leave"

DESCRIPTION = """\
Read request messages of one RPC, one protobuf JSON object per line, from a file or
stdin, and write one JSON line per message: {"line", "leaves", "decision"} where
"leaves" is what would leave (null when refused) and "decision" the decision record
(rules, paths, counts; key names only with --show-keys; never a removed value).
The engine is the one the interceptors use. Input is streamed: memory does not grow
with its length. Blank lines are skipped.

The caller is a --kind identifier, unless a message carries its own identifier (a
stream's metadata message, RecordEvent's metadata), which must be of that kind.
Credentials are not checked (there is no request metadata); see `test` for that.

Exit status: 0, or 2 when a line is not a request message (reported on stderr by
line number, without its values) or the policy cannot be loaded."""

EXAMPLES = (
    "telemetry-guard apply policy.yaml --kind licensed_instance --input requests.jsonl",
    "exporter-dump | telemetry-guard apply builtin:default --kind workspace --rpc RecordEvents > leaves.jsonl",
    "telemetry-guard apply policy.yaml --kind managed_service --rpc RecordEvent -i one.jsonl --show-keys",
    "telemetry-guard apply gateway.yaml --kind licensed_instance --override sourcegraph-com -i dotcom.jsonl",
)

MAX_LINE_BYTES = 64 * 1024 * 1024
PROGRESS_SECONDS = 1.0

# A placeholder for what the gateway requires of each kind's identifier (only presence is checked).


def register(sub: Any) -> None:
    parser = add_parser(sub, "apply", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    parser.add_argument(
        "-i", "--input", default="-", metavar="FILE", help="JSON-lines file of request messages (default: stdin)"
    )
    parser.add_argument("--kind", required=True, choices=KINDS, help="identifier kind of the caller")
    parser.add_argument("--rpc", choices=RPCS, default="RecordEvents", help="the RPC (default: RecordEvents)")
    parser.add_argument(
        "--override",
        metavar="NAME",
        help="treat every --kind caller as matching the policy's override NAME (e.g. one matched on a license "
        "key fingerprint); without it, an override applies when a message's identifier matches it",
    )
    parser.add_argument("--show-keys", action="store_true", help="name removed private_metadata keys")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the JSON lines to FILE instead of stdout")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", help="report progress on stderr (default: on a tty)")
    progress.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary on stderr")
    parser.set_defaults(func=run)


def placeholder_identifier(kind: str) -> pb.Identifier:
    return access.placeholder_identifier(kind, "telemetry-guard-apply")


def read_lines(stream: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each line; bytes is None for a line longer than limit (skipped unread)."""
    number = 0
    while True:
        raw = stream.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = stream.readline(limit + 1)
            yield number, None
            continue
        yield number, raw


class _Stats:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = self.shown = time.monotonic()
        self.messages = self.denied = self.bad = self.events_in = self.events_out = 0

    def tick(self, line: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.shown >= PROGRESS_SECONDS:
            self.shown = now
            print(f"telemetry-guard apply: {line} lines, {self.summary()}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        return (
            f"{self.messages} messages, {self.denied} refused, {self.bad} lines rejected, "
            f"events {self.events_in} in / {self.events_out} out, {time.monotonic() - self.started:.1f} s"
        )


def run(args: argparse.Namespace) -> int:
    engine = Engine(load_policy_arg(args.policy))
    if args.override is not None:
        problem = override_problem(engine.policy, args.override, args.kind)
        if problem:
            return fail("apply", problem)
        engine = engine.pinned(args.override)
    try:
        source: IO[bytes] = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
    except OSError as exc:
        return fail("apply", f"cannot read {args.input}: {exc.strerror or exc}")
    try:
        sink: IO[str] = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        source.close()
        return fail("apply", f"cannot write {args.output}: {exc.strerror or exc}")
    name = "<stdin>" if args.input == "-" else args.input
    stats = _Stats(args.progress or (not args.quiet and sys.stderr.isatty()))
    try:
        _apply_all(engine, args, source, sink, name=name, stats=stats)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, without a traceback at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        return fail("apply", f"{name}: {exc.strerror or exc}")
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    if not args.quiet:
        print(f"telemetry-guard apply: {stats.summary()}", file=sys.stderr)
    return EXIT_USAGE if stats.bad else EXIT_OK


def _apply_all(
    engine: Engine, args: argparse.Namespace, source: IO[bytes], sink: IO[str], *, name: str, stats: _Stats
) -> None:
    message_type = REQUEST_TYPES[args.rpc]
    type_name = message_type.DESCRIPTOR.name
    placeholder = placeholder_identifier(args.kind)
    for number, raw in read_lines(source):
        stats.tick(number)
        if raw is None:
            stats.bad += 1
            print(f"{name}:{number}: line longer than {MAX_LINE_BYTES} bytes; skipped", file=sys.stderr)
            continue
        if not raw.strip():
            continue
        request = message_type()
        try:
            json_format.Parse(raw, request)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            stats.bad += 1
            print(f"{name}:{number}: {parse_error_text(exc, type_name)}", file=sys.stderr)
            continue
        carried = stream_identifier(request)
        kind = carried.WhichOneof("identifier") if carried is not None else None
        if kind is not None and kind != args.kind:
            stats.bad += 1
            print(f"{name}:{number}: the message's identifier is a {kind}, not --kind {args.kind}", file=sys.stderr)
            continue
        if isinstance(request, pb.RecordEventRequest) and kind is None:
            request.metadata.identifier.CopyFrom(placeholder)
        outcome = apply_request(engine, request, placeholder if kind is None else carried)
        stats.messages += 1
        stats.denied += outcome.denial is not None
        stats.events_in += outcome.decision.events_in
        stats.events_out += outcome.decision.events_out
        record = {
            "line": number,
            "leaves": None if outcome.request is None else to_json(outcome.request),
            "decision": outcome.decision.to_dict(with_keys=args.show_keys),
        }
        sink.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        sink.flush()  # a pipeline sees each result as soon as its line is read
