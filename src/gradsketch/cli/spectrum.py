"""``gradsketch spectrum``: parse the options, call :func:`gradsketch.spectrum.pipeline.run_spectrum`."""

from __future__ import annotations

import math

import typer

from ._common import command_line, usage_errors
from .attribute import ENTRY_HELP


def spectrum(
    entry: str | None = typer.Option(None, help=ENTRY_HELP + "; the curvature data is its train data "
                                                "[default: the built-in digits MLP]"),
    k: int = typer.Option(10, help="number of eigenpairs"),
    operator: str = typer.Option("hessian", help="hessian, ggn or fisher"),
    method: str = typer.Option("lanczos", help="lanczos or arnoldi"),
    which: str = typer.Option("LA", help="LA (largest), SA (smallest), LM or BE (both ends: gives the negative "
                                         "ratio)"),
    n_iters: int | None = typer.Option(None, help="Krylov dimension [default: max(3k, k+60)]"),
    sampling: str = typer.Option("full", help="curvature data: full, batch or stochastic (formerly --mode)"),
    kind: str = typer.Option("affd", help="sketch kind (affd, afjl, qk, sjlt, fjl, ffd, dense), used when d > 0"),
    d: int = typer.Option(0, help="sketch dimension; 0 = exact (no sketch)"),
    sketch: str | None = typer.Option(None, "--sketch", hidden=True, help="old spelling of --kind (with d 1024)"),
    seed: int = typer.Option(0),
    tol: float | None = typer.Option(None, help="Lanczos relative tolerance"),
    threshold: float = typer.Option(0.2, help="outlier threshold λ_n/λ_1"),
    density_probes: int = typer.Option(0, help="SLQ probes for the density (0: skip)"),
    density_steps: int = typer.Option(60, help="SLQ Lanczos steps per probe"),
    hidden: str = typer.Option("64,64", help="digits MLP: hidden widths"),
    n_examples: int = typer.Option(512, help="digits MLP: training examples"),
    epochs: int = typer.Option(5, help="digits MLP: training epochs before the analysis"),
    float64: bool = typer.Option(False, "--float64/--float32", help="digits MLP dtype"),
    threads: int | None = typer.Option(None, help="torch intra-op threads"),
    json_out: str | None = typer.Option(None, "--json", help="write the result (JSON + .npz vectors)"),
    plot: str | None = typer.Option(None, help="eigenvalue plot (PNG)"),
    report: str | None = typer.Option(None, help="self-contained HTML report"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Print the eigenvalues with their residuals, outliers, negative ratio and gradient alignment; optionally
    write JSON, a plot and an HTML report. All options are checked before the model is loaded."""
    import torch

    from ..spectrum.pipeline import SpectrumConfig, run_spectrum

    names = ("k", "operator", "method", "which", "n_iters", "sampling", "kind", "d", "seed", "tol", "threshold",
             "density_probes", "density_steps", "hidden", "n_examples", "epochs", "threads")
    with usage_errors(names):
        if sketch is not None:  # the old flag: --sketch KIND meant a sketch of d (default 1024 then)
            kind, d = sketch, d or 1024
        cfg = SpectrumConfig(k=k, operator=operator, method=method, which=which, n_iters=n_iters, sampling=sampling,
                             kind=kind, d=d, seed=seed, tol=tol, threshold=threshold, density_probes=density_probes,
                             density_steps=density_steps)
        if threads is not None and threads < 1:
            raise ValueError(f"threads: expected a positive integer, got {threads}")
        try:
            widths = tuple(int(h) for h in hidden.split(",") if h.strip())
        except ValueError as e:
            raise ValueError(f"hidden: expected comma-separated positive integers, got {hidden!r}") from e
        if not widths or min(widths) < 1:
            raise ValueError(f"hidden: expected comma-separated positive integers, got {hidden!r}")
        if not 1 <= n_examples <= 1597:
            raise ValueError(f"n_examples: expected an integer in [1, 1597], got {n_examples}")
        if epochs < 0:
            raise ValueError(f"epochs: expected an integer >= 0, got {epochs}")
        if threads:
            torch.set_num_threads(threads)
        if entry:
            from ..entry import load_entry

            ent = load_entry(entry)
        else:
            from ..datasets import digits_entry

            ent = digits_entry(widths, n_train=n_examples, epochs=epochs, seed=seed,
                               dtype=torch.float64 if float64 else torch.float32)
        out = run_spectrum(ent, cfg, json_out=json_out, plot=plot, report=report, progress=progress,
                           command=command_line())
    res, s = out["result"], out["summary"]
    how = ("sketch " + s["sketch"]) if s["sketch"] else "exact"
    typer.echo(f"model: {s['n_params']} parameters; operator {operator}, {how}")
    ends = _ends(res)
    typer.echo(f"{'#':>3}  {'end':>6}  {'eigenvalue':>14}  {'residual':>10}")
    for i, (lam, r, end) in enumerate(zip(res.eigenvalues.tolist(), res.residuals.tolist(), ends), 1):
        typer.echo(f"{i:>3}  {end:>6}  {lam:>14.6g}  {r:>10.2e}")
    typer.echo(f"operator products: {res.n_hvp}")
    if s["outliers"] is not None:
        typer.echo(f"outliers (λ/λ1 > {threshold:g}): {s['outliers']}"
                   + (f" ({s['outliers_note']})" if s["outliers_note"] else ""))
    else:
        typer.echo(f"outliers: {s['outliers_note']}")
    neg = s["negative_ratio"]
    typer.echo(f"negative ratio |λmin|/λmax: {neg:.4g}" + ("  (use --which BE)" if math.isnan(neg) else ""))
    if s["alignment"] is not None:
        typer.echo(f"alignment with the top-{res.k} eigenspace: {s['alignment']:.4f} ({s['alignment_gradient']})")
    for note in s["notes"]:
        typer.echo(f"note: {note}")
    for key in ("json", "plot", "report"):
        if s.get(key):
            typer.echo(f"{key}: {s[key]}")


def _ends(res: object) -> list[str]:
    from ..report.plots import ends_of

    return [str(e) for e in ends_of(res)]
