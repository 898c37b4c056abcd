"""``gradsketch intrinsic-dim``: estimate the intrinsic dimension of a built-in task (typer sub-app).

The lead wires ``app`` into the ``gradsketch`` CLI (e.g. ``main.add_typer(cli_intrinsic.app)`` or by
registering ``intrinsic_dim`` as a command).
"""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Intrinsic dimension of fine-tuning (random-subspace training).", no_args_is_help=True)

TASKS = ("digits", "rotten-tomatoes")


@app.command("intrinsic-dim")
def intrinsic_dim(
    task: str = typer.Option("digits", help="digits (MLP on sklearn digits) or rotten-tomatoes (MiniLM-L6)"),
    kind: str = typer.Option("affd", help="sketch kind: dense, sjlt, fjl, ffd, affd, afjl, qk"),
    method: str = typer.Option("one-run", help="one-run (doubling search) or grid"),
    d_max: int = typer.Option(2048, help="largest subspace dimension"),
    d_start: int = typer.Option(8, help="first d of the search / grid"),
    steps: int = typer.Option(300, help="one-run: total step budget; grid: steps per d"),
    lr: float = typer.Option(0.05, help="Adam learning rate on ω"),
    full_lr: float = typer.Option(1e-2, help="learning rate of the full fine-tuning run"),
    full_steps: int | None = typer.Option(None, help="steps of full fine-tuning (default: steps)"),
    full_metric: float | None = typer.Option(None, help="full fine-tuning metric, if known (skips that run)"),
    eval_every: int = typer.Option(25, help="c: evaluate (and maybe double d) every c steps"),
    delta: float = typer.Option(0.005, help="δ: double d when the metric improved by less than this"),
    fraction: float = typer.Option(0.9, help="target fraction of the full metric"),
    said: bool = typer.Option(False, help="SAID: per-tensor trained scales λ"),
    seed: int = typer.Option(0),
    n_train: int = typer.Option(1024, help="rotten-tomatoes: training examples"),
    seq: int = typer.Option(24, help="rotten-tomatoes: max tokens"),
    plot: str | None = typer.Option(None, help="write a PNG of metric vs d"),
    json_out: str | None = typer.Option(None, "--json", help="write the result table as JSON"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Print D_int (the smallest d reaching FRACTION × full fine-tuning's metric) and the table of stages."""
    from .intrinsic import intrinsic_dimension
    from .intrinsic.tasks import digits_task, minilm_task

    if task not in TASKS:
        raise typer.BadParameter(f"expected one of {TASKS}, got {task!r}", param_hint="--task")
    if task == "digits":
        model_fn, train_data, eval_data = digits_task(seed=seed)
        params = None
    else:
        model_fn, train_data, eval_data = minilm_task(n_train=n_train, max_len=seq, seed=seed)
        params = lambda name, p: "word_embeddings" not in name  # noqa: E731
    try:
        res = intrinsic_dimension(model_fn, train_data, eval_data, "accuracy", d_max=d_max, kind=kind, method=method,
                                  fraction=fraction, full_metric=full_metric, steps=steps, lr=lr,
                                  full_steps=full_steps, full_lr=full_lr, eval_every=eval_every, delta=delta,
                                  d_start=d_start, said=said, params=params, seed=seed, progress=progress)
    except (ValueError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(str(res))
    typer.echo(res.to_markdown())
    for n in res.notes:
        typer.echo(f"note: {n}")
    if plot:
        res.plot(plot)
        typer.echo(f"plot: {plot}")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"estimate": res.estimate, "lower_bound": res.lower_bound, "full_metric": res.full_metric,
                       "threshold": res.threshold, "table": res.table, "confirm": res.confirm, "nan": res.nan,
                       "notes": res.notes, "kind": kind, "method": method}, f, indent=1)


@app.callback()
def _main() -> None:
    """Intrinsic dimension commands."""
