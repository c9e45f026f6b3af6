"""Markdown renderings of the audit and diff reports (GitHub-flavoured tables)."""

from __future__ import annotations

from collections.abc import Sequence

from telemetry_guard.policy.surface import Surface, SurfaceDiff
from telemetry_guard.render.report import Block, Text, diff_blocks, surface_blocks
from telemetry_guard.render.shadow import shadow_blocks
from telemetry_guard.shadowlog import ShadowReport


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("_", "\\_").replace("\n", " ")


def _code(value: str) -> str:
    ticks = "``" if "`" in value else "`"
    pad = " " if "`" in value else ""
    return f"{ticks}{pad}{value.replace('|', '&#124;')}{pad}{ticks}"


def inline(t: Text) -> str:
    out = []
    for value, style in t.parts:
        if not value:
            continue
        if style == "code":
            out.append(_code(value))
        elif style in ("strong", "removed"):
            out.append(f"**{_escape(value)}**")
        elif style == "partial":
            out.append(f"*{_escape(value)}*")
        else:
            out.append(_escape(value))
    return "".join(out)


def render_blocks(blocks: Sequence[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        lines += [f"{'#' * block.level} {block.title}", ""]
        for line in block.lines:
            lines += [inline(line), ""]
        if block.bullets:
            lines += [f"- {inline(b)}" for b in block.bullets] + [""]
        if block.table is not None:
            lines.append("| " + " | ".join(_escape(h) for h in block.table.headers) + " |")
            lines.append("|" + "---|" * len(block.table.headers))
            lines += ["| " + " | ".join(inline(cell) for cell in row) + " |" for row in block.table.rows]
            lines.append("")
    return "\n".join(lines)


def surface_markdown(surface: Surface) -> str:
    return render_blocks(surface_blocks(surface))


def diff_markdown(result: SurfaceDiff) -> str:
    return render_blocks(diff_blocks(result))


def shadow_markdown(report: ShadowReport) -> str:
    return render_blocks(shadow_blocks(report))
