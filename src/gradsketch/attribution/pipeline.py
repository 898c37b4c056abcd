"""The ``gradsketch attribute`` pipeline as a library call: options checked first, then fit, top-k,
self-influence, ``attribution.npz``, ``summary.json`` and an HTML report.

:class:`AttributeConfig` holds every option with its default and validates types and ranges when it is
built, so a bad option is refused before any model is loaded. :func:`run_attribute` runs the pipeline on an
:class:`gradsketch.entry.Entry`. :func:`read_config` reads a JSON/TOML options file strictly.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["AttributeConfig", "read_config", "run_attribute"]


from .._validation import check_bool, check_choice, check_int, check_real


@dataclass
class AttributeConfig:
    """Options of :func:`run_attribute` (and of ``gradsketch attribute``; the flags have the same names).

    Attributes:
        method: grad-dot, grad-cos, tracin, trak, arnoldi, influence, ekfac or kfac (any registered name).
        kind, d: the sketch (``d = 0``: exact gradients, no sketch); ``d`` larger than the number of
            parameters is lowered to it and the summary says so.
        seed: sketch and Arnoldi seed.
        mode: auto (default: factored where it pays and the layers allow it, see ``Attributor``), explicit,
            implicit or factored per-example gradients.
        k: proponents/opponents kept per test example.
        n_iters, top_k: Arnoldi Krylov dimension and eigenpairs kept (``method="arnoldi"``; None: the
            method's defaults, top_k 40 with the tail and 100 without, n_iters 1.5·top_k rounded up to the block).
        damping: δ of the one damping rule (|K| + δI)⁻¹ of every influence-type method (``None``: the default
            3e-3, :mod:`gradsketch.attribution.damping`), finite and ≥ 0.
        kernel: TRAK's kernel, ``"auto"`` (the default: ``"ggn_trace"`` when the task declares its outputs,
            else ``"features"``), ``"features"`` (ΦᵀΦ, as published), ``"ggn"`` (the Gauss-Newton matrix of the
            training loss) or ``"ggn_trace"`` (ΦᵀΦ with rows weighted by their Gauss-Newton curvature); refused
            for a method without the option.
        store: feature store directory (``None``: ``OUT/store``).
        self_influence: also compute self-influence of every training example.
        rank, world_size: featurise only this process's share of the store, then stop.
        on_data_change: ``"raise"`` (a store whose chunks were computed from other examples is refused, naming
            them) or ``"refeaturise"`` (only those chunks are recomputed).

    Raises ValueError/TypeError in the form ``name: expected ..., got ...`` on any bad value:

    >>> AttributeConfig(method="lissa")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: method: expected one of ('grad-dot', 'grad-cos', ..., 'influence', 'ekfac', 'kfac'), got 'lissa'
    """

    method: str = "trak"
    kind: str = "affd"
    d: int = 1024
    seed: int = 0
    mode: str = "auto"
    k: int = 10
    n_iters: int | None = None
    top_k: int | None = None
    damping: float | None = None
    kernel: str | None = None
    store: str | None = None
    self_influence: bool = True
    rank: int | None = None
    world_size: int | None = None
    on_data_change: str = "raise"

    def __post_init__(self) -> None:
        from ..sketch.kinds import KINDS
        from .base import MODES, registered_methods

        check_choice(self.method, "method", registered_methods())
        check_choice(self.kind, "kind", tuple(sorted(KINDS)))
        check_choice(self.mode, "mode", MODES)
        check_choice(self.on_data_change, "on_data_change", ("raise", "refeaturise"))
        check_int(self.d, "d", minimum=0)
        check_int(self.seed, "seed", minimum=0)
        check_int(self.k, "k", minimum=1)
        check_int(self.n_iters, "n_iters", minimum=1, allow_none=True)
        check_int(self.top_k, "top_k", minimum=1, allow_none=True)
        self.damping = check_real(self.damping, "damping", minimum=0.0, allow_none=True)
        if self.kernel is not None:
            from .base import method_class
            from .options import TRAK_KERNELS

            check_choice(self.kernel, "kernel", TRAK_KERNELS)
            if "kernel" not in {f.name for f in fields(method_class(self.method).options_cls)}:
                raise ValueError(f"kernel: only TRAK has a kernel option ({', '.join(TRAK_KERNELS)}), got kernel="
                                 f"{self.kernel!r} with method={self.method!r}")
        if self.store is not None and not isinstance(self.store, (str, Path)):
            raise TypeError(f"store: expected a directory path, got {self.store!r}")
        check_bool(self.self_influence, "self_influence")
        if (self.rank is None) != (self.world_size is None):
            raise ValueError(f"rank, world_size: expected both --rank and --world-size or neither, got "
                             f"rank={self.rank!r}, world_size={self.world_size!r}")
        if self.world_size is not None:
            check_int(self.world_size, "world_size", minimum=1)
            check_int(self.rank, "rank", minimum=0)
            if not 0 <= self.rank < self.world_size:  # type: ignore[operator]
                raise ValueError(f"rank: expected 0 <= rank < world_size, got rank={self.rank}, "
                                 f"world_size={self.world_size}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def read_config(path: str | Path) -> dict[str, Any]:
    """Options from a JSON or TOML file (keys are :class:`AttributeConfig` fields, ``-`` or ``_``; ``entry``
    allowed too). Raises ValueError naming the file on a missing file, bad syntax or unknown keys; values are
    checked by :class:`AttributeConfig`.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "c.toml"); _ = open(p, "w").write('method = "arnoldi"\\nk = 3\\n')
    >>> read_config(p)
    {'method': 'arnoldi', 'k': 3}
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"config: expected a readable JSON/TOML file, got {str(path)!r} ({e.strerror})") from e
    try:
        if p.suffix == ".toml":
            import tomllib

            cfg = tomllib.loads(text)
        else:
            cfg = json.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"config: expected valid {'TOML' if p.suffix == '.toml' else 'JSON'} in {str(path)!r}, "
                         f"got a syntax error: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"config: expected a table of options in {str(path)!r}, got {type(cfg).__name__}")
    cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
    unknown = sorted(set(cfg) - set(AttributeConfig.keys()) - {"entry", "out", "progress"})
    if unknown:
        raise ValueError(f"config: expected keys among {sorted(AttributeConfig.keys())}, got unknown {unknown}")
    return cfg


