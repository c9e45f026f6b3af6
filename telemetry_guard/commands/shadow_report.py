"""telemetry-guard shadow-report: what a candidate policy would have done to real traffic."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from typing import Any

from telemetry_guard.render.common import EXIT_FAILED, EXIT_OK, add_output, add_parser, fail, write_or_fail
from telemetry_guard.render.html import shadow_html
from telemetry_guard.render.jsonfmt import shadow_json
from telemetry_guard.render.markdown import shadow_markdown
from telemetry_guard.shadowlog import read

HELP = "summarise a shadow roll-out (serve --shadow-policy) from the sidecar's logs (markdown, JSON or HTML)"

DESCRIPTION = """\
Read the JSON log lines of `telemetry-guard serve --shadow-policy CANDIDATE` (files, or stdin)
and report what the candidate would have done to that traffic next to the policy in force:
what it would remove that leaves today, what it would let leave that is removed today (per RPC,
identifier kind, area and rule, with counts), and calls it would refuse or admit otherwise.
Every other log line is skipped. Key names appear only with --with-keys, and only if the
sidecar logged them (--log-level debug); values are never logged.

Exit status: 0, or 1 with --fail-on-widening when the candidate would let out anything the
policy in force stops; 2 when a log cannot be read or holds no shadow record."""

EXAMPLES = (
    "telemetry-guard shadow-report sidecar.log",
    "kubectl logs deploy/telemetry-gateway -c telemetry-guard --since 24h | telemetry-guard shadow-report -",
    "telemetry-guard shadow-report --format html -o shadow.html worker-*.log",
)

RENDERERS = {"markdown": shadow_markdown, "json": shadow_json, "html": shadow_html}


def register(sub: Any) -> None:
    parser = add_parser(sub, "shadow-report", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("logs", nargs="*", metavar="LOG", help="the sidecar's log files; - or none: stdin")
    parser.add_argument("--format", choices=tuple(RENDERERS), default="markdown", help="report format")
    parser.add_argument("--with-keys", action="store_true", help="name private_metadata keys, where logged")
    parser.add_argument("--fail-on-widening", action="store_true", help="exit 1 when the candidate would let out more")
    add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    names = args.logs or ["-"]
    with ExitStack() as stack:
        sources = []
        for name in names:
            if name == "-":
                sources.append(("stdin", sys.stdin))
                continue
            try:
                handle = stack.enter_context(open(name, encoding="utf-8", errors="replace"))
            except OSError as exc:
                return fail("shadow-report", f"cannot read {name}: {exc.strerror or exc}")
            sources.append((name, handle))
        report = read(sources, with_keys=args.with_keys)
    if report.empty:
        return fail(
            "shadow-report",
            f"no shadow record in {', '.join(names)} (was the sidecar started with --shadow-policy, "
            "and did traffic reach it?)",
        )
    written = write_or_fail("shadow-report", RENDERERS[args.format](report), args.output)
    if written is not None:
        return written
    return EXIT_FAILED if args.fail_on_widening and report.widening else EXIT_OK
