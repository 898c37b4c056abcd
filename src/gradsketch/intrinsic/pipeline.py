"""The ``gradsketch intrinsic-dim`` pipeline as a library call, on a built-in task or a user's Entry.

:class:`IntrinsicConfig` holds the options with the defaults of :func:`gradsketch.intrinsic.intrinsic_dimension`
(one set, shared by the API and the CLI: :data:`gradsketch.intrinsic.search.DEFAULTS`) and checks them when
built, before any model is loaded. :func:`run_intrinsic_dim` runs the search and writes the plot and JSON.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .._validation import check_bool, check_choice, check_int, check_real
from .plateau import PLATEAU_RULES
from .search import DEFAULTS, METHODS

__all__ = ["IntrinsicConfig", "run_intrinsic_dim", "TASKS"]

#: built-in tasks of ``--task``
TASKS = ("digits", "rotten-tomatoes")


@dataclass
class IntrinsicConfig:
    """Options of :func:`run_intrinsic_dim` (and of ``gradsketch intrinsic-dim``); defaults are those of
    :func:`gradsketch.intrinsic.intrinsic_dimension`.

    >>> IntrinsicConfig(method="bisect")
    Traceback (most recent call last):
    ...
    ValueError: method: expected one of ('one-run', 'grid'), got 'bisect'
    """

    kind: str = "affd"
    method: str = "one-run"
    d_max: int = 2048
    d_start: int = field(default_factory=lambda: DEFAULTS["d_start"])
    steps: int = field(default_factory=lambda: DEFAULTS["steps"])
    lr: float = field(default_factory=lambda: DEFAULTS["lr"])
    full_lr: float = field(default_factory=lambda: DEFAULTS["full_lr"])
    full_steps: int | None = None
    full_metric: float | None = None
    eval_every: int = field(default_factory=lambda: DEFAULTS["eval_every"])
    delta: float = field(default_factory=lambda: DEFAULTS["delta"])
    plateau: str = field(default_factory=lambda: DEFAULTS["plateau"])
    alpha: float = field(default_factory=lambda: DEFAULTS["alpha"])
    fraction: float = 0.9
    said: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        from ..sketch.kinds import KINDS

        check_choice(self.kind, "kind", tuple(sorted(KINDS)))
        check_choice(self.method, "method", METHODS)
        for name in ("d_max", "d_start", "steps", "eval_every"):
            check_int(getattr(self, name), name, minimum=1)
        if self.d_start > self.d_max:
            raise ValueError(f"d_start: expected d_start <= d_max={self.d_max}, got {self.d_start}")
        check_int(self.full_steps, "full_steps", minimum=1, allow_none=True)
        for name in ("lr", "full_lr", "delta"):
            check_real(getattr(self, name), name, minimum=0.0, min_inclusive=False)
        check_choice(self.plateau, "plateau", PLATEAU_RULES)
        check_real(self.alpha, "alpha", minimum=0.0, maximum=0.5, min_inclusive=False, max_inclusive=False)
        check_real(self.fraction, "fraction", minimum=0.0, maximum=1.0, min_inclusive=False)
        check_real(self.full_metric, "full_metric", allow_none=True)
        check_bool(self.said, "said")
        check_int(self.seed, "seed", minimum=0)


def _task(task: str, seed: int, n_train: int, seq: int) -> tuple[Any, Any, Any, Any, Any, str]:
    from ..datasets import digits_task, minilm_task

    if task == "digits":
        model_fn, train_data, eval_data = digits_task(seed=seed)
        return model_fn, train_data, eval_data, None, None, "built-in digits MLP 64-32-10"
    model_fn, train_data, eval_data = minilm_task(n_train=n_train, max_len=seq, seed=seed)
    return (model_fn, train_data, eval_data, (lambda name, p: "word_embeddings" not in name), None,
            f"built-in MiniLM-L6 on Rotten Tomatoes ({n_train} examples, {seq} tokens)")


def run_intrinsic_dim(entry: Any = None, config: IntrinsicConfig | None = None, task: str | None = None,
                      plot: str | None = None, json_out: str | None = None, progress: bool = True,
                      n_train: int = 1024, seq: int = 24) -> Any:
    """Estimate D_int on ``entry`` (an :class:`gradsketch.entry.Entry` or anything
    :func:`gradsketch.entry.load_entry` takes) or on the built-in ``task`` ("digits", "rotten-tomatoes").

    With an Entry, θ0 is a copy of ``entry.model`` taken at every run (the model itself is not changed), the
    training loss is the mean of ``entry.loss``, training data ``entry.train`` and evaluation data
    ``entry.test`` with ``entry.metric``. Writes the plot (PNG) and JSON asked for; returns the
    :class:`gradsketch.intrinsic.IntrinsicDimResult`.
    """
    from .search import intrinsic_dimension

    cfg = config if config is not None else IntrinsicConfig()
    if not isinstance(cfg, IntrinsicConfig):
        raise TypeError(f"config: expected an IntrinsicConfig, got {type(cfg).__name__}")
    if (entry is None) == (task is None):
        raise ValueError(f"entry, task: expected exactly one of them, got entry={entry!r}, task={task!r}")
    if entry is not None:
        from ..entry import load_entry

        ent = load_entry(entry)
        if ent.train is None or ent.test is None:
            raise ValueError("entry: intrinsic-dim needs Entry.train and Entry.test (evaluation data), got None")
        base = ent.model
        per_example = ent.loss_fn()

        def model_fn() -> Any:
            return copy.deepcopy(base)

        def loss_fn(model: Any, batch: Any) -> Any:
            return per_example(model, batch).mean()

        train_data, eval_data, params, name = ent.train, ent.test, None, ent.name
        metric = ent.metric
    else:
        if task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
        model_fn, train_data, eval_data, params, loss_fn, name = _task(task, cfg.seed, n_train, seq)
        metric = "accuracy"
    opts = asdict(cfg)
    res = intrinsic_dimension(model_fn, train_data, eval_data, metric, params=params, loss_fn=loss_fn,
                              progress=progress, **opts)
    res.notes.insert(0, f"model: {name}")
    from ..linalg.distributed import rank_and_world

    if rank_and_world()[0] != 0:  # under torchrun every rank ran the same search (data parallel); rank 0 writes
        plot = json_out = None
    if plot:
        res.plot(plot)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"estimate": res.estimate, "lower_bound": res.lower_bound, "full_metric": res.full_metric,
                       "threshold": res.threshold, "table": res.table, "confirm": res.confirm, "nan": res.nan,
                       "notes": res.notes, "model": name, **opts}, f, indent=1)
    return res
