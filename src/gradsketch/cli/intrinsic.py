"""``gradsketch intrinsic-dim``: parse the options, call :func:`gradsketch.intrinsic.pipeline.run_intrinsic_dim`."""

from __future__ import annotations

import typer

from ..intrinsic.search import DEFAULTS
from ._common import usage_errors
from .attribute import ENTRY_HELP


def intrinsic_dim(
    entry: str | None = typer.Option(None, help=ENTRY_HELP + "; train on its train data, evaluate its metric "
                                                "(default accuracy) on its test data"),
    task: str | None = typer.Option(None, help="built-in task when no --entry: digits (MLP on sklearn digits) "
                                               "or rotten-tomatoes (MiniLM-L6; fetch the data first with "
                                               "`gradsketch data fetch rotten-tomatoes`) [default: digits]"),
    kind: str = typer.Option("affd", help="sketch kind: dense, sjlt, fjl, ffd, affd, afjl, qk"),
    method: str = typer.Option("one-run", help="one-run (doubling search) or grid"),
    d_max: int = typer.Option(2048, help="largest subspace dimension"),
    d_start: int = typer.Option(DEFAULTS["d_start"], help="first d of the search / grid"),
    steps: int = typer.Option(DEFAULTS["steps"], help="one-run: total step budget; grid: steps per d"),
    lr: float = typer.Option(DEFAULTS["lr"], help="Adam learning rate on ω"),
    full_lr: float = typer.Option(DEFAULTS["full_lr"], help="learning rate of the full fine-tuning run"),
    full_steps: int | None = typer.Option(None, help="steps of full fine-tuning [default: steps]"),
    full_metric: float | None = typer.Option(None, help="full fine-tuning metric, if known (skips that run)"),
    eval_every: int = typer.Option(DEFAULTS["eval_every"], help="c: evaluate (and maybe double d) every c steps"),
    delta: float = typer.Option(DEFAULTS["delta"], help="δ: double d when the metric gains less than this per "
                                                        "evaluation"),
    plateau: str = typer.Option(DEFAULTS["plateau"], help="one-run plateau test: trend (upper confidence bound of "
                                                          "the stage's gain per evaluation < δ; robust to "
                                                          "evaluation noise) or step (last gain < δ)"),
    alpha: float = typer.Option(DEFAULTS["alpha"], help="trend test: probability of ending a stage that still "
                                                        "gains ≥ δ per evaluation, per test"),
    fraction: float = typer.Option(0.9, help="target fraction of the full metric"),
    said: bool = typer.Option(False, help="SAID: per-tensor trained scales λ"),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(1024, help="rotten-tomatoes: training examples"),
    seq: int = typer.Option(24, help="rotten-tomatoes: max tokens"),
    plot: str | None = typer.Option(None, help="write a PNG of metric vs d"),
    json_out: str | None = typer.Option(None, "--json", help="write the result table as JSON"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Print D_int (the smallest d reaching FRACTION × full fine-tuning's metric) and the table of stages.
    All options are checked before the model is loaded."""
    from ..intrinsic.pipeline import TASKS, IntrinsicConfig, run_intrinsic_dim

    names = ("task", "kind", "method", "d_max", "d_start", "steps", "lr", "full_lr", "full_steps", "full_metric",
             "eval_every", "delta", "plateau", "alpha", "fraction", "seed", "n_train", "seq")
    with usage_errors(names):
        if entry and task:
            raise ValueError(f"task: expected --task or --entry, not both, got --task {task!r} and --entry {entry!r}")
        if not entry and (task or "digits") not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        if n_train < 1 or seq < 2:
            raise ValueError(f"n_train, seq: expected n_train >= 1 and seq >= 2, got {n_train} and {seq}")
        cfg = IntrinsicConfig(kind=kind, method=method, d_max=d_max, d_start=d_start, steps=steps, lr=lr,
                              full_lr=full_lr, full_steps=full_steps, full_metric=full_metric, eval_every=eval_every,
                              delta=delta, plateau=plateau, alpha=alpha, fraction=fraction, said=said, seed=seed)
        res = run_intrinsic_dim(entry, cfg, task=None if entry else (task or "digits"), plot=plot,
                                json_out=json_out, progress=progress, n_train=n_train, seq=seq)
    typer.echo(str(res))
    typer.echo(res.to_markdown())
    for n in res.notes:
        typer.echo(f"note: {n}")
    if plot:
        typer.echo(f"plot: {plot}")
    if json_out:
        typer.echo(f"json: {json_out}")
