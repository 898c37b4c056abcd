"""``gradsketch demo`` and ``gradsketch attribute``: training data attribution from the command line.

``demo`` runs :func:`gradsketch.demo.run_demo` (digits, planted label noise, HTML report).
``attribute`` runs the same pipeline on your model and data: ``--entry module:function`` names a function
returning ``(model, loss_fn, train_data, test_data)`` with ``loss_fn(model, batch) -> [B]`` per-example
losses and the data as lists (or DataLoaders) of batches. Options come from flags or a JSON/TOML
``--config`` file (its keys are the flag names with underscores; flags given explicitly win).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(help="Training data attribution with sketched gradients.", no_args_is_help=True)

_DEFAULTS = {"method": "trak", "kind": "affd", "d": 1024, "seed": 0, "mode": "explicit", "k": 10,
             "n_iters": 200, "top_k": 100, "damping": None, "store": None, "out": "gradsketch-attribution",
             "self_influence": True, "progress": True, "rank": None, "world_size": None}


@app.command("demo")
def demo(out: Path = typer.Option(Path("gradsketch-demo"), "--out", help="output directory"),
         n_train: int = typer.Option(1000, help="training images"),
         n_test: int = typer.Option(200, help="test images"),
         d: int = typer.Option(1024, help="sketch dimension"),
         kind: str = typer.Option("affd", help="sketch kind"),
         seed: int = typer.Option(0, help="seed for data split, label flips, model and sketch"),
         progress: bool = typer.Option(True, help="progress bars")) -> None:
    """Attribute a digits MLP trained with 10% flipped labels (Arnoldi influence + TRAK) and write an HTML
    report with proponents/opponents, the mislabel ROC curve and timings."""
    from .demo import run_demo

    run_demo(out, n_train=n_train, n_test=n_test, d=d, kind=kind, seed=seed, progress=progress)


def load_entry(entry: str) -> tuple[Any, Any, Any, Any]:
    """Call ``module:function`` (a file path ``path/to/file.py:function`` works too) and check it returns
    ``(model, loss_fn, train_data, test_data)``."""
    if ":" not in entry:
        raise typer.BadParameter(f"expected 'module:function', got {entry!r}", param_hint="--entry")
    mod_name, fn_name = entry.rsplit(":", 1)
    if mod_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        if spec is None or spec.loader is None:
            raise typer.BadParameter(f"cannot load {mod_name!r}", param_hint="--entry")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        sys.path.insert(0, str(Path.cwd()))
        mod = importlib.import_module(mod_name)
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise typer.BadParameter(f"{mod_name!r} has no callable {fn_name!r}", param_hint="--entry")
    out = fn()
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise typer.BadParameter(f"{entry} must return (model, loss_fn, train_data, test_data), got "
                                 f"{type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}",
                                 param_hint="--entry")
    return tuple(out)  # type: ignore[return-value]


def _read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    text = Path(path).read_text()
    if str(path).endswith(".toml"):
        import tomllib

        cfg = tomllib.loads(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise typer.BadParameter("expected a JSON/TOML table of options", param_hint="--config")
    cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - set(_DEFAULTS) - {"entry"})
    if unknown:
        raise typer.BadParameter(f"unknown keys {unknown}; expected some of {sorted(_DEFAULTS)}",
                                 param_hint="--config")
    return cfg


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Bad input found while fitting or scoring (a feature store that holds other rows, test batches the model
    cannot evaluate) as a one-line usage error (exit code 2), like the other bad flags, not a traceback."""
    from .attribution._features import DataMismatchError, StoreMismatchError

    try:
        yield
    except StoreMismatchError as e:
        raise typer.BadParameter(str(e), param_hint="--store/--out") from e
    except DataMismatchError as e:
        raise typer.BadParameter(str(e), param_hint="ENTRY") from e


