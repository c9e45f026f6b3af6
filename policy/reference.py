"""The policy language reference, written from the JSON Schemas' descriptions.

    python -m telemetry_guard.policy.reference > docs/policy-reference.md

Each key is documented once, beside its definition in policy/schema/*.json; this turns
those descriptions into the reference page, and a test keeps the page in step.
"""

from __future__ import annotations

from typing import Any

from telemetry_guard.policy.loader import schema as _schema


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return merged


def _kind_of(node: dict[str, Any], root: dict[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    kind = node.get("type", "")
    if isinstance(kind, list):  # one value or a list of them: each form in turn
        return " or ".join(_kind_of({**node, "type": one}, root) for one in kind)
    if kind == "array":
        items = _resolve(node.get("items", {}), root)
        return f"list of {_kind_of(items, root)}"
    if kind == "string" and "pattern" in node:
        return f"string matching `{node['pattern']}`".replace("|", "\\|")
    return str(kind)


def _rows(node: dict[str, Any], root: dict[str, Any], prefix: str, out: list[str]) -> None:
    for name, written in node.get("properties", {}).items():
        child = _resolve(written, root)
        path = f"{prefix}{name}"
        description = " ".join(child.get("description", "").split()).replace("|", "\\|")
        out.append(f"| `{path}` | {_kind_of(child, root)} | {description} |")
        if child.get("type") == "object" and "properties" in child and path != "kinds":
            _rows(child, root, f"{path}.", out)
        elif path == "kinds":
            out.append("| `kinds.<kind>.*` | | the same keys as `defaults.*` |")
        elif isinstance(child.get("additionalProperties"), dict):  # a mapping by name (overrides)
            _rows(_resolve(child["additionalProperties"], root), root, f"{path}.<name>.", out)


def render() -> str:
    lines = [
        "# Policy language reference",
        "",
        "Generated from `policy/schema/*.json` by `python -m telemetry_guard.policy.reference`;"
        " edit the schemas, not this page.",
        "",
    ]
    for title, name in (("Policy file", "policy.schema.json"), ("Allowlist file", "allowlist.schema.json")):
        schema = _schema(name)
        lines += [f"## {title}", "", " ".join(schema["description"].split()), ""]
        lines += ["| key | value | meaning |", "|---|---|---|"]
        _rows(schema, schema, "", lines)
        if name == "allowlist.schema.json":
            entry = schema["properties"]["entries"]["items"]
            _rows(entry, schema, "entries[].", lines)
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
