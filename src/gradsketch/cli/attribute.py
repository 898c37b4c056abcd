"""``gradsketch demo`` and ``gradsketch attribute``: parse the options, call the library."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import command_line, usage_errors

ENTRY_HELP = ("module:function (or path/file.py:function) returning a gradsketch.Entry(model, loss, train, test) "
              "or the tuple (model, loss, train, test)")


def demo(out: Path = typer.Option(Path("gradsketch-demo"), "--out", help="output directory"),
         n_train: int = typer.Option(1000, min=20, help="training images"),
         n_test: int = typer.Option(200, min=1, help="test images"),
         d: int = typer.Option(1024, min=1, help="sketch dimension"),
         kind: str = typer.Option("affd", help="sketch kind"),
         seed: int = typer.Option(0, min=0, help="seed for data split, label flips, model and sketch"),
         progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bars")) -> None:
    """Attribute a digits MLP trained with 10% flipped labels (Arnoldi influence + TRAK) and write an HTML
    report with proponents/opponents, the mislabel ROC curve and timings."""
    from ..demo import run_demo
    from ..sketch.kinds import KINDS

    with usage_errors(("kind", "n_train", "n_test", "d", "seed")):
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}")
        if n_train + n_test > 1797:
            raise ValueError(f"n_train, n_test: expected n_train + n_test <= 1797 (the digits set), got "
                             f"{n_train} + {n_test}")
        run_demo(out, n_train=n_train, n_test=n_test, d=d, kind=kind, seed=seed, progress=progress)


def attribute(entry: str | None = typer.Argument(None, help=ENTRY_HELP),
              entry_opt: str | None = typer.Option(None, "--entry", help="the same as the ENTRY argument"),
              config: Path | None = typer.Option(None, help="JSON or TOML file with the options below"),
              method: str | None = typer.Option(None, help="trak, grad-dot, grad-cos, tracin, arnoldi, influence "
                                                           "[default: trak]"),
              kind: str | None = typer.Option(None, help="sketch kind (affd, afjl, qk, sjlt, fjl, ffd, dense) "
                                                         "[default: affd]"),
              d: int | None = typer.Option(None, "--d", "--sketch-dim",
                                           help="sketch dimension, 0 for exact gradients [default: 1024]; "
                                                "--sketch-dim under torchrun, whose parser takes --d"),
              seed: int | None = typer.Option(None, help="sketch / Arnoldi seed [default: 0]"),
              mode: str | None = typer.Option(None, help="auto, explicit, implicit or factored [default: auto]"),
              k: int | None = typer.Option(None, help="proponents/opponents per test example [default: 10]"),
              n_iters: int | None = typer.Option(None, help="Arnoldi Krylov dimension [default: 1.5·top_k, up to "
                                                           "the block]"),
              top_k: int | None = typer.Option(None, help="Arnoldi eigenpairs kept [default: 40 with the tail, "
                                               "100 without]"),
              damping: float | None = typer.Option(None, help="influence / Arnoldi damping δ in (|K| + δI)^-1 "
                                                   "(>= 0) [default: 3e-3]"),
              kernel: str | None = typer.Option(None, help="TRAK's kernel: auto (ggn_trace when the task declares "
                                                           "its outputs, Task.from_classifier; else features), "
                                                           "features (ΦᵀΦ, as published), ggn (the Gauss-Newton "
                                                           "matrix of the training loss; C - 1 more passes over "
                                                           "the data for C classes) or ggn_trace (ΦᵀΦ with rows "
                                                           "weighted by their Gauss-Newton curvature; one forward "
                                                           "pass more) [default: auto]"),
              store: str | None = typer.Option(None, help="feature store directory [default: OUT/store]"),
              out: str | None = typer.Option(None, help="output directory [default: gradsketch-attribution]"),
              self_influence: bool | None = typer.Option(None, "--self-influence/--no-self-influence",
                                                         help="also score every training example against itself"),
              progress: bool | None = typer.Option(None, "--progress/--no-progress", help="progress bars"),
              rank: int | None = typer.Option(None, help="featurise only this process's share of the store "
                                                         "(with --world-size) and stop; a run without --rank "
                                                         "then finalises and scores"),
              world_size: int | None = typer.Option(None, help="number of processes sharing the store (with "
                                                               "--rank)"),
              on_data_change: str | None = typer.Option(None, help="raise or refeaturise: what to do with store "
                                                                   "chunks computed from other examples (relabelled, "
                                                                   "replaced) [default: raise]")) -> None:
    """Attribute the test predictions of your model to its training examples; writes attribution.npz
    (top-k proponents/opponents, self-influence), summary.json and report.html to OUT.

    All options are checked before the model is loaded. Several processes can build the feature store
    together: run ``--rank r --world-size w`` in each (same --store), then once without --rank to finalise
    and score. A store holding other rows is refused with a usage error naming what differs."""
    from ..attribution.pipeline import AttributeConfig, read_config, run_attribute
    from ..entry import load_entry

    keys = AttributeConfig.keys()
    with usage_errors((*keys, "config", "out", "progress")):
        cfg = read_config(config) if config is not None else {}
        spec = entry or entry_opt or cfg.pop("entry", None)
        cfg.pop("entry", None)
        if entry and entry_opt and entry != entry_opt:
            raise ValueError(f"entry: expected one entry point, got {entry!r} and --entry {entry_opt!r}")
        if not spec:
            raise ValueError("entry: expected module:function (argument, --entry or 'entry' in --config), got none")
        flags = dict(method=method, kind=kind, d=d, seed=seed, mode=mode, k=k, n_iters=n_iters, top_k=top_k,
                     damping=damping, kernel=kernel, store=store, self_influence=self_influence, rank=rank,
                     world_size=world_size, on_data_change=on_data_change)
        opts = {**cfg, **{key: v for key, v in flags.items() if v is not None}}
        out_dir = opts.pop("out", None)
        out_dir = out if out is not None else (out_dir or "gradsketch-attribution")
        show = opts.pop("progress", True) if progress is None else progress
        conf = AttributeConfig(**opts)  # every option checked here, before the model is loaded
        ent = load_entry(spec)
        summary = run_attribute(ent, conf, out=out_dir, progress=bool(show), command=command_line())
    if "rank" in summary:
        typer.echo(f"rank {summary['rank']}/{summary['world_size']}: featurised its share of the store at "
                   f"{Path(summary['store']).resolve()}; run without --rank to finalise and score")
        return
    typer.echo(f"gradients: mode={summary.get('mode')} ({summary.get('mode_reason')})")
    for note in summary.get("notes", []):
        typer.echo(f"note: {note}")
    typer.echo(f"report written to {Path(summary['report']).resolve()}")
