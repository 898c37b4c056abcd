"""The ``gradsketch spectrum`` pipeline as a library call: eigenpairs, diagnostics, JSON, plot and report.

:class:`SpectrumConfig` checks every option when built (before any model is loaded); :func:`run_spectrum`
runs the analysis on an :class:`gradsketch.entry.Entry` and writes what was asked for. The outputs are
written before the gradient alignment is computed, and an alignment that cannot be computed (e.g. a loss
that fails under autograd) is reported as such instead of losing the spectrum.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SpectrumConfig", "run_spectrum", "mean_loss_gradient"]


from .._validation import check_choice, check_int, check_real


@dataclass
class SpectrumConfig:
    """Options of :func:`run_spectrum` (and of ``gradsketch spectrum``, flags of the same names).

    Attributes:
        k: eigenpairs. operator: hessian, ggn or fisher. method: lanczos or arnoldi.
        which: LA (largest), SA (smallest), LM (largest magnitude) or BE (both ends: k − k//2 top, k//2 bottom).
        n_iters: Krylov dimension (``None``: max(3k, k + 60)); :func:`spectrum` takes it as ``n_iters`` (or its
            alias ``n_iter``).
        sampling: full, batch or stochastic curvature data (formerly ``mode``, which now only names the
            gradient mode of ``gradsketch attribute``).
        kind, d: the sketch (``d = 0``: exact, the default).
        seed, tol, threshold (outlier cut λ/λ₁), density_probes (0: no density), density_steps.

    >>> SpectrumConfig(kind="gaussian")
    Traceback (most recent call last):
    ...
    ValueError: kind: expected one of ('affd', 'afjl', 'dense', 'ffd', 'fjl', 'qk', 'sjlt'), got 'gaussian'
    """

    k: int = 10
    operator: str = "hessian"
    method: str = "lanczos"
    which: str = "LA"
    n_iters: int | None = None
    sampling: str = "full"
    kind: str = "affd"
    d: int = 0
    seed: int = 0
    tol: float | None = None
    threshold: float = 0.2
    density_probes: int = 0
    density_steps: int = 60

    def __post_init__(self) -> None:
        from ..sketch.kinds import KINDS
        from .core import METHODS, MODES, OPERATORS, WHICH

        check_int(self.k, "k", minimum=1)
        check_choice(self.operator, "operator", OPERATORS)
        check_choice(self.method, "method", METHODS)
        check_choice(self.which, "which", WHICH)
        check_int(self.n_iters, "n_iters", minimum=self.k, allow_none=True)
        check_choice(self.sampling, "sampling", MODES)
        check_choice(self.kind, "kind", tuple(sorted(KINDS)))
        check_int(self.d, "d", minimum=0)
        check_int(self.seed, "seed", minimum=0)
        check_real(self.tol, "tol", minimum=0.0, min_inclusive=False, allow_none=True)
        check_real(self.threshold, "threshold", minimum=0.0)
        check_int(self.density_probes, "density_probes", minimum=0)
        check_int(self.density_steps, "density_steps", minimum=1)


def mean_loss_gradient(task: Any, loss_fn: Any, batch: Any) -> Any:
    """``∇θ (1/B) Σ_i ℓ_i`` over one batch, flattened in the task's parameter order ``[N]``: one ordinary
    backward pass (no per-example gradients, so BatchNorm in train mode is fine; its running statistics
    are left untouched)."""
    import torch

    params = [p for _, p in task.named_params]
    freeze = getattr(task, "frozen_running_stats", None)
    with freeze() if callable(freeze) else contextlib.nullcontext():
        loss = loss_fn(task.model, batch).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]).detach()


def run_spectrum(entry: Any, config: SpectrumConfig | None = None, json_out: str | None = None,
                 plot: str | None = None, report: str | None = None, progress: bool = True,
                 command: str | None = None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute the spectrum of ``entry`` (an :class:`gradsketch.entry.Entry`; the curvature data is
    ``entry.train``) and write the JSON (+ ``.npz`` vectors), the eigenvalue plot and the HTML report asked for.

    Returns ``{"result": SpectrumResult, "density": DensityResult | None, "summary": dict}``; the summary holds
    the outliers, the negative ratio, the alignment (or why it is missing) and which gradient it used.
    """
    from ..entry import load_entry
    from .core import spectrum
    from .density import density

    cfg = config if config is not None else SpectrumConfig()
    if not isinstance(cfg, SpectrumConfig):
        raise TypeError(f"config: expected a SpectrumConfig, got {type(cfg).__name__}")
    ent = load_entry(entry)
    if ent.train is None:
        raise ValueError("entry: expected curvature data in Entry.train, got None")
    task = ent.task()
    data = ent.train
    notes: list[str] = []
    sk = None
    if cfg.d > 0:
        d = min(cfg.d, task.n_params)
        if d < cfg.d:
            notes.append(f"d = {cfg.d} is larger than the {task.n_params} parameters: used d = {d}")
        sk = task.block_sketch(d, cfg.kind, seed=cfg.seed)
    res = spectrum(task, data, k=cfg.k, sketch=sk, operator=cfg.operator, method=cfg.method, which=cfg.which,
                   n_iters=cfg.n_iters, sampling=cfg.sampling, seed=cfg.seed, tol=cfg.tol, progress=progress)
    dens = (density(task, data, operator=cfg.operator, n_probes=cfg.density_probes, n_steps=cfg.density_steps,
                    sketch=sk, sampling=cfg.sampling, seed=cfg.seed, progress=progress)
            if cfg.density_probes > 0 else None)
    summary: dict[str, Any] = {"n_params": task.n_params, "n_hvp": res.n_hvp,
                               "sketch": None if sk is None else f"{cfg.kind} d={sk.d}", "notes": notes}
    try:
        n_out = len(res.outliers(cfg.threshold))
        summary["outliers"] = n_out
        summary["outliers_note"] = "all computed: at least this many" if n_out == res.k else ""
    except ValueError as e:
        summary["outliers"] = None
        summary["outliers_note"] = str(e)
    try:
        summary["negative_ratio"] = res.negative_ratio
    except ValueError as e:
        summary["negative_ratio"] = float("nan")
        notes.append(str(e))
    first = next(iter(data))
    n_first = _batch_size(first)
    grads_label = (f"gradient of the mean loss over the first training batch ({n_first} examples), "
                   "one ordinary backward pass at the analysed parameters")
    summary["alignment_gradient"] = grads_label
    g = None
    try:
        g = mean_loss_gradient(task, ent.loss_fn(), first)
        summary["alignment"] = float(res.alignment(g, reduce="total"))
    except (RuntimeError, ValueError, TypeError) as e:
        summary["alignment"] = None
        notes.append(f"alignment not computed: {e}")
        g = None
    prov = {"entry": ent.name, "curvature data": f"{_count(data)} examples in {_nbatches(data)} batches",
            "dtype": str(task.dtype).replace("torch.", ""), "command": command or "(Python call)",
            **(provenance or {})}
    summary["provenance"] = prov
    if json_out:
        res.info["cli_summary"] = {k: v for k, v in summary.items() if k != "provenance"}
        res.info["provenance"] = prov
        summary["json"] = res.save(json_out)[0]
    if plot:
        from ..report.plots import plot_eigenvalues

        plot_eigenvalues(res, plot, threshold=cfg.threshold)
        summary["plot"] = plot
    if report:
        from ..report.spectrum import write_report

        summary["report"] = write_report(report, spectrum=res, density=dens, grads=g, threshold=cfg.threshold,
                                         provenance={**prov, "options": _opts(cfg)}, grads_label=grads_label,
                                         notes=notes or None)
    return {"result": res, "density": dens, "summary": summary}


def _opts(cfg: SpectrumConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(cfg).items())


def _batch_size(batch: Any) -> int:
    from collections.abc import Mapping

    first = next(iter(batch.values())) if isinstance(batch, Mapping) else (
        batch[0] if isinstance(batch, (tuple, list)) else batch)
    return int(first.shape[0]) if hasattr(first, "shape") and len(first.shape) else 1


def _count(data: Any) -> int:
    return sum(_batch_size(b) for b in data)


def _nbatches(data: Any) -> int:
    return sum(1 for _ in data)
