"""telemetry-guard test: policy unit tests written in YAML."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from telemetry_guard.policy.cases import Case, CaseFileError, load_case_file, run_cases
from telemetry_guard.policy.engine import Engine
from telemetry_guard.render.common import (
    EXIT_FAILED,
    EXIT_OK,
    POLICY_HELP,
    add_output,
    add_parser,
    fail,
    load_failure,
    load_policy_arg,
    write_or_fail,
)
from telemetry_guard.render.jsonfmt import cases_json
from telemetry_guard.render.junit import junit_xml
from telemetry_guard.render.text import cases_text

HELP = "run policy test cases (YAML): requests in, expected output, removals or denial"

DESCRIPTION = """\
Run policy unit tests. A cases file lists named cases; each gives an input (rpc,
identifier, authorization, the request message as protobuf JSON) and what is expected:
the output message that leaves, removals that must happen, the events dropped, and/or
a denial code. Access and credentials are checked first, as the interceptors do, then
the request goes through the same engine. docs/compliance.md describes the format.

A cases file may say which policy it is for (`policy: ../policy.yaml`, a path relative
to it, or builtin:default; a list for several). A directory runs only the files for POLICY
and those that name none; the others are skipped, each named on stderr. A file named on
the command line for another policy is an error.

A failing case shows a diff: what leaves is printed with its values; what the case
expected and does not leave is named by path only (map keys as {key} unless
--show-keys), so a removed value is never printed.

Exit status: 0 all cases pass, 1 a case fails, 2 a policy or cases file cannot be loaded."""

EXAMPLES = (
    "telemetry-guard test docs/examples/strict.yaml docs/examples/cases/strict.yaml",
    "telemetry-guard test policy.yaml cases/ --junit policy-tests.xml",
    "telemetry-guard test builtin:default docs/examples/cases/default.yaml -v",
)


def register(sub: Any) -> None:
    parser = add_parser(sub, "test", HELP, DESCRIPTION, EXAMPLES)
    parser.add_argument("policy", metavar="POLICY", help=POLICY_HELP)
    parser.add_argument("cases", nargs="+", metavar="CASES", help="cases files, or directories of *.yaml cases files")
    parser.add_argument("--junit", metavar="FILE", help="also write the results as JUnit XML to FILE")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="report format")
    parser.add_argument("--show-keys", action="store_true", help="name private_metadata keys in failures")
    parser.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    add_output(parser)
    parser.set_defaults(func=run)


def _case_files(args: list[str]) -> list[tuple[Path, bool]] | str:
    """The cases files named, each with whether it was found in a directory (rather than named)."""
    files: list[tuple[Path, bool]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                return f"{arg}: no *.yaml cases files in this directory"
            files.extend((file, True) for file in found)
        else:
            files.append((path, False))
    return files


def run(args: argparse.Namespace) -> int:
    policy = load_policy_arg(args.policy)
    files = _case_files(args.cases)
    if isinstance(files, str):
        return fail("test", files)
    loaded: list[tuple[str, tuple[Case, ...]]] = []
    for file, in_directory in files:
        try:
            case_file = load_case_file(file)
        except CaseFileError as exc:
            return load_failure("test", f"the cases file {file}", exc)
        if not case_file.is_for(args.policy):
            named = case_file.named()
            if not in_directory:
                return fail(
                    "test",
                    f"{file} is for the policy {named} (its policy: key), not {args.policy}; "
                    "name that policy, or list this one under policy: too",
                )
            print(f"telemetry-guard test: skipped {file}: its cases are for {named}", file=sys.stderr)
            continue
        loaded.append((str(file), case_file.cases))
    if not loaded:
        return fail("test", f"no cases file named is for {args.policy} (each names its policy under policy:)")
    results = run_cases(Engine(policy), loaded, show_keys=args.show_keys)
    if args.format == "json":
        out = cases_json(results, show_keys=args.show_keys)
    else:
        out = cases_text(results, verbose=args.verbose)
    written = write_or_fail("test", out, args.output)
    if written is not None:
        return written
    if args.junit:
        written = write_or_fail("test", junit_xml(results, args.policy), args.junit)
        if written is not None:
            return written
    return EXIT_FAILED if any(r.failed for r in results) else EXIT_OK
