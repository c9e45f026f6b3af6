"""The audit report as one self-contained HTML file: inline style, no script, nothing fetched."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from telemetry_guard import version
from telemetry_guard.policy.surface import Surface
from telemetry_guard.render.report import Block, Text, surface_blocks
from telemetry_guard.render.shadow import shadow_blocks
from telemetry_guard.shadowlog import ShadowReport

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 78rem;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #333; padding-bottom: .3rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1rem; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: .3rem .5rem; text-align: left; vertical-align: top; }
th { background: #f1f1f4; } tr:nth-child(even) td { background: #fafafa; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f1f1f4; padding: 0 .2rem;
       border-radius: 3px; overflow-wrap: break-word; }
.meta { display: flex; flex-wrap: wrap; gap: .2rem 1.5rem; margin: -.4rem 0 1rem; padding: .5rem .7rem;
        background: #f6f6f8; border: 1px solid #ddd; border-radius: 4px; font-size: 14px; }
.meta span { white-space: nowrap; } .meta .digest, .meta .digest code { white-space: normal; overflow-wrap: anywhere; }
.wide { overflow-x: auto; } .wide table { margin: 0; }
@media (max-width: 48rem) { body { margin: 1rem auto; } .wide table { min-width: 40rem; } }
.removed { color: #8a1c1c; font-weight: 600; } .leaves { color: #1c5e20; }
.partial { color: #7a4b00; font-style: italic; } strong { font-weight: 600; }
footer { margin-top: 2rem; color: #666; font-size: 13px; overflow-wrap: anywhere; }
@media print { body { margin: 0; max-width: none; } }
"""


def inline(t: Text) -> str:
    out = []
    for value, style in t.parts:
        safe = escape(value)
        if style == "code":
            out.append(f"<code>{_breakable(safe)}</code>")
        elif style == "strong":
            out.append(f"<strong>{safe}</strong>")
        elif style:
            out.append(f'<span class="{style}">{safe}</span>')
        else:
            out.append(safe)
    return "".join(out)


def _breakable(name: str) -> str:
    """A code name that may wrap only after a separator (. / :), never in the middle of a word."""
    return _SEPARATORS.sub(r"\1<wbr>", name)


_SEPARATORS = re.compile(r"([./:]+)(?=[^\s])")


def render_blocks(title: str, blocks: Sequence[Block], footer: str, meta: Sequence[tuple[str, str]] = ()) -> str:
    """The page; meta: (label, value) pairs shown under the first heading (values in code when named so)."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
    ]
    for number, block in enumerate(blocks):
        level = min(max(block.level, 1), 6)
        parts.append(f"<section><h{level}>{escape(block.title)}</h{level}>")
        if number == 0 and meta:
            shown = "".join(
                f'<span class="{_meta_class(label)}">{escape(label)}: {value}</span>' for label, value in meta
            )
            parts.append(f'<div class="meta">{shown}</div>')
        parts += [f"<p>{inline(line)}</p>" for line in block.lines]
        if block.bullets:
            parts.append("<ul>" + "".join(f"<li>{inline(b)}</li>" for b in block.bullets) + "</ul>")
        if block.table is not None:
            head = "".join(f"<th>{escape(h)}</th>" for h in block.table.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{inline(cell)}</td>" for cell in row) + "</tr>" for row in block.table.rows
            )
            parts.append(f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>')
        parts.append("</section>")
    parts += [f"<footer>{escape(footer)}</footer>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _meta_class(label: str) -> str:
    return "digest" if label.startswith("fingerprint") else ""


def surface_html(surface: Surface, generated: datetime | None = None) -> str:
    """The audit report; its head says when it was made, by which telemetry-guard, of which policy files."""
    when = (generated or datetime.now(UTC)).astimezone(UTC)
    meta = (
        ("generated", escape(when.strftime("%Y-%m-%d %H:%M UTC"))),
        ("by", f"telemetry-guard {escape(version())}"),
        ("fingerprint (sha256 of every file read)", f"<code>{escape(surface.sha256)}</code>"),
    )
    return render_blocks(
        f"Export surface of {surface.name}",
        surface_blocks(surface),
        f"telemetry-guard {version()} audit, {when:%Y-%m-%d %H:%M UTC}; policy sha256 {surface.sha256}",
        meta,
    )


def shadow_html(report: ShadowReport) -> str:
    return render_blocks(
        "Shadow policy report",
        shadow_blocks(report),
        "telemetry-guard shadow-report; only the policy in force decided what left; no value is recorded",
    )