def run_attribute(entry: str, **opts: Any) -> dict:
    """The ``attribute`` pipeline as a function: returns the summary it writes to ``summary.json``."""
    import numpy as np
    import torch

    from .attribution import Attributor
    from .model import Task
    from .report import table, write_page

    o = {**_DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    out = Path(o["out"])
    out.mkdir(parents=True, exist_ok=True)
    model, loss_fn, train_data, test_data = load_entry(entry)
    task = Task(model, loss_fn)
    method = o["method"]
    sketch = None if int(o["d"]) <= 0 else dict(kind=o["kind"], d=min(int(o["d"]), task.n_params), seed=o["seed"])
    extra: dict[str, Any] = {}
    if method == "arnoldi":
        extra = dict(n_iters=int(o["n_iters"]), top_k=int(o["top_k"]), seed=int(o["seed"]))
    if method in ("arnoldi", "influence") and o["damping"] is not None:
        extra["damping"] = float(o["damping"])
    store = Path(o["store"]) if o["store"] else out / "store"
    rank, world_size = o["rank"], o["world_size"]
    if (rank is None) != (world_size is None):
        raise typer.BadParameter(f"expected both --rank and --world-size or neither, got rank={rank!r}, "
                                 f"world_size={world_size!r}", param_hint="--rank/--world-size")
    if world_size is not None and (int(world_size) < 1 or not 0 <= int(rank) < int(world_size)):
        raise typer.BadParameter(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}",
                                 param_hint="--rank/--world-size")
    timings = {}
    t0 = time.perf_counter()
    att = Attributor(task, method, sketch=sketch, store=store, mode=o["mode"], **extra)
    if rank is not None:  # this process writes its share of the store; a later run without --rank finalises
        with _usage_errors():
            att.featurise(train_data, rank=int(rank), world_size=int(world_size), progress=o["progress"])
        timings["featurise"] = time.perf_counter() - t0
        return {"entry": entry, "method": method, "sketch": sketch, "store": str(store), "rank": int(rank),
                "world_size": int(world_size), "timings_s": timings}
    with _usage_errors():
        att.fit(train_data, progress=o["progress"])
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with _usage_errors():
        tk = att.topk(test_data, int(o["k"]), progress=o["progress"])
    timings["topk"] = time.perf_counter() - t0
    arrays = {k: v.numpy() for k, v in tk._asdict().items()}
    if o["self_influence"]:
        t0 = time.perf_counter()
        arrays["self_influence"] = att.self_influence(progress=o["progress"]).numpy()
        timings["self_influence"] = time.perf_counter() - t0
    np.savez(out / "attribution.npz", **arrays)
    summary = {"entry": entry, "method": method, "sketch": sketch, "store": str(store), "n_train": att.n_train_,
               "n_test": int(tk.indices.shape[0]), "k": int(tk.indices.shape[1]), "timings_s": timings,
               "results": str(out / "attribution.npz")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [[t, ", ".join(str(int(i)) for i in tk.indices[t]), ", ".join(str(int(i)) for i in tk.opponent_indices[t])]
            for t in range(min(20, tk.indices.shape[0]))]
    sections = [("Setup", table([[k, json.dumps(v)] for k, v in summary.items() if k != "timings_s"], ["", ""])),
                (f"Top-{summary['k']} proponents and opponents (first 20 test examples)",
                 table(rows, ["test", "proponents (train indices)", "opponents"])),
                ("Timing", table([[k, f"{v:.2f} s"] for k, v in timings.items()], ["step", "wall time"]))]
    if o["self_influence"]:
        si = torch.as_tensor(arrays["self_influence"])
        top = torch.topk(si, min(20, si.numel())).indices.tolist()
        sections.insert(2, ("Highest self-influence (candidates for mislabelled examples)",
                            table([[i, float(si[i])] for i in top], ["train index", "self-influence"])))
    path = write_page(out / "report.html", f"gradsketch attribute: {entry}", sections)
    summary["report"] = str(path)
    return summary


@app.command("attribute")
def attribute(entry: str | None = typer.Argument(None, help="module:function returning (model, loss_fn, "
                                                                "train_data, test_data)"),
              config: Path | None = typer.Option(None, help="JSON or TOML file with the options below"),
              method: str | None = typer.Option(None, help="trak, grad-dot, grad-cos, tracin, arnoldi, influence"),
              kind: str | None = typer.Option(None, help="sketch kind (affd, qk, sjlt, dense, ...)"),
              d: int | None = typer.Option(None, help="sketch dimension (0: exact gradients)"),
              seed: int | None = typer.Option(None, help="sketch / Arnoldi seed"),
              mode: str | None = typer.Option(None, help="explicit, implicit or factored"),
              k: int | None = typer.Option(None, help="proponents/opponents per test example"),
              n_iters: int | None = typer.Option(None, help="Arnoldi iterations"),
              top_k: int | None = typer.Option(None, help="Arnoldi eigenpairs kept"),
              damping: float | None = typer.Option(None, help="Arnoldi / influence damping"),
              store: str | None = typer.Option(None, help="feature store directory (default OUT/store)"),
              out: str | None = typer.Option(None, help="output directory"),
              progress: bool | None = typer.Option(None, help="progress bars"),
              rank: int | None = typer.Option(None, help="featurise only this process's share of the store "
                                                         "(with --world-size) and stop; a run without --rank "
                                                         "then finalises and scores"),
              world_size: int | None = typer.Option(None, help="number of processes sharing the store (with "
                                                               "--rank)")) -> None:
    """Attribute the test predictions of your model to its training examples; writes attribution.npz
    (top-k proponents/opponents, self-influence), summary.json and report.html to OUT.

    Several processes can build the feature store together: run ``--rank r --world-size w`` in each (r = 0..w-1,
    same --store), then once without --rank to finalise and score. The store under OUT/store (or --store) is
    reused by any method that featurises the same rows (e.g. grad-dot, grad-cos, tracin after trak without a
    margin); a store holding other rows is refused with a usage error naming what differs."""
    cfg = _read_config(config)
    entry = entry or cfg.pop("entry", None)
    cfg.pop("entry", None)
    if not entry:
        raise typer.BadParameter("expected module:function (argument or 'entry' in --config)", param_hint="ENTRY")
    flags = dict(method=method, kind=kind, d=d, seed=seed, mode=mode, k=k, n_iters=n_iters, top_k=top_k,
                 damping=damping, store=store, out=out, progress=progress, rank=rank, world_size=world_size)
    opts = {**cfg, **{key: v for key, v in flags.items() if v is not None}}
    summary = run_attribute(entry, **opts)
    if "rank" in summary:
        typer.echo(f"rank {summary['rank']}/{summary['world_size']}: featurised its share of the store at "
                   f"{Path(summary['store']).resolve()}; run without --rank to finalise and score")
        return
    typer.echo(f"report written to {Path(summary['report']).resolve()}")
