"""gradsketch.report: the one HTML writer and every plot of the project.

Reports are single self-contained HTML files (figures and example images inlined as base64 PNGs; no
external assets, scripts or network). Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas
attached directly, so nothing here touches pyplot's global state or selects a process-wide backend.

* :func:`page` / :func:`write_page`: the HTML document; :func:`table`, :func:`figure_to_img`,
  :func:`image_to_img`, :func:`escape`: its parts.
* :mod:`gradsketch.report.plots`: eigenvalue, density, evolution, ROC and intrinsic-dimension figures.
* :mod:`gradsketch.report.spectrum`, :mod:`gradsketch.report.attribution`: the two application reports.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["figure_to_img", "image_to_img", "new_figure", "table", "page", "write_page", "escape"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1320px;margin:2em auto;
padding:0 1em;color:#222;font-size:15px}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.92em}table.kv td{text-align:left}table.kv td:first-child{color:#444;white-space:nowrap}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin:.3em 0 1em}
.group{border:1px solid #ddd;border-radius:6px;padding:6px 8px;background:#fafafa}
.group>.gtitle{font-weight:600;font-size:.9em;margin-bottom:4px}
.cards{display:flex;gap:6px;flex-wrap:wrap}
.card{width:96px;font-size:13px;line-height:1.3;text-align:center;border:2px solid transparent;border-radius:4px;
padding:3px;background:#fff}
.card.text{width:220px;text-align:left}
.card .txt{font-size:12.5px;max-height:7.5em;overflow:hidden;border-left:3px solid #ccc;padding-left:4px}
.card img{width:84px;height:84px;image-rendering:pixelated;display:block;margin:0 auto 2px}
.card.test{border-color:#1f4e9c}.card.pro{border-color:#2e7d32}.card.opp{border-color:#c62828}
.card.flag{background:#fff3e0}.flagtxt{color:#e65100;font-weight:700}
.score{font-size:11.5px;white-space:nowrap;letter-spacing:-.2px}
.legend span{display:inline-block;margin-right:1.2em}
.sw{display:inline-block;width:12px;height:12px;border:2px solid;vertical-align:middle;margin-right:4px}
"""


def escape(text: Any) -> str:
    """HTML-escape ``str(text)``.

    >>> escape("<b>")
    '&lt;b&gt;'
    """
    return html.escape(str(text))


def new_figure(figsize: tuple[float, float] = (6.0, 3.6)) -> Any:
    """A ``matplotlib.figure.Figure`` with an Agg canvas attached (no pyplot, no global backend).

    >>> fig = new_figure((2, 2)); ax = fig.add_subplot(); _ = ax.plot([0, 1])
    >>> figure_to_img(fig).startswith('<img')
    True
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def figure_to_img(fig: Any, alt: str = "figure", dpi: int = 110, close: bool = True) -> str:
    """An ``<img>`` tag holding ``fig`` (a matplotlib Figure) as an inline base64 PNG. ``close`` also closes it
    in pyplot when it was made there (a :func:`new_figure` needs no closing)."""
    data = base64.b64encode(_png_bytes(fig, dpi)).decode("ascii")
    if close:
        import sys

        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None and hasattr(fig, "number") and plt.fignum_exists(fig.number):  # pyplot-managed
            plt.close(fig)
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def image_to_img(image: Any, alt: str = "example", cmap: str = "gray_r") -> str:
    """An ``<img>`` of one example image: an array ``[H, W]`` (shown with ``cmap``), ``[H, W, 3|4]`` or
    ``[3, H, W]`` (channels first, as torch keeps them), values of any range (scaled to [0, 1]).

    >>> image_to_img([[0, 1], [1, 0]]).startswith('<img')
    True
    """
    import numpy as np
    from matplotlib.image import imsave

    a = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"image: expected an array [H, W], [H, W, C] or [C, H, W], got shape {a.shape}")
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    buf = io.BytesIO()
    imsave(buf, a, cmap=cmap if a.ndim == 2 else None, format="png", vmin=0.0, vmax=1.0)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """An HTML table; floats printed with 4 significant digits.

    >>> table([["a", 1.23456]], ["name", "value"]).count("<tr>")
    2
    """

    def cell(v: Any) -> str:
        return escape(f"{v:.4g}" if isinstance(v, float) else v)

    keyvalue = not header or not any(str(h) for h in header)
    out = ["<table class='kv'>" if keyvalue else "<table>"]
    if header and not keyvalue:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A complete HTML document: ``sections`` are ``(heading, inner_html)`` pairs (each gets an id).

    >>> "<h2 id=\\"setup\\">Setup</h2>" in page("t", [("Setup", "<p>x</p>")])
    True
    """
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
