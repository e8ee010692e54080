"""The report as a document: a list of blocks (headings, text, tables, figures), rendered to Markdown
with the figures as files beside it and to one self-contained HTML page (figures as base64 PNG)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str
    anchor: str | None = None  # what a Link to this heading targets


@dataclass
class Link:
    """A table cell that leads to the heading of that ``anchor``."""

    text: str
    anchor: str


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str | Link]]


@dataclass
class Plot:
    name: str
    caption: str  # also the image's alt text: says what it shows
    png: bytes


Block = Heading | Text | Table | Plot


def to_markdown(blocks: list[Block], figures: Path) -> str:
    """The Markdown text; writes each figure into ``figures`` as it goes."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            if block.anchor:
                lines.append(f'<a id="{block.anchor}"></a>')
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Text):
            lines += [block.text, ""]
        elif isinstance(block, Table):

            def cell(value: str | Link) -> str:
                text = value.text if isinstance(value, Link) else value
                text = text.replace("|", "\\|")
                return f"[{text}](#{value.anchor})" if isinstance(value, Link) else text

            lines.append("| " + " | ".join(cell(h) for h in block.headers) + " |")
            lines.append("|" + "---|" * len(block.headers))
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
            lines.append("")
        else:
            (figures / f"{block.name}.png").write_bytes(block.png)
            lines += [f"![{block.caption}]({figures.name}/{block.name}.png)", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #555; }
"""


def to_html(blocks: list[Block]) -> str:
    esc = html.escape
    parts = [
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>cpsc-ray report</title><style>{STYLE}</style>"
        "</head><body>"
    ]
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f" id='{esc(block.anchor)}'" if block.anchor else ""
            parts.append(f"<h{block.level}{anchor}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(block.png).decode()
            parts.append(
                f"<figure><img alt='{esc(block.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{esc(block.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _html_cell(value: str | Link) -> str:
    if isinstance(value, Link):
        return f"<a href='#{html.escape(value.anchor)}'>{html.escape(value.text)}</a>"
    return html.escape(value)
