"""telemetry-guard explain: the rules one event type meets, and why."""

from __future__ import annotations

import argparse
from typing import Any

from telemetry_guard.policy.kinds import KINDS
from telemetry_guard.policy.surface import explain
from telemetry_guard.render.common import (
    EXIT_OK,
    POLICY_HELP,
    add_output,
    add_parser,
    fail,
    load_policy_arg,
    override_problem,
    write_or_fail,
)
from telemetry_guard.render.jsonfmt import explain_json
from telemetry_guard.render.text import explain_text

HELP = "show which rules apply to an event type (kind, feature, action), and why"

DESCRIPTION = """\
Walk the rules an event of one type meets, in the order the engine applies them: RPC
access and credentials, the whole-event filter, validity, marketing_tracking,
private_metadata (with the allowlist entry, its file and line, reason and approver),
drop_fields, legacy_metadata and unknown fields. Each step names the policy key."""

EXAMPLES = (
    "telemetry-guard explain policy.yaml --kind licensed_instance --feature cody.completion --action accepted",
    "telemetry-guard explain builtin:default --kind workspace --feature search --action submitted --format json",
    "telemetry-guard explain gateway.yaml --kind licensed_instance --override sourcegraph-com --feature search "
    "--action submitted",
)


def register(sub: Any) -> None:
    parser = add_parser(sub, "explain", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    parser.add_argument("--kind", required=True, choices=KINDS, help="identifier kind of the caller")
    parser.add_argument("--feature", required=True, help="the event's feature, e.g. cody.completion")
    parser.add_argument("--action", required=True, help="the event's action, e.g. accepted")
    parser.add_argument(
        "--override", metavar="NAME", help="for a caller matched by the policy's override NAME (of --kind)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    add_output(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = load_policy_arg(args.policy)
    if args.override is not None:
        problem = override_problem(policy, args.override, args.kind)
        if problem:
            return fail("explain", problem)
    explanation = explain(policy, args.kind, args.feature, args.action, override=args.override)
    out = explain_json(explanation) if args.format == "json" else explain_text(explanation)
    return write_or_fail("explain", out, args.output) or EXIT_OK
