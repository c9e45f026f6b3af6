"""telemetry-guard allowlist import: an instance's additional allowed event types as an allowlist file."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telemetry_guard.policy import loader
from telemetry_guard.policy.errors import PolicyError
from telemetry_guard.policy.sourcegraph_env import VARIABLE, MalformedValue, allowlist_yaml, parse
from telemetry_guard.policy.yamlsource import parse as parse_yaml
from telemetry_guard.render.common import EXIT_OK, EXIT_USAGE, add_parser, fail, write_or_fail

HELP = "allowlist files: import Sourcegraph's additional allowed event types"

DESCRIPTION = f"""\
import: turn the value of Sourcegraph's {VARIABLE}
(entries feature::action::key1::key2, separated by commas; as an argument, or on stdin
when VALUE is - or absent; a leading {VARIABLE}= is ignored) into an allowlist file,
so that a gateway-side policy allows what the instance exports. Every entry is marked
AWAITING REVIEW in its reason and approved_by, and `telemetry-guard lint` reports it
(entry-awaiting-review, an error) until a reviewer writes both.

Exit status: 0 written; 2 a malformed entry (each one is named), an entry that gives one
event type other keys than an earlier one, an empty value, or a file that cannot be written."""

EXAMPLES = (
    "telemetry-guard allowlist import 'cody.foo::used::model,search::*::lang' -o allowlists/additions.yaml",
    f"printenv {VARIABLE} | telemetry-guard allowlist import -o additions.yaml",
    "telemetry-guard lint policy.yaml additions.yaml   # entry-awaiting-review until reviewed",
)


def register(sub: Any) -> None:
    parser = add_parser(sub, "allowlist", HELP, DESCRIPTION, EXAMPLES)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    importer = actions.add_parser(
        "import",
        help=f"turn the value of {VARIABLE} into an allowlist file awaiting review",
        description=DESCRIPTION,
        epilog=parser.epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    importer.add_argument(
        "value", nargs="?", default="-", metavar="VALUE", help="the variable's value; - or none: stdin"
    )
    importer.add_argument("-o", "--output", metavar="FILE", help="write the allowlist to FILE instead of stdout")
    importer.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    importer.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    command = "allowlist import"
    value = sys.stdin.read() if args.value == "-" else args.value
    try:
        entries = parse(value)
    except MalformedValue as exc:
        print(f"telemetry-guard {command}: cannot import the value of {VARIABLE}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    text = allowlist_yaml(entries, datetime.now(UTC).date())
    _check(text)
    if args.output not in (None, "-") and Path(args.output).exists() and not args.force:
        return fail(command, f"{args.output} exists; use --force to overwrite it")
    written = write_or_fail(command, text, args.output)
    if written is not None:
        return written
    if args.output not in (None, "-"):
        print(f"wrote {len(entries)} entries awaiting review to {args.output}", file=sys.stderr)
    return EXIT_OK


def _check(text: str) -> None:
    """What is written must be an allowlist the loader reads: a failure here is a bug, never written."""
    problems = loader.schema_problems(parse_yaml(text, "<imported>"), "allowlist.schema.json")
    if problems:
        raise PolicyError(problems)
