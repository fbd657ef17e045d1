"""A small document model (sections of text, bullets, tables and figures) rendered to Markdown and to
self-contained HTML (figures embedded as base64 PNG)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Image:
    name: str
    png: bytes
    caption: str


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Section:
    """A heading and its blocks, in order: str (paragraph), list[str] (bullets), Table or Image."""

    title: str
    blocks: list = field(default_factory=list)
    level: int = 2


def cell_text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.5g}"
    return str(value)


def _display(frame: pd.DataFrame) -> list[list[str]]:
    return [[cell_text(value) for value in row] for row in frame.itertuples(index=False, name=None)]


def to_markdown(title: str, sections: list[Section], figure_dir: str) -> str:
    """Markdown; figures are referenced as files under `figure_dir`."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            lines += [*_markdown_block(block, figure_dir), ""]
    return "\n".join(lines)


def _markdown_block(block: object, figure_dir: str) -> list[str]:
    if isinstance(block, str):
        return [block]
    if isinstance(block, list):
        return [("  - " + item.strip()) if item.startswith("  ") else f"- {item}" for item in block]
    if isinstance(block, Image):
        return [f"![{block.caption}]({figure_dir}/{block.name}.png)", "", f"*{block.caption}*"]
    rows = _display(block.frame)
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731
    table = ["| " + " | ".join(map(escape, map(str, block.frame.columns))) + " |"]
    table.append("|" + "---|" * len(block.frame.columns))
    table += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return ([f"*{block.caption}*", ""] if block.caption else []) + table


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%}
figcaption,.caption{font-style:italic;color:#555;font-size:.9em}
"""


def to_html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h{section.level}>{html.escape(section.title)}</h{section.level}>")
        body.extend(_html_block(block) for block in section.blocks)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )


def _html_block(block: object) -> str:
    if isinstance(block, str):
        return f"<p>{html.escape(block)}</p>"
    if isinstance(block, list):
        return _html_bullets(block)
    if isinstance(block, Image):
        data = base64.b64encode(block.png).decode("ascii")
        caption = html.escape(block.caption)
        return f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'><figcaption>{caption}</figcaption></figure>"
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in block.frame.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in _display(block.frame)
    )
    caption = f"<p class='caption'>{html.escape(block.caption)}</p>" if block.caption else ""
    return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_bullets(items: list[str]) -> str:
    groups: list[tuple[str, list[str]]] = []
    for item in items:
        if item.startswith("  ") and groups:
            groups[-1][1].append(item.strip())
        else:
            groups.append((item.strip(), []))
    parts = []
    for top, subs in groups:
        inner = "".join(f"<li>{html.escape(sub)}</li>" for sub in subs)
        parts.append(f"<li>{html.escape(top)}" + (f"<ul>{inner}</ul>" if inner else "") + "</li>")
    return "<ul>" + "".join(parts) + "</ul>"
