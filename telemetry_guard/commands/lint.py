"""telemetry-guard lint: schema and semantic checks of policy and allowlist files."""

from __future__ import annotations

import argparse
import json
from typing import Any

from telemetry_guard.policy.lint import RULES, lint_files
from telemetry_guard.render.common import EXIT_OK, add_output, add_parser, fail, write_or_fail
from telemetry_guard.render.jsonfmt import lint_json
from telemetry_guard.render.sarif import lint_sarif
from telemetry_guard.render.text import lint_text

HELP = "check policy and allowlist files: schema and semantic rules, every finding at once"

DESCRIPTION = """\
Check policy files and allowlist files (told apart by their keys) without a server.
Every finding is reported at once, with file:line:column, a rule id, a severity and a hint:
YAML, schema and semantic problems of every part that can be read, in one run. The
summary counts every file read (those named and the allowlists their policies use).

Exit status: 0 clean (warnings and notes allowed), 1 an error (or a warning, with
--strict), 2 an input file cannot be read. A policy may accept findings of a rule
after review by listing its id under `acknowledged:`; acknowledged findings are still
shown. See --list-rules for the rules."""

EXAMPLES = (
    "telemetry-guard lint policy.yaml",
    "telemetry-guard lint builtin:default",
    "telemetry-guard lint --strict docs/examples/strict.yaml docs/examples/default.yaml",
    "telemetry-guard lint policy.yaml allowlists/*.yaml   # also report allowlists no policy references",
    "telemetry-guard lint --format sarif -o lint.sarif policy.yaml   # for code-scanning UIs",
    "telemetry-guard lint --list-rules",
)


def register(sub: Any) -> None:
    parser = add_parser(sub, "lint", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument(
        "files", nargs="*", metavar="FILE", help="policy files (builtin:default: the shipped one) and allowlist files"
    )
    parser.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="report format")
    parser.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    parser.add_argument("--list-rules", action="store_true", help="list the rules with their ids and severity")
    add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list_rules:
        lines = [
            f"{rule.id:<36} {rule.severity:<8} {rule.summary}"
            + ("" if rule.acknowledgeable else " (cannot be acknowledged)")
            for rule in RULES.values()
        ]
        return write_or_fail("lint", "\n".join(lines), args.output) or EXIT_OK
    if not args.files:
        return fail("lint", "name at least one policy or allowlist file (or use --list-rules)")
    report = lint_files(args.files)
    if args.format == "json":
        out = lint_json(report, strict=args.strict)
    elif args.format == "sarif":
        out = json.dumps(lint_sarif(report), indent=2, ensure_ascii=False)
    else:
        out = lint_text(report)
    return write_or_fail("lint", out, args.output) or report.exit_code(args.strict)
