"""telemetry-guard audit: the export surface of a policy, as a report for reviewers."""

from __future__ import annotations

import argparse
from typing import Any

from telemetry_guard.policy.surface import VERIFIERS, surface
from telemetry_guard.render.common import EXIT_OK, POLICY_HELP, add_output, add_parser, load_policy_arg, write_or_fail
from telemetry_guard.render.html import surface_html
from telemetry_guard.render.jsonfmt import surface_json
from telemetry_guard.render.markdown import surface_markdown

HELP = "report what a policy lets leave, per identifier kind and RPC (markdown, JSON or HTML)"

DESCRIPTION = """\
The export surface of a policy, from the policy files alone: for each identifier kind
and RPC, allowed or refused and whether a bearer token is required; which Event fields
leave and which are removed; which private_metadata keys leave for which event types;
user-metadata fields; unknown-field handling; the policy's sha256 and every file read.
Every item names the policy key that decides it. What is said of bearer tokens depends on
the verifier that checks them, which is set where the policy runs, not in it: --verifier
bearer-present (the default of the interceptors and of serve) or introspection (serve
--introspection-url, TokenIntrospection); the report claims no more than that verifier checks.

The HTML report is one self-contained file (no scripts, nothing fetched) to open in a
browser or attach to a review."""

EXAMPLES = (
    "telemetry-guard audit policy.yaml",
    "telemetry-guard audit builtin:default --format json",
    "telemetry-guard audit policy.yaml --verifier introspection",
    "telemetry-guard audit docs/examples/strict.yaml --format html -o strict-audit.html",
)

RENDERERS = {"markdown": surface_markdown, "json": surface_json, "html": surface_html}


def register(sub: Any) -> None:
    parser = add_parser(sub, "audit", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    parser.add_argument("--format", choices=tuple(RENDERERS), default="markdown", help="report format")
    parser.add_argument(
        "--verifier",
        choices=VERIFIERS,
        default=VERIFIERS[0],
        help="the credential verifier in use: bearer-present (default) or introspection (serve --introspection-url)",
    )
    add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = RENDERERS[args.format](surface(load_policy_arg(args.policy), args.verifier))
    return write_or_fail("audit", report, args.output) or EXIT_OK
