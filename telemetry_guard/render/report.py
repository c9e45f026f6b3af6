"""The layout of the audit and diff reports, shared by the markdown and HTML renderers.

A report is a list of blocks (a heading, a few lines, bullets, a table) whose text
is made of styled fragments; markdown.py and html.py only decide how a style looks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from telemetry_guard.policy.lint import display_path
from telemetry_guard.policy.loader import builtin_name
from telemetry_guard.policy.surface import Change, FieldRule, Surface, SurfaceDiff, collapse

Style = Literal["", "code", "strong", "removed", "leaves", "partial"]
Fragment = tuple[str, Style]


@dataclass(frozen=True)
class Text:
    parts: tuple[Fragment, ...]

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.parts)


def text(*parts: str | Fragment) -> Text:
    return Text(tuple((p, "") if isinstance(p, str) else p for p in parts))


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[Text, ...], ...]


@dataclass(frozen=True)
class Block:
    title: str
    level: int = 2
    lines: tuple[Text, ...] = ()
    bullets: tuple[Text, ...] = ()
    table: Table | None = None


_STATUS_STYLE: dict[str, Style] = {
    "leaves": "leaves",
    "removed": "removed",
    "allowlisted keys": "partial",
    "merged": "leaves",
}


_MODE_STYLE: dict[str, Style] = {"keep": "leaves", "drop": "removed", "allowlist": "partial"}


def shown(place: str) -> str:
    """A file path, or file:line, relative to the working directory when under it; a shipped file outside it
    (an installed package's) by its builtin: name."""
    file, sep, line = place.rpartition(":")
    if not (sep and line.isdigit()):
        file, line = place, ""
    name = display_path(file)
    if Path(name).is_absolute():
        name = builtin_name(file) or name
    return f"{name}:{line}" if line else name


def _rule(rule: str) -> tuple[Fragment, ...]:
    return ((" ", ""), (rule, "code")) if rule else ()


def _status(status: str, rule: str) -> Text:
    return Text(((status, _STATUS_STYLE.get(status, "")), *_rule(rule)))


def _field_path(group: FieldRule) -> Text:
    count = f" ({group.leaves} fields)" if group.leaves > 1 else ""
    return text((group.path, "code"), count)


def _access_block(surface: Surface) -> Block:
    rows = []
    for k in surface.kinds:
        cells = [text((k.kind, "code"), " (single-tenant)" if k.single_tenant else "")]
        for a in k.access:
            if a.served:
                cells.append(_status("allowed" if a.allowed else "refused", a.rule))
            else:
                cells.append(_status("not served by the gateway", ""))
        cells.append(text("required" if k.credentials_required else "not required"))
        rows.append(tuple(cells))
    headers = ("identifier kind", *(a.rpc for a in surface.kinds[0].access), "bearer token")
    return Block(
        "Who may call what",
        lines=(
            text(
                "A refused RPC is answered before any content is read: PERMISSION_DENIED naming the rule when "
                "the policy refuses it; UNIMPLEMENTED ",
                ('"unsupported identifier type"', "code"),
                " where Sourcegraph's gateway serves no such kind for the RPC, whatever the policy lists.",
            ),
            _credentials_line(surface),
        ),
        table=Table(headers, tuple(rows)),
    )


def _credentials_line(surface: Surface) -> Text:
    """Exactly what the configured verifier establishes about a required bearer token, and no more."""
    scopes: list[Fragment] = []
    for index, scope in enumerate(surface.credentials_scopes):
        scopes += [(" or " if index else "", ""), (scope, "code")]
    if surface.verifier == "introspection":
        return text(
            "Verifier: token introspection (RFC 7662). A required bearer token must be active and carry a scope "
            "covering ",
            *scopes,
            " (SAMS matching: same service and action, the granted permission equal or a dot-prefix; rule ",
            ("credentials.scope", "code"),
            "); otherwise PERMISSION_DENIED.",
        )
    return text(
        "Verifier: bearer token present (the default). A required bearer token must be present "
        "('authorization: Bearer <token>'); whether it is active and which scopes it carries is not verified "
        "here but left to the gateway. The policy's scopes (",
        *scopes,
        ") are checked only with token introspection (serve --introspection-url).",
    )


def _fields_block(surface: Surface) -> Block:
    kinds = surface.kinds
    by_kind = [{f.path: f for f in k.fields} for k in kinds]
    groups = collapse(kinds[0].fields, lambda f: tuple((m[f.path].status, m[f.path].rule) for m in by_kind))
    rows = []
    for group in groups:
        cells = [_field_path(group)]
        for fields in by_kind:
            leaf = next(p for p in fields if p == group.path or p.startswith(group.path + "."))
            cells.append(_status(fields[leaf].status, fields[leaf].rule))
        rows.append(tuple(cells))
    return Block(
        "Event fields",
        lines=(
            text(
                "What happens to each field of an Event that is exported (RecordEvents, RecordEvent). "
                "'allowlisted keys': only the keys listed under private_metadata below leave. "
                "'merged': the values leave as parameters.metadata.",
            ),
        ),
        table=Table(("field", *(k.kind for k in kinds)), tuple(rows)),
    )


def _settings_block(surface: Surface) -> Block:
    kinds = surface.kinds

    def row(label: str, of: str) -> tuple[Text, ...]:
        cells = [text(label)]
        for k in kinds:
            s = k.setting(of)
            cells.append(text((s.value, "strong"), *_rule(s.rule)))
        return tuple(cells)

    rows = [
        row("unknown fields (field numbers this proto does not know)", "unknown_fields"),
        row("events the gateway would reject (invalid_events)", "invalid_events"),
        row("legacy_metadata", "legacy_metadata"),
    ]
    filter_cells = [text("event filter (whole events, by feature)")]
    for k in kinds:
        include: Fragment = (", ".join(k.events.include), "code") if k.events.include else ("nothing", "")
        exclude: Fragment = (", ".join(k.events.exclude), "code") if k.events.exclude else ("nothing", "")
        filter_cells.append(text("include ", include, "; exclude ", exclude, *_rule(k.events.rule)))
    rows.insert(0, tuple(filter_cells))
    return Block(
        "Whole events and unknown fields",
        table=Table(("setting", *(k.kind for k in kinds)), tuple(rows)),
    )


def _private_block(surface: Surface) -> list[Block]:
    kinds = surface.kinds
    mode_rows = []
    for k in kinds:
        pm = k.private_metadata
        what = {
            "keep": "every key of every event type leaves",
            "drop": "removed from every event",
            "allowlist": "only the keys the allowlist names for the event type",
        }[pm.mode]
        non_string = (
            ""
            if pm.mode != "allowlist"
            else {"drop": "dropped", "replace": "replaced by a string"}.get(
                pm.non_string, "replaced by Sourcegraph's marker naming its kind"
            )
        )
        mode_rows.append(
            (
                text((k.kind, "code")),
                text((pm.mode, _MODE_STYLE[pm.mode])),
                text(what),
                text(non_string or "-"),
                text((pm.rule, "code")),
            )
        )
    blocks = [
        Block(
            "private_metadata",
            lines=(text("Event.parameters.private_metadata may hold anything; it leaves only as the mode says."),),
            table=Table(("identifier kind", "mode", "what leaves", "non-string values", "rule"), tuple(mode_rows)),
        )
    ]
    allowlisted = [k for k in kinds if k.private_metadata.mode == "allowlist"]
    if allowlisted:
        entries = allowlisted[0].private_metadata.event_types
        rows = []
        for i, entry in enumerate(entries):
            applies = [k.kind for k in allowlisted if k.private_metadata.event_types[i].filtered_by is None]
            filtered = [k.kind for k in allowlisted if k.private_metadata.event_types[i].filtered_by is not None]
            where = ", ".join(applies) or "no kind"
            if filtered:
                where += f" (filtered out for {', '.join(filtered)})"
            rows.append(
                (
                    text((entry.feature, "code")),
                    text((entry.action, "code"), " (any action)" if entry.action == "*" else ""),
                    text((", ".join(entry.keys) or "no key", "partial")),
                    text(where),
                    text(entry.reason),
                    text(entry.approved_by or "(not stated)"),
                    text((shown(entry.origin), "code")),
                )
            )
        blocks.append(
            Block(
                "private_metadata keys that may leave, by event type",
                level=3,
                lines=(
                    text(
                        "For kinds in allowlist mode. Lookup: the exact feature and action first, then the "
                        "feature with action *. An event type not listed loses its whole private_metadata; "
                        "a listed key whose value is not a string never leaves with that value.",
                    ),
                ),
                table=Table(
                    ("feature", "action", "keys", "applies to", "reason", "approved by", "written at"), tuple(rows)
                ),
            )
        )
    return blocks


def _user_metadata_block(surface: Surface) -> Block:
    um = surface.user_metadata
    rows = [
        (text("InstanceUserMetadata"), text((c.name, "code")), _status("leaves" if c.leaves else "removed", ""))
        for c in um.user_fields
    ] + [
        (text("InstanceOrganizationMetadata"), text((c.name, "code")), _status("leaves" if c.leaves else "removed", ""))
        for c in um.organization_fields
    ]
    allowed = [k.kind for k in surface.kinds for a in k.access if a.rpc == "PublishInstanceUserMetadata" and a.allowed]
    state = "enabled" if um.enabled else "not enabled: the RPC is refused for every kind"
    return Block(
        "User metadata (PublishInstanceUserMetadata)",
        lines=(
            text(
                "Export of user and organization metadata is ",
                (state, "strong"),
                " (",
                (f"{um.rule}.enabled", "code"),
                "). Kinds that may publish it: ",
                ", ".join(allowed) or "none",
                ".",
            ),
        ),
        table=Table(("message", "field", "leaves?"), tuple(rows)),
    )


def _change_text(changes: tuple[Change, ...]) -> Text:
    if not changes:
        return text("-")
    return text("; ".join(f"{c.area} {c.subject}: {c.old} -> {c.new}" for c in changes))


def _overrides_block(surface: Surface) -> Block:
    rows = tuple(
        (
            text((o.rule, "code"), f": {o.description}" if o.description else ""),
            text((o.kind, "code")),
            text((o.match_text, "code")),
            text(("license key fingerprint", "strong") if o.verified else "self-reported fields only"),
            _change_text(o.widening),
            _change_text(o.narrowing),
            text((shown(o.origin), "code")),
        )
        for o in surface.overrides
    )
    return Block(
        "Overrides: single identifiers",
        lines=(
            text(
                "An override's rules replace its kind's, key by key, for the identifier it matches (every field "
                "given must be equal; license_key_sha256 is the SHA-256 of the license key). Compared with the "
                "kind's rules above: what the matched identifier may send in addition (widens) and no longer "
                "(narrows). A widening override must match on the license key fingerprint.",
            ),
        ),
        table=Table(("override", "kind", "match", "matched on", "widens", "narrows", "written at"), rows),
    )


def surface_blocks(surface: Surface) -> list[Block]:
    header = Block(
        f"Export surface of {surface.name}",
        level=1,
        lines=(
            text(
                "What this policy lets leave an installation on the telemetrygateway.v1 protocol, per identifier "
                "kind, and the policy key that decides each item. Anything the policy does not set falls back "
                "to the strictest choice (rules named strictest-default.*).",
            ),
        ),
        bullets=(
            text("policy: ", (shown(surface.files[0]), "code")),
            text("sha256 (of every file read): ", (surface.sha256, "code")),
            *(text("file read: ", (shown(f), "code")) for f in surface.files),
        ),
    )
    return [
        header,
        _access_block(surface),
        _fields_block(surface),
        *_private_block(surface),
        _settings_block(surface),
        _user_metadata_block(surface),
        *([_overrides_block(surface)] if surface.overrides else []),
    ]


def diff_blocks(result: SurfaceDiff) -> list[Block]:
    summary = ", ".join(f"{len(result.by_direction(d))} {d}" for d in ("widening", "narrowing", "changed"))
    blocks = [
        Block(
            "Policy change: what may leave",
            level=1,
            lines=(text(summary, "."),),
            bullets=(
                text("old: ", (shown(result.old.files[0]), "code"), " sha256 ", (result.old.sha256, "code")),
                text("new: ", (shown(result.new.files[0]), "code"), " sha256 ", (result.new.sha256, "code")),
            ),
        )
    ]
    titles = {
        "widening": "Widening: may leave now, could not before",
        "narrowing": "Narrowing: can no longer leave",
        "changed": "Other changes",
    }
    for direction, title in titles.items():
        changes = result.by_direction(direction)  # type: ignore[arg-type]
        if not changes:
            continue
        rows = tuple((text(c.who), text(c.area), text((c.subject, "code")), text(c.old), text(c.new)) for c in changes)
        blocks.append(Block(title, table=Table(("kind", "area", "what", "before", "after"), rows)))
    if not result.changes:
        blocks.append(Block("No change", lines=(text("The two policies let exactly the same things leave."),)))
    return blocks
