"""Read a YAML file into plain data, keeping where each value was written.

Policy files are reviewed by people and read by a privacy filter, so this reader is
deliberately narrower than YAML: one document, a mapping at the top, standard tags
only, no anchors or aliases (no alias bombs), no merge keys, no duplicate keys (YAML
forbids them; PyYAML would silently keep the last), a bounded size and depth. Every
refusal is a Problem with file, line and column, never a traceback.

Every problem the reader can get past is reported, not only the first: a refused value
(a custom tag, an alias) is left out and remembered in Located.removed, and a syntax error
inside one top-level section blanks that section (its lines stay, so later lines keep their
numbers) and reading goes on, so that the schema and semantic checks still see the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from telemetry_guard.policy.errors import PolicyError, Problem

MAX_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 64

_STANDARD_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}

Path_ = tuple[str | int, ...]

# At most this many syntax errors are read past in one file (each blanks a top-level section).
MAX_SYNTAX_RECOVERIES = 16

# A top-level key as written at the start of a line: where a section begins.
_SECTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*:(?:[ \t]|$)")


@dataclass(frozen=True)
class Located:
    """A document as plain data plus the (line, column) of every value, by its path.

    written: the text of each plain scalar that YAML read as something else than a string
    (`yes` read as True), so that messages echo what the author wrote. removed: paths whose
    value was refused (None in data), so that later checks do not report them again.
    """

    file: str
    data: dict[str, Any]
    marks: dict[Path_, tuple[int, int]]
    text: str
    written: dict[Path_, str] = field(default_factory=dict)
    removed: frozenset[Path_] = frozenset()

    def shown(self, path: Path_, value: Any) -> str:
        """A value for a message, as the author wrote it: 'yes', not True."""
        text = self.written.get(path)
        if text is None:
            return repr(value)
        return text or "an empty value"

    def is_removed(self, path: Path_) -> bool:
        """Whether the value at path, or one of its ancestors, was refused while reading."""
        return any(path[: len(r)] == r for r in self.removed)

    def holds_removed(self, path: Path_) -> bool:
        """Whether a value below path (not path itself, not the root) was refused while reading."""
        return bool(path) and any(len(r) > len(path) and r[: len(path)] == path for r in self.removed)

    def where(self, path: Path_) -> tuple[int, int]:
        """The place of the value at path, or of its nearest written ancestor."""
        while path not in self.marks and path:
            path = path[:-1]
        return self.marks.get(path, (1, 1))

    def problem(self, path: Path_, message: str) -> Problem:
        line, column = self.where(path)
        return Problem(self.file, line, column, dotted(path), message)


def dotted(path: Path_) -> str:
    """('kinds', 'workspace', 'drop_fields', 0) -> 'kinds.workspace.drop_fields[0]'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def read(path: Path, display: str | None = None) -> Located:
    """Read and check one YAML file; raise PolicyError naming the file on any problem."""
    doc, problems = read_all(path, display)
    if problems or doc is None:
        raise PolicyError(problems)
    return doc


