"""A self-contained HTML report of a spectrum analysis (PNG figures inlined as base64)."""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from typing import Any


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Any, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}"/>'


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(str(b))}</td></tr>" for a, b in rows)
    return f"<table>{body}</table>"


def write_report(path: str | os.PathLike, spectrum: Any = None, density: Any = None, series: Any = None,
                 grads: Any = None, title: str = "gradsketch spectrum report", threshold: float = 0.2,
                 notes: list[str] | None = None) -> str:
    """Write one HTML file with the eigenvalue plot and diagnostics, the density plot and the checkpoint
    evolution plot (each part optional); images are embedded as ``data:image/png;base64`` URIs, so the file
    needs nothing else to display.

    Args:
        path: output ``.html`` path.
        spectrum: a :class:`SpectrumResult` (or a list: the first one is summarised, all are plotted).
        density: a :class:`DensityResult`.
        series: a :class:`SpectrumSeries`.
        grads: optional gradient(s) for :meth:`SpectrumResult.alignment` (``reduce="total"``).
        threshold: outlier threshold ``λ_n/λ_1``.
        notes: free-text lines appended at the end.

    Returns:
        the path written.
    """
    from .plots import plot_density, plot_eigenvalues, plot_evolution

    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
    if spectrum is not None:
        rs = spectrum if isinstance(spectrum, (list, tuple)) else [spectrum]
        r = rs[0]
        rows: list[tuple[str, Any]] = [
            ("operator", r.info.get("operator")), ("method", r.info.get("method")), ("which", r.info.get("which")),
            ("parameters N", r.info.get("n_params")), ("operator dimension", r.info.get("dim")),
            ("sketch", r.sketch_spec if r.sketch_spec else "none (exact)"),
            ("eigenvalues", ", ".join(f"{x:.6g}" for x in r.eigenvalues.tolist())),
            ("max relative residual", f"{float((r.residuals / r.eigenvalues.abs().clamp_min(1e-300)).max()):.3g}"),
            ("operator products", r.n_hvp), ("Krylov dimension", r.info.get("n_iter")),
        ]
        try:
            rows.append((f"outliers (λ/λ1 > {threshold:g})", len(r.outliers(threshold))))
        except ValueError as e:
            rows.append(("outliers", str(e)))
        try:
            rows.append(("negative ratio |λmin|/λmax", f"{r.negative_ratio:.4g}"))
        except ValueError as e:
            rows.append(("negative ratio", str(e)))
        if grads is not None:
            rows.append(("gradient alignment with top-k", f"{r.alignment(grads, reduce='total'):.4g}"))
        parts += ["<h2>Top eigenvalues</h2>", _table(rows), _img(plot_eigenvalues(list(rs), threshold=threshold),
                                                                 "eigenvalues")]
    if density is not None:
        parts += ["<h2>Spectral density (SLQ)</h2>",
                  _table([("probes", density.info.get("n_probes")), ("Lanczos steps", density.info.get("n_steps")),
                          ("kernel", density.kernel), ("sigma", f"{density.sigma:.4g}"),
                          ("operator products", density.n_hvp)]),
                  _img(plot_density(density), "density")]
    if series is not None:
        parts += ["<h2>Evolution over checkpoints</h2>", _img(plot_evolution(series), "evolution")]
    if notes:
        parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:90%}img{max-width:100%}")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc)
    return path
