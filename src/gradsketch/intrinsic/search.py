"""Estimate the intrinsic dimension D_int90 of a task: the smallest subspace dimension d reaching 90% of
full fine-tuning's metric (Li et al. 2018, arXiv 1804.08838).

``method="grid"``: the classic sweep, one subspace run per d on a log2 grid.
``method="one-run"``: Schioppa 2024 (arXiv 2402.03994, §5): train once in a D_max subspace with all but the
first d coordinates of ω masked (value and gradient); every c steps, if the metric has stopped improving by
δ per evaluation and the target τ = fraction·(full metric) is not reached, double d. The d at which τ is
reached, D*, is within 2× of D_int; a confirming run at D*/2 should not reach τ. "Stopped improving" is
decided by the noise-robust trend test of :mod:`gradsketch.intrinsic.plateau` (default ``plateau="trend"``)
or by the literal one-step comparison ``m_k − m_{k−1} < δ`` (``plateau="step"``, which fires on
evaluation noise: see that module).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from .._validation import check_real
from ..sketch.kinds import KINDS
from .plateau import MAX_WINDOW, MIN_WINDOW, binomial_noise, check_plateau_options, trend_test
from .subspace import SubspaceModel, _select
from .train import History, train

METHODS = ("one-run", "grid")

#: The one set of defaults of the search, shared by :func:`intrinsic_dimension`, :class:`IntrinsicConfig`
#: and ``gradsketch intrinsic-dim`` (measured on the digits MLP; see benchmarks/results/intrinsic.md).
DEFAULTS: dict[str, Any] = {"steps": 2000, "lr": 0.05, "full_lr": 1e-2, "eval_every": 25, "delta": 5e-3,
                            "d_start": 8, "plateau": "trend", "alpha": 0.05}


# -- metrics ---------------------------------------------------------------------------------------
def _logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    lg = getattr(out, "logits", None)
    if lg is None and isinstance(out, Mapping):
        lg = out.get("logits")
    if lg is None:
        raise TypeError(f"metric: cannot find logits in a model output of type {type(out).__name__}")
    return lg


def accuracy(model: nn.Module, eval_data: Any, batch_size: int = 512) -> float:
    """Fraction of argmax(logits) == label. ``eval_data``: ``(x [m, ...], y [m])`` (evaluated in slices of
    ``batch_size`` rows) or an iterable of batches ``(x, y)`` / dicts with a ``labels`` entry (the other
    entries are passed to the model as kwargs). Model outputs may be logits or carry ``.logits`` /
    ``["logits"]`` (Hugging Face).

    >>> import torch
    >>> x = torch.eye(3).repeat(400, 1); y = torch.arange(3).repeat(400)
    >>> accuracy(torch.nn.Identity(), (x, y))
    1.0
    """
    correct, total = 0, 0
    if isinstance(eval_data, tuple) and len(eval_data) == 2 and isinstance(eval_data[0], Tensor):
        xs, ys = eval_data
        if not isinstance(ys, Tensor) or ys.shape[0] != xs.shape[0]:
            raise ValueError(f"eval_data: expected (x [m, ...], y [m]) with equal first dimensions, got "
                             f"{tuple(xs.shape)} and {tuple(getattr(ys, 'shape', ()))}")
        batches: Any = [(xs[i:i + batch_size], ys[i:i + batch_size]) for i in range(0, xs.shape[0], batch_size)]
    else:
        batches = eval_data
    for b in batches:
        if isinstance(b, Mapping):
            yb = b["labels"]
            pred = _logits(model(**{k: v for k, v in b.items() if k != "labels"})).argmax(-1)
        else:
            xb, yb = b
            pred = _logits(model(xb)).argmax(-1)
        correct += int((pred == yb).sum())
        total += int(yb.numel())
    if total == 0:
        raise ValueError("eval_data: expected at least one example, got none")
    return correct / total


METRICS: dict[str, Callable[[nn.Module, Any], float]] = {"accuracy": accuracy}


# -- result ----------------------------------------------------------------------------------------
@dataclass
class IntrinsicDimResult:
    """Outcome of :func:`intrinsic_dimension`.

    table : one row per subspace dimension tried: ``d``, ``n_trainable``, ``metric`` (best at that d),
        ``steps`` (spent at that d), ``reached`` (metric ≥ threshold).
    estimate : D_int (int) or None when the threshold was never reached (then D_int > ``lower_bound``).
    """

    method: str
    kind: str
    fraction: float
    full_metric: float
    threshold: float
    d_max: int
    table: list[dict[str, Any]] = field(default_factory=list)
    estimate: int | None = None
    lower_bound: int | None = None
    confirm: dict[str, Any] | None = None
    nan: str | None = None
    said: bool = False
    plateau: str = "trend"
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return self.estimate is not None

    @property
    def d_int90(self) -> int | None:
        return self.estimate

    @property
    def estimate_str(self) -> str:
        if self.estimate is not None:
            return str(self.estimate)
        return f"> {self.lower_bound}"

    def __str__(self) -> str:
        pct = int(round(100 * self.fraction))
        s = (f"D_int{pct} ({self.method}, {self.kind}{', SAID' if self.said else ''}): {self.estimate_str}  "
             f"[full metric {self.full_metric:.4g}, threshold {self.threshold:.4g}]")
        if self.confirm is not None:
            s += (f"; confirm at d={self.confirm['d']}: metric {self.confirm['metric']:.4g} "
                  f"({'reached' if self.confirm['reached'] else 'not reached'})")
        if self.nan:
            s += f"; stopped: {self.nan}"
        return s

    def to_markdown(self) -> str:
        lines = ["| d | trainable | metric | steps | ≥ threshold |", "|---:|---:|---:|---:|:---:|"]
        for r in self.table:
            lines.append(f"| {r['d']} | {r['n_trainable']} | {r['metric']:.4f} | {r['steps']} | "
                         f"{'yes' if r['reached'] else 'no'} |")
        return "\n".join(lines)

    def plot(self, path: str | None = None, title: str | None = None) -> Any:
        """Metric vs d (log2 axis): the search curve, the confirming run, the threshold and full fine-tuning
        lines and D_int on the deciding point (:func:`gradsketch.report.plots.plot_intrinsic`). Writes a PNG
        when ``path`` is given and returns ``path`` (or the Figure when it is None)."""
        from ..report.plots import plot_intrinsic

        fig = plot_intrinsic(self, path, title=title)
        return path if path is not None else fig


# -- search ----------------------------------------------------------------------------------------
def _pow2_grid(lo: int, hi: int) -> list[int]:
    out, d = [], lo
    while d < hi:
        out.append(d)
        d *= 2
    out.append(hi)
    return out


def _eval_size(eval_data: Any) -> int:
    """Number of evaluation examples: ``len(y)`` of ``(x, y)``, or the labels counted over the batches."""
    if isinstance(eval_data, tuple) and len(eval_data) == 2 and isinstance(eval_data[1], Tensor):
        return int(eval_data[1].shape[0])
    total = 0
    try:
        for b in eval_data:
            y = b["labels"] if isinstance(b, Mapping) else b[1]
            total += int(y.shape[0])
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError("noise: 'binomial' needs the number of evaluation examples, which could not be counted "
                         f"from eval_data ({e!r}); pass noise as a number instead") from e
    if total < 1:
        raise ValueError("eval_data: expected at least one evaluation example, got none")
    return total


def _check_pos_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    return v


def full_finetune_metric(model_fn: Callable[[], nn.Module], train_data: Any, eval_fn: Callable[[nn.Module], float],
                         **train_kwargs: Any) -> tuple[float, History]:
    """Train ``model_fn()`` with all its parameters and return (best metric, history)."""
    model = model_fn()
    for p in model.parameters():
        p.requires_grad_(True)
    hist = train(model, train_data, eval_fn, desc="full fine-tuning", **train_kwargs)
    if hist.nan_step is not None:
        raise FloatingPointError(f"full fine-tuning: {hist.stopped}; lower full_lr or pass full_metric")
    return hist.best_metric, hist


def intrinsic_dimension(model_fn: Callable[[], nn.Module], train_data: Any, eval_data: Any,
                        metric: str | Callable[[nn.Module, Any], float] = "accuracy", *, d_max: int,
                        kind: str = "affd", method: str = "one-run", fraction: float = 0.9,
                        full_metric: float | None = None, steps: int = DEFAULTS["steps"],
                        lr: float = DEFAULTS["lr"], full_steps: int | None = None,
                        full_lr: float = DEFAULTS["full_lr"], eval_every: int = DEFAULTS["eval_every"],
                        delta: float = DEFAULTS["delta"], d_start: int = DEFAULTS["d_start"],
                        plateau: str = DEFAULTS["plateau"], alpha: float = DEFAULTS["alpha"],
                        noise: float | str | None = None, min_window: int = MIN_WINDOW,
                        max_window: int = MAX_WINDOW, grid: Sequence[int] | None = None,
                        batch_size: int | None = None, loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
                        optimizer: Any = "adam", said: bool = False, params: Any = None, confirm: bool = True,
                        confirm_steps: int | None = None, stop_at_threshold: bool = False, seed: int = 0,
                        progress: bool = True, **sketch_options: Any) -> IntrinsicDimResult:
    """Estimate D_int (the smallest d with metric ≥ ``fraction``·full metric).

    model_fn : ``() -> nn.Module`` returning the model at θ0, identically on every call (e.g. a pretrained
        checkpoint plus a head initialised from a fixed seed).
    train_data : as in :func:`train` (tuple of tensors with ``batch_size``, or an iterable of batches).
    eval_data, metric : ``metric(model, eval_data) -> float`` (higher is better) or ``"accuracy"``.
    d_max : the largest subspace (one-run: the size of ω); kinds other than dense/sjlt need d_max ≤ n.
    full_metric : full fine-tuning's metric if known; otherwise measured by ``full_steps`` (default ``steps``)
        steps of full training at ``full_lr``. The threshold is τ = fraction·full_metric.
    steps : one-run: total step budget of the search; grid: steps per d.
    eval_every (c), delta (δ), d_start : the one-run schedule (d starts at ``d_start`` and doubles).
    plateau : one-run: when a stage has plateaued. ``"trend"`` (default): the upper (1−``alpha``) confidence
        bound of the stage's gain per evaluation, a least-squares slope over its last ``max_window``
        evaluations (tested once it has ``min_window``), is below δ; a stage still gaining ≥ δ per
        evaluation is ended by one test with probability ≤ ``alpha`` (:mod:`gradsketch.intrinsic.plateau`).
        ``"step"``: the last evaluation improved on the previous one by less than δ (fires on noise).
    noise : the trend test's σ of one evaluation: None (measured from the window's residuals, t-test),
        a number, or ``"binomial"`` (√(p(1−p)/n) with n the number of evaluation examples, counted from
        ``eval_data``; for accuracy-like metrics).
    grid : dimensions for ``method="grid"`` (default powers of 2 from ``d_start`` to ``d_max``).
    confirm : one-run only; train a fresh subspace of d = D*/2 for ``confirm_steps`` (default: the steps
        the search itself took to reach τ at D*, so the half-size run gets the same budget).
    stop_at_threshold : end each run as soon as τ is reached (faster; the grid curve is then truncated).
    Returns an :class:`IntrinsicDimResult`; when τ is never reached, ``estimate`` is None and the report
    reads D_int > d_max (or > the last d tried). A non-finite loss stops the run concerned; the result
    keeps what was measured and says so in ``nan``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    if not callable(model_fn):
        raise TypeError(f"model_fn: expected a callable returning an nn.Module, got {type(model_fn).__name__}")
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {sorted(METRICS)} or a callable(model, eval_data), "
                             f"got {metric!r}")
        metric_fn = METRICS[metric]
    elif callable(metric):
        metric_fn = metric
    else:
        raise TypeError(f"metric: expected a name or a callable(model, eval_data) -> float, "
                        f"got {type(metric).__name__}")
    d_max = _check_pos_int("d_max", d_max)
    d_start = _check_pos_int("d_start", d_start)
    eval_every = _check_pos_int("eval_every", eval_every)
    steps = _check_pos_int("steps", steps)
    if d_start > d_max:
        raise ValueError(f"d_start: expected d_start <= d_max={d_max}, got {d_start}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    check_plateau_options(plateau, alpha, noise, min_window, max_window)
    if method == "one-run":
        check_real(delta, "delta", minimum=0.0, min_inclusive=False)
    n_eval = _eval_size(eval_data) if noise == "binomial" else None

    def eval_fn(m: nn.Module) -> float:
        return float(metric_fn(m, eval_data))

    # Validate d_max against the model before any training (clear error for d > n).
    probe = model_fn()
    if not isinstance(probe, nn.Module):
        raise TypeError(f"model_fn: expected it to return an nn.Module, got {type(probe).__name__}")
    named = dict(probe.named_parameters())
    n = sum(named[k].numel() for k in _select(probe, params))
    if d_max > n and not KINDS[kind].allows_d_greater_than_n:
        raise ValueError(f"d_max: kind {kind!r} needs d <= n={n} (selected parameters), got d_max={d_max}; "
                         "lower d_max or use kind 'dense'/'sjlt'")
    del probe, named

    common = dict(lr=lr, optimizer=optimizer, loss_fn=loss_fn, batch_size=batch_size, seed=seed, progress=progress)
    if full_metric is None:
        full_metric, _ = full_finetune_metric(model_fn, train_data, eval_fn, steps=full_steps or steps,
                                              eval_every=eval_every, **{**common, "lr": full_lr})
    full_metric = float(full_metric)
    if not math.isfinite(full_metric):
        raise ValueError(f"full_metric: expected a finite number, got {full_metric!r}")
    tau = fraction * full_metric
    res = IntrinsicDimResult(method=method, kind=kind, fraction=fraction, full_metric=full_metric, threshold=tau,
                             d_max=d_max, said=said, plateau=plateau)

    def make(d: int) -> SubspaceModel:
        return SubspaceModel(model_fn(), d, kind=kind, seed=seed, said=said, params=params, **sketch_options)

    def stopper(step: int, rec: dict[str, Any], model: nn.Module) -> bool:
        return stop_at_threshold and rec["metric"] is not None and rec["metric"] >= tau

    if method == "grid":
        dims = sorted(set(int(g) for g in grid)) if grid is not None else _pow2_grid(d_start, d_max)
        if any(g < 1 or g > d_max for g in dims):
            raise ValueError(f"grid: expected dimensions in [1, d_max={d_max}], got {dims}")
        for d in tqdm(dims, desc="grid", disable=not progress, leave=False):
            sm = make(d)
            hist = train(sm, train_data, eval_fn, steps=steps, eval_every=eval_every, callback=stopper,
                         desc=f"d={d}", **common)
            best = hist.best_metric
            res.table.append({"d": d, "n_trainable": sm.n_trainable, "metric": best, "steps": hist.steps,
                              "reached": bool(best >= tau)})
            res.history.extend({**r, "d": d} for r in hist.records)
            if hist.nan_step is not None:
                res.nan = (res.nan + "; " if res.nan else "") + f"d={d}: {hist.stopped}"
        hits = [r["d"] for r in res.table if r["reached"]]
        res.estimate = min(hits) if hits else None
        res.lower_bound = None if hits else max(r["d"] for r in res.table)
        if res.nan:
            warnings.warn(f"intrinsic_dimension: {res.nan}", RuntimeWarning, stacklevel=2)
        return res

    # one-run doubling search
    if plateau == "trend":
        res.notes.append(f"plateau test: trend (upper {1 - alpha:.0%} bound of the gain per evaluation over the last "
                         f"{min_window}-{max_window} evaluations of a stage < δ={delta:g}; noise "
                         f"{'measured' if noise is None else noise})")
    else:
        res.notes.append(f"plateau test: step (last gain < δ={delta:g})")
    sm = make(d_max)
    state: dict[str, Any] = {"d": d_start, "prev": None, "stage_start": 0, "best": -math.inf, "done": None,
                             "stage": []}
    sm.set_active_dim(d_start)

    def plateaued(m: float, prev: float) -> tuple[bool, dict[str, Any]]:
        if plateau == "step":
            return m - prev < delta, {}
        stage = state["stage"]
        sigma: float | None
        if noise == "binomial":
            assert n_eval is not None
            window = stage[-max_window:]
            sigma = binomial_noise(min(1.0, max(0.0, sum(window) / len(window))), n_eval)
        else:
            sigma = noise  # type: ignore[assignment]
        t = trend_test(stage, delta, alpha=alpha, noise=sigma, min_window=min_window, max_window=max_window)
        if t is None:
            return False, {}
        return t.plateau, {"slope": t.slope, "upper": t.upper, "window": t.window}

    def close_stage(step: int) -> None:
        best = state["best"]
        res.table.append({"d": state["d"], "n_trainable": sm.n_trainable, "metric": best,
                          "steps": step - state["stage_start"], "reached": bool(best >= tau)})

    def on_eval(step: int, rec: dict[str, Any], model: nn.Module) -> bool:
        m = rec["metric"]
        entry = {**rec, "d": state["d"]}
        res.history.append(entry)
        state["best"] = max(state["best"], m)
        state["stage"].append(m)
        prev = state["prev"]
        state["prev"] = m
        if m >= tau:
            state["done"] = "reached"
            close_stage(step)
            return True
        if prev is None:  # the evaluation at step 0
            return False
        flat, info = plateaued(m, prev)
        entry.update(info)
        if flat:
            if state["d"] >= d_max:
                state["done"] = "plateau at d_max"
                close_stage(step)
                return True
            close_stage(step)
            state["d"] = min(2 * state["d"], d_max)
            state["stage_start"], state["best"], state["stage"] = step, m, [m]
            sm.set_active_dim(state["d"])
            # reset the optimizer's memory of the newly opened coordinates: they are zero and were masked,
            # so their Adam moments are already zero; nothing else to do.
        return False

    hist = train(sm, train_data, eval_fn, steps=steps, eval_every=eval_every, callback=on_eval,
                 desc="one-run search", **common)
    if state["done"] is None:
        if hist.steps == state["stage_start"] and res.table:  # d was doubled at the last evaluation: untrained
            state["d"] = res.table[-1]["d"]
        else:
            close_stage(hist.steps)
        if hist.nan_step is not None:
            res.nan = f"d={state['d']}: {hist.stopped}"
            res.notes.append("the search stopped on a non-finite loss; the table holds the stages before it")
            warnings.warn(f"intrinsic_dimension: {res.nan}", RuntimeWarning, stacklevel=2)
        else:
            res.notes.append(f"step budget ({steps}) exhausted at d={state['d']} without reaching the threshold")
    if state["done"] == "reached":
        res.estimate = state["d"]
    else:
        res.lower_bound = state["d"]
        if state["d"] >= d_max:
            res.notes.append(f"threshold {tau:.4g} not reached by d_max={d_max}: D_int > {d_max}")
    if confirm and res.estimate is not None and res.estimate >= 2:
        dc = res.estimate // 2
        smc = make(dc)
        hc = train(smc, train_data, eval_fn, steps=confirm_steps or max(1, hist.steps), eval_every=eval_every,
                   callback=lambda s, r, m: r["metric"] >= tau, desc=f"confirm d={dc}", **common)
        best = hc.best_metric
        res.confirm = {"d": dc, "metric": best, "reached": bool(best >= tau), "steps": hc.steps}
        if best >= tau:
            res.notes.append(f"the confirming run at d={dc} also reached the threshold: D_int <= {dc}")
            res.estimate = dc
    return res