def read_all(path: Path, display: str | None = None) -> tuple[Located | None, list[Problem]]:
    """Read one YAML file: the document (None when nothing usable is left) and every problem found."""
    name = display or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            return None, [_whole(name, f"file is {size} bytes; the limit is {MAX_BYTES} ({_mib(MAX_BYTES)})")]
        raw = path.read_bytes()
    except OSError as exc:
        return None, [_whole(name, f"cannot read: {exc.strerror or exc}", "Check the path and its permissions.")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        return None, [Problem(name, line, column, "", f"not UTF-8 (byte {exc.start})", _HINTS["utf-8"])]
    return parse_all(text, name)


def parse(text: str, name: str) -> Located:
    """Parse YAML text (see the module docstring for what is refused); raise PolicyError on any problem."""
    doc, problems = parse_all(text, name)
    if problems or doc is None:
        raise PolicyError(problems)
    return doc


def parse_all(text: str, name: str) -> tuple[Located | None, list[Problem]]:
    """Parse YAML text: the document (None when nothing usable is left) and every problem found."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        return None, [_whole(name, f"document is larger than {MAX_BYTES} bytes ({_mib(MAX_BYTES)})")]
    problems: list[Problem] = []
    blanked: dict[str, tuple[int, int]] = {}  # top-level key -> its mark, for sections a syntax error blanked
    current = text
    for _ in range(MAX_SYNTAX_RECOVERIES + 1):
        try:
            nodes, found = _compose_all(current, name)
        except _Unreadable as stop:
            problems.append(stop.problem)
            recovered = _blank_sections(current, stop.lines) if stop.lines else None
            if recovered is None:
                return None, problems
            current, keys = recovered
            blanked.update(keys)
            continue
        problems.extend(found)
        break
    else:
        return None, problems
    if len(nodes) != 1:
        problems.append(Problem(name, 1, 1, "", f"expected one YAML document, found {len(nodes)}", _HINTS["documents"]))
        return None, problems
    root = nodes[0]
    if not isinstance(root, yaml.MappingNode):
        line, col = _mark(root)
        problems.append(Problem(name, line, col, "", "the document must be a mapping (key: value pairs)"))
        return None, problems
    builder = _Builder(name)
    data = builder.build(root, (), 0)
    problems.extend(builder.problems)
    if not isinstance(data, dict):
        return None, problems
    for key, mark in blanked.items():
        data[key] = None
        builder.marks[(key,)] = mark
        builder.removed.add((key,))
    return Located(name, data, builder.marks, text, builder.written, frozenset(builder.removed)), problems


def _whole(name: str, message: str, hint: str = "") -> Problem:
    return Problem(name, 0, 0, "", message, hint)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


class _Unreadable(Exception):
    """A problem the parser cannot read past; lines: the (first, last) 0-based lines it spans, if known."""

    def __init__(self, problem: Problem, lines: tuple[int, int] | None) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.lines = lines


def _compose_all(text: str, name: str) -> tuple[list[yaml.Node], list[Problem]]:
    """The documents of text as node trees, and the aliases refused in them; _Unreadable when stuck."""
    try:
        loader = _StrictLoader(text, name)
        try:
            nodes = []
            while loader.check_node():
                node = loader.get_node()
                if node is not None:
                    nodes.append(node)
            return nodes, loader.problems
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:  # e.g. a NUL byte: has a position, not a mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"invalid YAML: character {_char(exc.character)} is not allowed"
        raise _Unreadable(Problem(name, line, column, "", message, _HINTS["character"]), None) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        problem_text = str(exc.problem or exc.context)
        message = f"invalid YAML: {problem_text}"
        if exc.context and exc.problem and exc.context_mark:
            message += f" ({exc.context} at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1})"
        hint = syntax_hint(exc)
        opened = exc.context_mark if hint in (_HINTS["unclosed"], _HINTS["quote"]) else None
        if opened is not None:  # point where the bracket or quote was opened: that is what to fix
            line, col = opened.line + 1, opened.column + 1
            what = _OPENED.get(str(exc.context), "what")
            message = (
                f"invalid YAML: {what} opened here is not closed (line {mark.line + 1 if mark else 0}: {problem_text})"
            )
        # Blank the section where the mistake is: an unclosed bracket or quote swallowed what follows it.
        lines = (line - 1, line - 1) if line else None
        raise _Unreadable(Problem(name, line, col, "", message, hint), lines) from None
    except yaml.YAMLError as exc:
        raise _Unreadable(Problem(name, 0, 0, "", f"invalid YAML: {exc}"), None) from None
    except RecursionError:
        raise _Unreadable(Problem(name, 0, 0, "", "nesting is too deep", _HINTS["depth"]), None) from None


def _blank_sections(text: str, lines: tuple[int, int]) -> tuple[str, dict[str, tuple[int, int]]] | None:
    """text with the top-level sections spanning lines blanked (each key kept, as `key:`), or None
    when the lines are not inside a top-level section (nothing to read past)."""
    rows = text.split("\n")
    starts = [i for i, row in enumerate(rows) if _SECTION.match(row)]
    first = max((i for i in starts if i <= lines[0]), default=None)
    if first is None:
        return None
    after = [i for i in starts if i > lines[1]]
    end = after[0] if after else len(rows)
    keys: dict[str, tuple[int, int]] = {}
    for i in range(first, end):
        found = _SECTION.match(rows[i])
        if found is not None:
            keys[found.group(1)] = (i + 1, 1)
            rows[i] = found.group(1) + ":"
        else:
            rows[i] = ""
    return "\n".join(rows), keys


# What to do about each kind of YAML problem (lint prints it as the hint).
_HINTS: dict[str, str] = {
    "alias": "Anchors (&name) and aliases (*name) are not allowed in policy files: write the value out again.",
    "tag": "Custom tags (!name, !!python/...) are not allowed: write a plain value, quoted if it is a string.",
    "timestamp": 'Write times as quoted strings ("2024-05-01T12:00:00Z"), as protobuf JSON has them.',
    "merge": "Merge keys (<<) are not allowed: write the keys out in the mapping.",
    "duplicate": "Keep one of the two: YAML forbids a key twice in a mapping (the checks use the first).",
    "key": "Keys are plain strings: quote a key that YAML reads as a number, a date or true/false.",
    "depth": "Policy files are shallow: deeper nesting is refused, so that no file can exhaust the reader.",
    "documents": "A policy or allowlist file is one YAML document: remove the --- separators (or the empty document).",
    "character": "Remove the control character (files are UTF-8 text).",
    "utf-8": "Save the file as UTF-8.",
    "unclosed": "A bracket or brace opened there is not closed: close it (] or }) before the line named, "
    "or write the list or mapping one item per line.",
    "quote": "A quoted string is not closed: end it with the same quote it opened with.",
    "tab": "Indent with spaces: YAML does not allow tabs for indentation.",
    "colon": "A value contains ': ' (or the indentation is off): quote the value, or align the key with its siblings.",
    "indent": "The indentation does not match the lines above: align each key with its siblings, and list items "
    "(- ...) under their key.",
    "syntax": "This is not valid YAML: check the brackets, quotes, colons and indentation around this place.",
}


_OPENED = {
    "while parsing a flow sequence": "the [",
    "while parsing a flow mapping": "the {",
    "while scanning a quoted scalar": "the quoted string",
}


def syntax_hint(error: yaml.MarkedYAMLError) -> str:
    """The hint for a YAML syntax error, by what the parser says went wrong."""
    context = str(error.context or "")
    problem = str(error.problem or "")
    if "flow sequence" in context or "flow mapping" in context:
        return _HINTS["unclosed"]
    if "quoted scalar" in context:
        return _HINTS["quote"]
    if "'\\t'" in problem or "\t" in problem:
        return _HINTS["tab"]
    if "mapping values are not allowed" in problem:
        return _HINTS["colon"]
    if "expected <block end>" in problem or "could not find expected ':'" in problem:
        return _HINTS["indent"]
    return _HINTS["syntax"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses an alias where it is written (compose would silently share the node):
    the alias becomes a placeholder the builder leaves out, and the problem is kept, not raised."""

    def __init__(self, text: str, display: str) -> None:
        super().__init__(text)
        self.display = display
        self.problems: list[Problem] = []
        self._aliased: set[str] = set()

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]
            mark = event.start_mark
            if event.anchor in self._aliased:  # one problem per anchor: an alias bomb is one mistake
                return yaml.ScalarNode(_REFUSED_TAG, "", mark, event.end_mark)
            self._aliased.add(event.anchor)
            self.problems.append(
                Problem(
                    self.display,
                    mark.line + 1,
                    mark.column + 1,
                    "",
                    "anchors and aliases are not allowed in policy files",
                    _HINTS["alias"],
                )
            )
            return yaml.ScalarNode(_REFUSED_TAG, "", mark, event.end_mark)
        return super().compose_node(parent, index)  # type: ignore[arg-type]


