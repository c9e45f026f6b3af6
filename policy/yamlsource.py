"""Read a YAML file into plain data, keeping where each value was written.

Policy files are reviewed by people and read by a privacy filter, so this reader is
deliberately narrower than YAML: one document, a mapping at the top, standard tags
only, no anchors or aliases (no alias bombs), no merge keys, no duplicate keys (YAML
forbids them; PyYAML would silently keep the last), a bounded size and depth. Every
refusal is a Problem with file, line and column, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Located:
    """A document as plain data plus the (line, column) of every value, by its path."""

    file: str
    data: dict[str, Any]
    marks: dict[Path_, tuple[int, int]]
    text: str

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
    name = display or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise PolicyError([Problem(name, 0, 0, "", f"file is {size} bytes; the limit is {MAX_BYTES}")])
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError([Problem(name, 0, 0, "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise PolicyError([Problem(name, line, column, "", f"not UTF-8 (byte {exc.start})")]) from None
    return parse(text, name)


def parse(text: str, name: str) -> Located:
    """Parse YAML text (see the module docstring for what is refused)."""
    if len(text.encode("utf-8")) > MAX_BYTES:
        raise PolicyError([Problem(name, 0, 0, "", f"document is larger than {MAX_BYTES} bytes")])
    try:
        nodes = list(yaml.compose_all(text, Loader=_StrictLoader))
    except yaml.reader.ReaderError as exc:  # e.g. a NUL byte: has a position, not a mark
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise PolicyError(
            [Problem(name, line, column, "", f"invalid YAML: character {_char(exc.character)} is not allowed")]
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise PolicyError([Problem(name, line, col, "", f"invalid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Problem(name, 0, 0, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise PolicyError([Problem(name, 0, 0, "", "nesting is too deep")]) from None
    if len(nodes) != 1:
        raise PolicyError([Problem(name, 1, 1, "", f"expected one YAML document, found {len(nodes)}")])
    root = nodes[0]
    if not isinstance(root, yaml.MappingNode):
        line, col = _mark(root)
        raise PolicyError([Problem(name, line, col, "", "the document must be a mapping (key: value pairs)")])
    builder = _Builder(name)
    data = builder.build(root, (), 0)
    if builder.problems or not isinstance(data, dict):
        raise PolicyError(builder.problems)
    return Located(name, data, builder.marks, text)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses an alias where it is written (compose would silently share the node)."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases are not allowed in policy files", event.start_mark
            )
        return super().compose_node(parent, index)  # type: ignore[arg-type]


def _char(character: object) -> str:
    return repr(chr(character)) if isinstance(character, int) else repr(character)


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


class _Builder:
    """Turns a composed node tree into data, recording marks and refusing what YAML hides."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self._seen: set[int] = set()
        self._scalars = yaml.SafeLoader("")

    def _fail(self, node: yaml.Node, path: Path_, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(self.name, line, col, dotted(path), message))

    def build(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        if id(node) in self._seen:  # an alias: _StrictLoader refuses them first; never expand one
            self._fail(node, path, "anchors and aliases are not allowed in policy files")
            return None
        self._seen.add(id(node))
        self.marks[path] = _mark(node)
        if depth > MAX_DEPTH:
            self._fail(node, path, f"nesting deeper than {MAX_DEPTH}")
            return None
        if node.tag not in _STANDARD_TAGS:
            self._fail(node, path, f"tag {node.tag!r} is not allowed (plain YAML values only)")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        # Only the standard scalar tags reach here (checked above).
        return self._scalars.construct_object(node)

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._fail(key_node, path, "merge keys (<<) are not allowed in policy files")
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                self._fail(key_node, path, "keys must be plain strings")
                continue
            key = key_node.value
            if key in out:
                self._fail(key_node, (*path, key), "duplicate key (YAML forbids it)")
                continue
            self.marks[(*path, key)] = _mark(key_node)
            out[key] = self.build(value_node, (*path, key), depth + 1)
            self.marks[(*path, key)] = _mark(key_node)
        return out
