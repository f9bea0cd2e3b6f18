"""``report.html``: the whole report in one self-contained page (tables as HTML, figures embedded as
base64 PNG, inline CSS, no scripts and no network assets), so it opens offline and can be mailed.

Built with the standard library's :mod:`html` escaping; every cell and caption is escaped.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

__all__ = ["figure_html", "page", "table_html"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .counts { font-size: 1.05em; } code { background: #f6f6f6; }
"""


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], table_class: str = "") -> str:
    """A ``<table>`` of text cells (escaped), header row in ``<thead>``."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    cls = f' class="{html.escape(table_class)}"' if table_class else ""
    return f"<table{cls}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def figure_html(path: Path, caption: str = "") -> str:
    """A ``<figure>`` with the PNG at ``path`` embedded as a base64 data URI, and its caption."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(caption or Path(path).stem)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
            f"<figcaption>{html.escape(caption or Path(path).name)}</figcaption></figure>")


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A complete HTML document: ``title``, an escaped ``intro`` paragraph and ``(heading, body HTML)`` sections."""
    parts = [f"<h2>{html.escape(heading)}</h2>\n{body}" for heading, body in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class=\"counts\">{html.escape(intro)}</p>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
