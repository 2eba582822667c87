"""A report as a list of blocks, rendered to Markdown (images linked) or one self-contained HTML file.

The HTML embeds every PNG as a base64 ``data:`` URI and carries its CSS inline: it makes no external
request and can be mailed or archived as one file. All text is HTML-escaped. Table cells wrap (only
numbers stay on one line), so that every table fits the page's width with all its columns visible.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str | None = None


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Notice:
    """A highlighted warning (shown with ⚠ in both formats)."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]]
    caption: str | None = None
    warn_rows: set[int] = field(default_factory=set)  # indices of rows to highlight
    numeric: set[int] = field(default_factory=set)  # column indices to right-align


@dataclass
class Image:
    """A PNG: ``name`` is its file name under the report's files directory."""

    name: str
    png: bytes
    caption: str
    alt: str = ""


@dataclass
class Details:
    """A collapsible list in HTML (a plain list in Markdown)."""

    summary: str
    items: list[str]
    open: bool = False


Block = Heading | Paragraph | Bullets | Notice | Table | Image | Details


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], *, files_dir: str) -> str:
    """Markdown; images link ``<files_dir>/<name>``."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            out += [block.text, ""]
        elif isinstance(block, Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Notice):
            out += [f"> ⚠ {block.text}", ""]
        elif isinstance(block, Table):
            if block.caption:
                out += [f"*{block.caption}*", ""]
            out.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            out.append(
                "|"
                + "|".join("---:" if i in block.numeric else "---" for i in range(len(block.header)))
                + "|"
            )
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Image):
            out += [
                f"![{block.alt or block.caption}]({files_dir}/{block.name})",
                "",
                f"*{block.caption}*",
                "",
            ]
        elif isinstance(block, Details):
            out += [f"**{block.summary}**", ""] + [f"- {item}" for item in block.items] + [""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --warn-bg: #fff4d6; --warn-line: #e0b400;
        --head-bg: #f3f5f9; }
* { box-sizing: border-box; }
body { font: 14px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 12px; border-bottom: 2px solid var(--fg); padding-bottom: 6px; }
h2 { font-size: 20px; margin: 36px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 16px; margin: 24px 0 8px; }
h4 { font-size: 14px; margin: 18px 0 6px; color: var(--muted); }
p, ul { margin: 6px 0 12px; }
.notice { background: var(--warn-bg); border-left: 4px solid var(--warn-line); padding: 8px 12px;
          margin: 10px 0 14px; }
.table-wrap { overflow-x: auto; margin: 6px 0 16px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; max-width: 100%; }
caption { caption-side: top; text-align: left; color: var(--muted); padding: 0 0 4px; font-style: italic; }
th, td { border: 1px solid var(--line); padding: 4px 6px; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }
th { background: var(--head-bg); font-weight: 600; }
td.num { text-align: right; white-space: nowrap; }
tr.warn td { background: var(--warn-bg); }
figure { margin: 10px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
details { margin: 8px 0 16px; }
summary { cursor: pointer; font-weight: 600; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; background: var(--head-bg);
       padding: 0 3px; }
"""


def _inline(text: str) -> str:
    """Escape, then render `code` spans (the only inline markup the report uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: Sequence[Block], *, title: str) -> str:
    """One self-contained HTML page (inline CSS, images as data URIs, no scripts, no external links)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
            body.append(f"<h{block.level}{anchor}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Notice):
            body.append(f'<div class="notice">⚠ {_inline(block.text)}</div>')
        elif isinstance(block, Table):
            rows = []
            for index, row in enumerate(block.rows):
                cls = ' class="warn"' if index in block.warn_rows else ""
                cells = "".join(
                    ("<td class='num'>" if j in block.numeric else "<td>") + _inline(str(c)) + "</td>"
                    for j, c in enumerate(row)
                )
                rows.append(f"<tr{cls}>{cells}</tr>")
            caption = f"<caption>{_inline(block.caption)}</caption>" if block.caption else ""
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            body.append(
                f'<div class="table-wrap"><table>{caption}<thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table></div>"
            )
        elif isinstance(block, Image):
            data = base64.b64encode(block.png).decode("ascii")
            alt = html.escape(block.alt or block.caption, quote=True)
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{_inline(block.caption)}</figcaption></figure>"
            )
        elif isinstance(block, Details):
            items = "".join(f"<li>{_inline(i)}</li>" for i in block.items)
            opened = " open" if block.open else ""
            body.append(
                f"<details{opened}><summary>{_inline(block.summary)}</summary><ul>{items}</ul></details>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )
