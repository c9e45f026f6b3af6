"""telemetry-guard diff: what a policy change does to the export surface."""

from __future__ import annotations

import argparse
from typing import Any

from telemetry_guard.policy.surface import diff, surface
from telemetry_guard.render.common import EXIT_FAILED, EXIT_OK, add_output, add_parser, load_policy_arg, write_or_fail
from telemetry_guard.render.jsonfmt import diff_json
from telemetry_guard.render.markdown import diff_markdown
from telemetry_guard.render.text import diff_text

HELP = "compare two policies: what may leave now that could not before, and the reverse"

DESCRIPTION = """\
Compare the export surfaces of two policies, per identifier kind: RPC access and
credentials, Event fields, private_metadata keys per event type, the event filter,
unknown and invalid events, user-metadata fields. Changes are listed in three groups:
widening (something may leave that could not before), narrowing, and other changes.

Each area is compared on its own, so a widening that another rule happens to mask
(e.g. a key allowlisted for a feature the event filter removes) is still reported.

Exit status: 0, or 1 with --fail-on-widening when anything widens (a CI gate for
policy reviews); 2 when a policy cannot be loaded."""

EXAMPLES = (
    "telemetry-guard diff old.yaml new.yaml",
    "telemetry-guard diff --fail-on-widening builtin:default policy.yaml",
    "git show main:policy.yaml > /tmp/old.yaml && telemetry-guard diff /tmp/old.yaml policy.yaml --format markdown",
)

RENDERERS = {"text": diff_text, "markdown": diff_markdown, "json": diff_json}


def register(sub: Any) -> None:
    parser = add_parser(sub, "diff", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("old", metavar="OLD", help="the policy before the change (builtin:default allowed)")
    parser.add_argument("new", metavar="NEW", help="the policy after the change (builtin:default allowed)")
    parser.add_argument("--format", choices=tuple(RENDERERS), default="text", help="report format")
    parser.add_argument(
        "--fail-on-widening", action="store_true", help="exit 1 when anything may leave that could not before"
    )
    add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = diff(surface(load_policy_arg(args.old)), surface(load_policy_arg(args.new)))
    written = write_or_fail("diff", RENDERERS[args.format](result), args.output)
    if written is not None:
        return written
    return EXIT_FAILED if args.fail_on_widening and result.widening else EXIT_OK
