"""Types of the C fast path (policy/_wirefilter.c); built by setup.py where a C compiler is present."""

from collections.abc import Callable, Sequence

Record = tuple[int, str, str, str, str | None, int, tuple[str, ...] | None, tuple[str, ...] | None, int]
# marketing, private_metadata whole without keys, keys gone, non-string values, events whose unknown fields were
# left out, per drop bit, dropped ids, {rule: events dropped}
Totals = tuple[int, int, int, int, int, tuple[int, ...], list[str], dict[str, int]]

MAX_DEPTH: int  # message levels the walk goes down; deeper: None (the Python path)
TAG_WIDTH: int  # bytes a tag or a length prefix may take; more: None (the reference refuses them)

class Records:
    """One call's records, as slices of its payload until built."""

    def build(self) -> list[Record]: ...
    def __len__(self) -> int: ...

class Plan:
    def __init__(
        self,
        messages: Sequence[tuple[Sequence[tuple[int, int, int, int, int, int, int]], bool, bool]],
        root: int,
        value: int,
        drop_marketing: bool,
        private_mode: int,
        merge_legacy: bool,
        discard_unknown: bool,
        drop_invalid: bool,
        replacement: tuple[bytes, ...] | None,  # per Value kind: 0 = none set, then field numbers 1-6
        invalid_rule: str,
    ) -> None: ...
    def filter(
        self, data: bytes, resolve: Callable[[str, str], tuple[str | None, bool, frozenset[bytes] | None]], /
    ) -> tuple[bytes, int, int, Records, Totals] | None: ...