def run_attribute(entry: Any, config: AttributeConfig | None = None, out: str | Path = "gradsketch-attribution",
                  progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Fit, score and report: the ``gradsketch attribute`` pipeline.

    Args:
        entry: an :class:`gradsketch.entry.Entry` or anything :func:`gradsketch.entry.load_entry` accepts;
            ``entry.test`` is needed (the examples to attribute).
        config: the options (default :class:`AttributeConfig()`).
        out: output directory: ``attribution.npz`` (top-k ``indices``/``values``/``opponent_*`` ``[n_test, k]``
            and ``self_influence [n_train]``), ``summary.json`` and ``report.html``.
        command: the command line, recorded in the report.

    Returns the summary dict (also written to ``summary.json``); with ``rank``/``world_size`` only the
    featurisation of this process's share is done and the summary says so. Under ``torch.distributed``
    (e.g. ``torchrun ... -m gradsketch.cli attribute``) the ranks share the work (see
    :meth:`Attributor.fit`) and rank 0 writes the outputs.
    """
    import numpy as np

    from ..entry import load_entry
    from ..linalg.distributed import rank_and_world
    from .base import Attributor
    from .options import OPTIONS

    cfg = config if config is not None else AttributeConfig()
    if not isinstance(cfg, AttributeConfig):
        raise TypeError(f"config: expected an AttributeConfig, got {type(cfg).__name__}")
    ent = load_entry(entry)
    if ent.train is None:
        raise ValueError("entry: expected training data in Entry.train, got None")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = ent.task()
    notes: list[str] = []
    sketch = None
    if cfg.d > 0:
        d = min(cfg.d, task.n_params)
        if d < cfg.d:
            notes.append(f"d = {cfg.d} is larger than the {task.n_params} parameters: used d = {d}")
        sketch = dict(kind=cfg.kind, d=d, seed=cfg.seed)
    # the config's method options go to the methods whose options dataclass has them (n_iters, top_k, seed:
    # arnoldi; damping: every curvature method, None meaning the method's default)
    accepted = {f.name for f in fields(OPTIONS[cfg.method])}
    extra: dict[str, Any] = {k: v for k, v in (("n_iters", cfg.n_iters), ("top_k", cfg.top_k), ("seed", cfg.seed),
                                               ("damping", cfg.damping), ("kernel", cfg.kernel),
                                               ("on_data_change", cfg.on_data_change))
                             if k in accepted and v is not None}
    store = Path(cfg.store) if cfg.store else out / "store"
    summary: dict[str, Any] = {"entry": ent.name, "command": command, "method": cfg.method, "sketch": sketch,
                               "mode": cfg.mode, "store": str(store)}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    att = Attributor(task, cfg.method, sketch=sketch, store=store, mode=cfg.mode, **extra)
    summary.update(mode=att.mode, mode_reason=att.mode_reason_)
    if cfg.rank is not None:
        att.featurise(ent.train, rank=cfg.rank, world_size=cfg.world_size, progress=progress)
        timings["featurise"] = time.perf_counter() - t0
        return {**summary, "rank": cfg.rank, "world_size": cfg.world_size, "timings_s": timings}
    if ent.test is None:
        raise ValueError("entry: expected test data in Entry.test (the examples to attribute), got None")
    att.fit(ent.train, progress=progress)
    summary.update(mode=att.mode, mode_reason=att.mode_reason_)  # a fallback of "auto" is decided in fit
    if getattr(att, "kernel_", None) is not None:   # TRAK: the kernel "auto" resolved to, and why
        summary.update(kernel=att.kernel_, kernel_reason=att.kernel_reason_)
    timings["fit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_train = int(att.n_train_)
    k = cfg.k
    if k > n_train:
        notes.append(f"k = {k} is larger than the {n_train} training examples: used k = {n_train}")
        k = n_train
    tk = att.topk(ent.test, k, progress=progress)
    timings["topk"] = time.perf_counter() - t0
    arrays = {name: v.numpy() for name, v in tk._asdict().items()}
    if cfg.self_influence:
        t0 = time.perf_counter()
        arrays["self_influence"] = att.self_influence(progress=progress).numpy()
        timings["self_influence"] = time.perf_counter() - t0
    rank, world = rank_and_world()
    if world > 1:  # under torch.distributed every rank computed the same results: rank 0 writes them
        summary["world_size"] = world
        if rank != 0:
            return {**summary, "rank": rank, "timings_s": timings, "notes": notes}
    np.savez(out / "attribution.npz", **arrays)
    summary.update({"n_train": n_train, "n_test": int(tk.indices.shape[0]), "k": int(tk.indices.shape[1]),
                    "timings_s": timings, "notes": notes, "results": str(out / "attribution.npz")})
    from ..report.attribution import write_attribution_report

    path = write_attribution_report(out / "report.html", ent, tk, summary,
                                    self_influence=arrays.get("self_influence"))
    summary["report"] = str(path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def config_dict(cfg: AttributeConfig) -> dict[str, Any]:
    """The options as a plain dict (for logs and reports)."""
    return asdict(cfg)