_REFUSED_TAG = "tag:telemetry-guard,refused"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


def _char(character: object) -> str:
    return repr(chr(character)) if isinstance(character, int) else repr(character)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns a composed node tree into data, recording marks and refusing what YAML hides."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.written: dict[Path_, str] = {}
        self.removed: set[Path_] = set()
        self.problems: list[Problem] = []
        self._seen: set[int] = set()
        self._scalars = yaml.SafeLoader("")

    def _fail(self, node: yaml.Node, path: Path_, message: str, hint: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(self.name, line, col, dotted(path), message, hint))

    def _refuse(self, node: yaml.Node, path: Path_, message: str, hint: str) -> None:
        self._fail(node, path, message, hint)
        self.removed.add(path)

    def build(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        if node.tag == _REFUSED_TAG:  # an alias: _StrictLoader reported it
            self.marks[path] = _mark(node)
            self.removed.add(path)
            return None
        if id(node) in self._seen:  # a shared node: _StrictLoader refuses aliases first; never expand one
            self._refuse(node, path, "anchors and aliases are not allowed in policy files", _HINTS["alias"])
            return None
        self._seen.add(id(node))
        self.marks[path] = _mark(node)
        if depth > MAX_DEPTH:
            self._refuse(node, path, f"nesting deeper than {MAX_DEPTH}", _HINTS["depth"])
            return None
        if node.tag == _TIMESTAMP_TAG:
            message = f"{node.value!r} is an unquoted date or time, which YAML reads as a timestamp: quote it"
            self._refuse(node, path, message, _HINTS["timestamp"])
            return None
        if node.tag not in _STANDARD_TAGS:
            self._refuse(node, path, f"tag {node.tag!r} is not allowed (plain YAML values only)", _HINTS["tag"])
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        # Only the standard scalar tags reach here (checked above).
        value = self._scalars.construct_object(node)
        if not isinstance(value, str) and isinstance(node, yaml.ScalarNode):
            self.written[path] = str(node.value)
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._fail(key_node, path, "merge keys (<<) are not allowed in policy files", _HINTS["merge"])
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                self._fail(key_node, path, "keys must be plain strings", _HINTS["key"])
                continue
            key = key_node.value
            if key in out:
                first = self.marks.get((*path, key), (0, 0))[0]
                self._fail(
                    key_node,
                    (*path, key),
                    f"duplicate key (YAML forbids it; first at line {first})",
                    _HINTS["duplicate"],
                )
                continue
            self.marks[(*path, key)] = _mark(key_node)
            out[key] = self.build(value_node, (*path, key), depth + 1)
            self.marks[(*path, key)] = _mark(key_node)
        return out
