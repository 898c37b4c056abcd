"""A spectrum per training checkpoint (how the top of the curvature spectrum evolves)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .core import SpectrumResult, _is_task, spectrum


class SpectrumSeries:
    """Results of :func:`spectrum_over_checkpoints`: ``results[i]`` for checkpoint ``labels[i]``.

    Behaves like a list of :class:`SpectrumResult`; :meth:`plot` draws the top eigenvalues against the
    checkpoint index, :meth:`eigenvalues` stacks them ``[n_checkpoints, k]``.
    """

    def __init__(self, results: list[SpectrumResult], labels: list[str]) -> None:
        self.results, self.labels = results, labels

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> SpectrumResult:
        return self.results[i]

    def __iter__(self):
        return iter(self.results)

    def __repr__(self) -> str:
        return f"SpectrumSeries(n={len(self)}, labels={self.labels[:4]}{'...' if len(self) > 4 else ''})"

    def eigenvalues(self) -> torch.Tensor:
        """``[n_checkpoints, k]`` float64, each row descending (NaN-padded to the longest row)."""
        k = max(r.k for r in self.results)
        out = torch.full((len(self), k), float("nan"), dtype=torch.float64)
        for i, r in enumerate(self.results):
            out[i, : r.k] = r.eigenvalues
        return out

    def plot(self, path: str | os.PathLike | None = None, **kwargs: Any) -> Any:
        """Evolution plot (see :func:`gradsketch.report.plots.plot_evolution`); returns the figure."""
        from ..report.plots import plot_evolution

        return plot_evolution(self, path, **kwargs)

    def to_dict(self) -> dict:
        return {"labels": self.labels, "results": [r.to_dict() for r in self.results]}


def _load_state(ckpt: Any, i: int) -> dict:
    if isinstance(ckpt, (str, os.PathLike)):
        if not os.path.exists(ckpt):
            raise ValueError(f"checkpoints[{i}]: expected an existing file, got {os.fspath(ckpt)!r}")
        obj = torch.load(os.fspath(ckpt), map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        ckpt = obj
    if not isinstance(ckpt, dict):
        raise TypeError(f"checkpoints[{i}]: expected a state_dict (dict of tensors) or a path, got "
                        f"{type(ckpt).__name__}")
    return ckpt


def spectrum_over_checkpoints(task_or_model_factory: Any, checkpoints: Sequence[Any], data: Iterable,
                              loss_fn: Any = None, labels: Sequence[str] | None = None,
                              plot: str | os.PathLike | None = None, strict: bool = True,
                              progress: bool = True, **spectrum_kwargs: Any) -> SpectrumSeries:
    """:func:`spectrum` at each checkpoint, with the same sketch, seed and settings.

    Args:
        task_or_model_factory: a :class:`gradsketch.Task` (each checkpoint is loaded into ``task.model``
            and the model's original state is restored afterwards), or a callable returning a fresh
            ``nn.Module`` (wrapped as ``Task(model, loss_fn)``, or ``Task.from_classifier(model)`` when
            ``loss_fn`` is None) or a ``Task``.
        checkpoints: ``state_dict``s or paths to ``torch.save``d ones (``{"state_dict": ...}`` accepted);
            loaded with ``weights_only=True`` onto the CPU, then copied into the model's tensors.
        data: batches, as for :func:`spectrum`.
        loss_fn: per-example loss ``(model, batch) -> [B]`` for a model factory.
        labels: one name per checkpoint (default the file names or ``"0", "1", ...``).
        plot: optional PNG path for the evolution plot.
        strict: passed to ``load_state_dict``.
        **spectrum_kwargs: ``k``, ``sketch``, ``operator``, ``which``, ... for :func:`spectrum`.

    Returns:
        :class:`SpectrumSeries`.
    """
    if isinstance(checkpoints, (str, os.PathLike, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints: expected a list of state_dicts or paths, got "
                        f"{type(checkpoints).__name__}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints: expected at least one checkpoint, got an empty list")
    if labels is None:
        labels = [os.path.basename(os.fspath(c)) if isinstance(c, (str, os.PathLike)) else str(i)
                  for i, c in enumerate(checkpoints)]
    labels = [str(x) for x in labels]
    if len(labels) != len(checkpoints):
        raise ValueError(f"labels: expected {len(checkpoints)} labels (one per checkpoint), got {len(labels)}")

    def make_task() -> Any:
        from ..model import Task

        if _is_task(task_or_model_factory):
            return task_or_model_factory
        if not callable(task_or_model_factory):
            raise TypeError("task_or_model_factory: expected a Task or a callable returning an nn.Module or a "
                            f"Task, got {type(task_or_model_factory).__name__}")
        obj = task_or_model_factory()
        if _is_task(obj):
            return obj
        if not isinstance(obj, nn.Module):
            raise TypeError("task_or_model_factory: the factory returned "
                            f"{type(obj).__name__}; expected an nn.Module or a Task")
        return Task(obj, loss_fn) if loss_fn is not None else Task.from_classifier(obj)

    task = make_task()
    saved = ({k: v.detach().clone() for k, v in task.model.state_dict().items()}
             if _is_task(task_or_model_factory) else None)
    results: list[SpectrumResult] = []
    try:
        for i, ckpt in enumerate(checkpoints):
            state = _load_state(ckpt, i)
            if i > 0 and not _is_task(task_or_model_factory):
                task = make_task()
            try:
                task.model.load_state_dict(state, strict=strict)
            except RuntimeError as e:
                raise ValueError(f"checkpoints[{i}]: does not fit the model: {e}") from e
            results.append(spectrum(task, data, progress=progress, **spectrum_kwargs))
    finally:
        if saved is not None:
            task.model.load_state_dict(saved)
    series = SpectrumSeries(results, list(labels))
    if plot is not None:
        series.plot(plot)
    return series
