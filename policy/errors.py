"""Load errors: every problem of a policy at once, each with file, line, column and key."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a policy or allowlist file. line and column are 1-based; 0 = unknown."""

    file: str
    line: int
    column: int
    key: str
    message: str
    hint: str = field(default="", compare=False)  # what to do about it, where more can be said than the message

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class PolicyError(Exception):
    """A policy could not be loaded. Carries every problem found, sorted by place.

    files: the files the load read or looked for (the policy and the allowlists it names, found
    or not), when known: a reloader watches them, so that fixing any of them is noticed.
    """

    def __init__(self, problems: list[Problem], files: tuple[str, ...] = ()) -> None:
        self.problems = sorted(set(problems))
        self.files = files
        super().__init__("\n".join(str(p) for p in self.problems))
