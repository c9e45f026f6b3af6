"""What the compliance commands share: parsers with examples, output files, error messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from telemetry_guard.policy.errors import PolicyError, Problem
from telemetry_guard.policy.loader import BUILTIN_DEFAULT, BUILTIN_PREFIX, default_policy, load_policy
from telemetry_guard.policy.model import Policy

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(
    sub: Any, name: str, help_text: str, description: str, examples: Sequence[str]
) -> argparse.ArgumentParser:
    """A subcommand parser whose --help ends with worked examples."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def fail(command: str, message: str) -> int:
    """A usage or input error: one clear line on stderr, exit 2."""
    print(f"telemetry-guard {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_failure(command: str, what: str, exc: PolicyError) -> int:
    """A file that cannot be loaded: every problem with file:line:column, exit 2."""
    print(f"telemetry-guard {command}: {what} cannot be loaded:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_USAGE


def write(text: str, output: str | None) -> None:
    """Write to the --output file, or stdout. Raises OSError when the file cannot be written."""
    if output is None or output == "-":
        sys.stdout.write(text)
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        return
    Path(output).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def write_or_fail(command: str, text: str, output: str | None) -> int | None:
    """write(); on failure, the exit code of the error message (None when written)."""
    try:
        write(text, output)
    except OSError as exc:
        return fail(command, f"cannot write {output}: {exc.strerror or exc}")
    return None


def add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE instead of stdout")


def load_policy_arg(path: str) -> Policy:
    """A policy named on the command line: a file, or builtin:default for the shipped default policy.

    Raises PolicyError (rendered by the CLI with every problem's file:line:column, exit 2).
    """
    if path == BUILTIN_DEFAULT:
        return default_policy()
    if path.startswith(BUILTIN_PREFIX):
        message = f"there is no built-in policy {path!r}; the shipped one is {BUILTIN_DEFAULT}"
        raise PolicyError([Problem(path, 0, 0, "", message)])
    return load_policy(path)


POLICY_HELP = f"policy file ({BUILTIN_DEFAULT} for the shipped default policy)"


def override_problem(policy: Policy, name: str, kind: str) -> str | None:
    """Why --override NAME cannot be used with --kind KIND under this policy, or None."""
    found = next((o for o in policy.overrides if o.name == name), None)
    if found is None:
        known = ", ".join(o.name for o in policy.overrides) or "none"
        return f"the policy has no override {name!r} (it has: {known})"
    if found.kind != kind:
        return f"override {name!r} matches {found.kind} identifiers, not --kind {kind}"
    return None
