"""The spectrum report: one self-contained HTML page of a Hessian / GGN / Fisher spectrum analysis."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from . import escape, figure_to_img, table, write_page
from .plots import ends_of, plot_density, plot_eigenvalues, plot_evolution

__all__ = ["write_report"]


def write_report(path: str | os.PathLike, spectrum: Any = None, density: Any = None, series: Any = None,
                 grads: Any = None, title: str = "gradsketch spectrum report", threshold: float = 0.2,
                 notes: list[str] | None = None, provenance: dict[str, Any] | None = None,
                 grads_label: str | None = None) -> str:
    """Write one HTML file: where the result came from, the eigenpairs with their residuals, the
    diagnostics, the eigenvalue plot (top and bottom ends labelled), the density and the checkpoint
    evolution (each part optional; figures inlined as base64 PNGs).

    Args:
        path: output ``.html`` path.
        spectrum: a :class:`SpectrumResult` (or a list: the first one is tabulated, all are plotted).
        density: a :class:`DensityResult`.
        series: a :class:`SpectrumSeries`.
        grads: gradient(s) for :meth:`SpectrumResult.alignment` (``reduce="total"``).
        grads_label: what ``grads`` is (e.g. "mean loss gradient over the first batch (64 examples)").
        threshold: outlier threshold ``λ_n/λ_1``.
        notes: free-text lines appended at the end.
        provenance: ``{label: value}`` rows on where the result came from (entry, examples, dtype, command).

    Returns:
        the path written.

    >>> import tempfile, os
    >>> p = write_report(os.path.join(tempfile.mkdtemp(), "r.html"), notes=["empty"])
    >>> "empty" in open(p).read()
    True
    """
    sections: list[tuple[str, str]] = []
    prov = [["generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]]
    prov += [[k, "" if v is None else str(v)] for k, v in (provenance or {}).items()]
    if spectrum is not None:
        rs = spectrum if isinstance(spectrum, (list, tuple)) else [spectrum]
        r = rs[0]
        prov += [["operator", r.info.get("operator")],
                 ["method", f"{r.info.get('method')} (which={r.info.get('which')})"],
                 ["parameters N", r.info.get("n_params")], ["operator dimension", r.info.get("dim")],
                 ["sketch", r.sketch_spec if r.sketch_spec else "none (exact)"],
                 ["operator products", r.n_hvp], ["Krylov dimension", r.info.get("n_iter")],
                 ["damping", r.info.get("damping")], ["seed", r.info.get("seed")]]
    sections.append(("Provenance", table(prov, ["", ""])))
    if spectrum is not None:
        lam = r.eigenvalues.tolist()
        res = r.residuals.tolist()
        conv = r.converged.tolist()
        ends = ends_of(r)
        rows = []
        for i, (la, re_, c, e) in enumerate(zip(lam, res, conv, ends), 1):
            rel = re_ / max(abs(la), 1e-300)
            rows.append([i, e, f"{la:.6g}", f"{re_:.3g}", f"{rel:.3g}", "yes" if c else "no"])
        sections.append(("Eigenpairs", table(rows, ["#", "end of the spectrum", "eigenvalue λ",
                                                     "residual ‖Av − λv‖", "relative residual", "converged"])
                         + "<p class='note'>Eigenvalues in descending order. 'top' ones are the largest the search "
                           "looked for, 'bottom' ones the smallest (which=BE takes k − k//2 from the top and k//2 "
                           "from the bottom). Residuals are of the operator actually used (ΦHΦᵀ when sketched)."
                           "</p>"))
        diag: list[list[Any]] = []
        try:
            diag.append([f"outliers (λ/λ₁ > {threshold:g})", len(r.outliers(threshold))])
        except ValueError as e:
            diag.append(["outliers", str(e)])
        try:
            nr = r.negative_ratio
            diag.append(["negative ratio |λmin|/λmax", f"{nr:.4g}" if nr == nr else
                         "not computed (the bottom of the spectrum was not searched: use which=BE)"])
        except ValueError as e:
            diag.append(["negative ratio", str(e)])
        if grads is not None:
            diag.append([f"alignment with the top-{r.k} eigenspace", f"{r.alignment(grads, reduce='total'):.4g}"])
            diag.append(["gradient used for the alignment", grads_label or "the gradient(s) passed as grads"])
        sections.append(("Diagnostics", table(diag, ["", ""])))
        sections.append(("Eigenvalue plot", figure_to_img(plot_eigenvalues(list(rs), threshold=threshold),
                                                          "eigenvalues")))
    if density is not None:
        sections.append(("Spectral density (SLQ)", table(
            [["probes", density.info.get("n_probes")], ["Lanczos steps", density.info.get("n_steps")],
             ["kernel", density.kernel], ["sigma", f"{density.sigma:.4g}"], ["operator products", density.n_hvp]],
            ["", ""]) + figure_to_img(plot_density(density), "density")))
    if series is not None:
        sections.append(("Evolution over checkpoints", figure_to_img(plot_evolution(series), "evolution")))
    if notes:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"))
    write_page(path, title, sections)
    return os.fspath(path)
