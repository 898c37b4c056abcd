"""gradsketch.report: self-contained HTML reports (matplotlib figures inlined as base64 PNGs).

No external assets, scripts or network: the HTML file is the whole report.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["figure_to_img", "table", "page", "write_page", "escape"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.92em}
"""


def escape(text: Any) -> str:
    return html.escape(str(text))


def figure_to_img(fig: Any, alt: str = "figure", dpi: int = 100, close: bool = True) -> str:
    """An ``<img>`` tag holding ``fig`` (a matplotlib Figure) as an inline base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """An HTML table; floats printed with 4 significant digits."""

    def cell(v: Any) -> str:
        return escape(f"{v:.4g}" if isinstance(v, float) else v)

    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A complete HTML document: ``sections`` are ``(heading, inner_html)`` pairs (each gets an id)."""
    body = [f"<h1>{escape(title)}</h1>"]
    if intro:
        body.append(intro)
    for i, (head, inner) in enumerate(sections):
        sid = "".join(ch if ch.isalnum() else "-" for ch in head.lower()).strip("-") or f"s{i}"
        body.append(f'<h2 id="{sid}">{escape(head)}</h2>\n{inner}')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_page(path: Any, title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> Path:
    """Write :func:`page` to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page(title, sections, intro), encoding="utf-8")
    tmp.replace(path)
    return path
