"""``gradsketch spectrum``: top eigenvalues, density and diagnostics of a model's curvature (typer sub-app).

The model is the built-in digits MLP (default) or a user entry point ``module:function`` (or
``path/to/file.py:function``) returning ``(model, loss, data)``: ``loss`` a per-example loss
``(model, batch) -> [B]``, a :class:`gradsketch.Task`, or ``"cross_entropy"`` / ``"mse"`` (then
``Task.from_classifier(model, loss)``); ``data`` an iterable of batches. The lead wires ``app`` into the
``gradsketch`` CLI.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import typer

app = typer.Typer(help="Hessian / GGN / Fisher spectrum analysis (exact or sketched).", no_args_is_help=True)


def load_entry(entry: str) -> tuple[Any, Any]:
    """``module:function`` or ``file.py:function`` -> ``(task, data)``."""
    from .model import Task

    if ":" not in entry:
        raise ValueError(f"entry: expected 'module:function' or 'path/file.py:function', got {entry!r}")
    mod_name, fn_name = entry.rsplit(":", 1)
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        if not os.path.exists(mod_name):
            raise ValueError(f"entry: file {mod_name!r} does not exist")
        spec = importlib.util.spec_from_file_location("_gradsketch_entry", mod_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"entry: cannot import {mod_name!r} as a Python file")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"entry: {fn_name!r} is not a callable of module {mod_name!r}")
    out = fn()
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise ValueError(f"entry: {entry} must return (model, loss_fn or task, data), got {type(out).__name__}")
    model, loss, data = out
    if isinstance(loss, Task):
        task = loss
    elif isinstance(loss, str):
        task = Task.from_classifier(model, loss=loss)
    elif callable(loss):
        task = Task(model, loss)
    else:
        raise ValueError("entry: the second returned value must be a per-example loss (model, batch) -> [B], "
                         f"a Task, or 'cross_entropy'/'mse'; got {type(loss).__name__}")
    return task, data


@app.command("spectrum")
def spectrum_cmd(
    entry: str | None = typer.Option(None, help="module:function returning (model, loss_fn or task, data); "
                                                   "default: the built-in digits MLP"),
    k: int = typer.Option(10, help="number of eigenpairs"),
    operator: str = typer.Option("hessian", help="hessian, ggn or fisher"),
    method: str = typer.Option("lanczos", help="lanczos or arnoldi"),
    which: str = typer.Option("LA", help="LA, SA, LM or BE (BE gives the negative ratio)"),
    n_iter: int | None = typer.Option(None, help="Krylov dimension (default max(3k, k+60))"),
    mode: str = typer.Option("full", help="full, batch or stochastic"),
    sketch_kind: str | None = typer.Option(None, "--sketch", help="sketch kind (affd, afjl, qk, ...); none = exact"),
    d: int = typer.Option(1024, help="sketch dimension"),
    seed: int = typer.Option(0),
    tol: float | None = typer.Option(None, help="Lanczos relative tolerance"),
    threshold: float = typer.Option(0.2, help="outlier threshold λ_n/λ_1"),
    density_probes: int = typer.Option(0, help="SLQ probes for the density (0: skip)"),
    density_steps: int = typer.Option(60, help="SLQ Lanczos steps per probe"),
    hidden: str = typer.Option("64,64", help="digits MLP: hidden widths"),
    n_examples: int = typer.Option(512, help="digits MLP: examples"),
    epochs: int = typer.Option(5, help="digits MLP: training epochs before the analysis"),
    float64: bool = typer.Option(False, "--float64/--float32", help="digits MLP dtype"),
    threads: int | None = typer.Option(None, help="torch intra-op threads"),
    json_out: str | None = typer.Option(None, "--json", help="write the result (JSON + .npz vectors)"),
    plot: str | None = typer.Option(None, help="eigenvalue plot (PNG)"),
    report: str | None = typer.Option(None, help="self-contained HTML report"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Print the top eigenvalues, residuals, outliers, negative ratio and gradient alignment."""
    import torch

    from .spectrum import density, plot_eigenvalues, spectrum, write_report

    if threads:
        torch.set_num_threads(threads)
    try:
        if entry:
            task, data = load_entry(entry)
        else:
            from .spectrum._digits import digits_task

            widths = tuple(int(h) for h in hidden.split(",") if h.strip())
            task, data, _ = digits_task(widths, n=n_examples, epochs=epochs,
                                        dtype=torch.float64 if float64 else torch.float32, seed=seed)
        sk = task.block_sketch(d, sketch_kind, seed=seed) if sketch_kind else None
        res = spectrum(task, data, k=k, sketch=sk, operator=operator, method=method, which=which, n_iter=n_iter,
                       mode=mode, seed=seed, tol=tol, progress=progress)
        dens = (density(task, data, operator=operator, n_probes=density_probes, n_steps=density_steps, sketch=sk,
                        mode=mode, seed=seed, progress=progress) if density_probes > 0 else None)
        first = next(iter(data))
        g = task.grads(first).mean(0)
    except (ValueError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"model: {task.n_params} parameters; operator {operator}, "
               f"{f'sketch {sketch_kind} d={d}' if sk else 'exact'}")
    typer.echo(f"{'rank':>4}  {'eigenvalue':>14}  {'residual':>10}")
    for i, (lam, r) in enumerate(zip(res.eigenvalues.tolist(), res.residuals.tolist()), 1):
        typer.echo(f"{i:>4}  {lam:>14.6g}  {r:>10.2e}")
    typer.echo(f"operator products: {res.n_hvp}")
    summary: dict[str, Any] = {"n_hvp": res.n_hvp}
    try:
        n_out = len(res.outliers(threshold))
        typer.echo(f"outliers (λ/λ1 > {threshold:g}): {n_out}" + (" (all computed: at least this many)"
                                                                    if n_out == res.k else ""))
        summary["outliers"] = n_out
    except ValueError as e:
        typer.echo(f"outliers: {e}")
    neg = res.negative_ratio if float(res.eigenvalues.max()) > 0 else float("nan")
    typer.echo(f"negative ratio |λmin|/λmax: {neg:.4g}" + ("  (use --which BE)" if neg != neg else ""))
    al = res.alignment(g)
    typer.echo(f"alignment of the first batch's mean gradient with the top-{res.k} eigenspace: {al:.4f}")
    summary.update(negative_ratio=neg, alignment=al)
    if json_out:
        res.info["cli_summary"] = summary
        jp, _ = res.save(json_out)
        typer.echo(f"json: {jp}")
    if plot:
        import matplotlib.pyplot as plt

        plt.close(plot_eigenvalues(res, plot, threshold=threshold))
        typer.echo(f"plot: {plot}")
    if report:
        write_report(report, spectrum=res, density=dens, grads=g, threshold=threshold)
        typer.echo(f"report: {report}")


@app.callback()
def _main() -> None:
    """Spectrum commands."""
