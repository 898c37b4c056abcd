"""The one form in which a user hands a model to gradsketch's commands: an :class:`Entry`.

Every command that runs on a user's model (``gradsketch attribute``, ``spectrum --entry``,
``intrinsic-dim --entry``) takes ``--entry module:function`` (or ``path/to/file.py:function``), calls the
function with no arguments, and expects an :class:`Entry` back (a plain tuple ``(model, loss, train[,
test])`` in the same field order is accepted too). :func:`load_entry` does the loading, once, for all
commands; the pipelines (:mod:`gradsketch.attribution.pipeline`, :mod:`gradsketch.spectrum.pipeline`,
:mod:`gradsketch.intrinsic.pipeline`) take the :class:`Entry` itself, so they can be called from Python.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

__all__ = ["Entry", "load_entry", "parse_entry"]

LOSS_NAMES = ("cross_entropy", "mse")


@dataclass
class Entry:
    """A user's model and data, as one small object.

    Attributes:
        model: the ``nn.Module`` (for ``intrinsic-dim`` its current parameters are θ0; it is never modified:
            training runs on copies).
        loss: the per-example loss ``loss(model, batch) -> [B]``; or ``"cross_entropy"`` / ``"mse"`` for a
            classifier called as ``model(batch[0])`` with targets ``batch[1]``; or a ready
            :class:`gradsketch.Task` (then ``model`` must be its model).
        train: the training data, an iterable of batches (a list, a DataLoader without shuffling).
        test: the test / evaluation data, an iterable of batches (``None`` where a command needs none).
        metric: ``metric(model, data) -> float``, higher is better (``intrinsic-dim``), or ``"accuracy"``.
        examples: optional display forms of the examples, ``{"train": [...], "test": [...]}``: per
            example an image array ``[H, W]`` / ``[H, W, 3]`` or a string (the attribution report shows
            them as images or text).
        labels: optional ``{"train": [...], "test": [...]}`` class labels (shown in reports), and
            ``flagged``: optional ``[n_train]`` bools marking known mislabelled training examples.
        name: a label for reports.

    Example:
        >>> import torch
        >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
        >>> e = Entry(torch.nn.Linear(3, 2), "cross_entropy", [(x, y)], [(x, y)])
        >>> e.task().n_params, float(e.loss_fn()(e.model, (x, y)).shape[0])
        (8, 8.0)
    """

    model: nn.Module
    loss: Any = "cross_entropy"
    train: Any = None
    test: Any = None
    metric: Any = "accuracy"
    examples: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    flagged: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        from .model import Task

        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(self.model).__name__}")
        if isinstance(self.loss, str):
            if self.loss not in LOSS_NAMES:
                raise ValueError(f"loss: expected one of {LOSS_NAMES}, a callable (model, batch) -> [B] or a Task, "
                                 f"got {self.loss!r}")
        elif isinstance(self.loss, Task):
            if self.loss.model is not self.model:
                raise ValueError("loss: expected a Task built on the entry's model, got a Task on another model")
        elif not callable(self.loss):
            raise TypeError(f"loss: expected a callable (model, batch) -> [B], 'cross_entropy'/'mse' or a Task, "
                            f"got {type(self.loss).__name__}")
        if isinstance(self.metric, str) and self.metric != "accuracy":
            raise ValueError(f"metric: expected 'accuracy' or a callable (model, data) -> float, got {self.metric!r}")
        for what in ("train", "test"):
            data = getattr(self, what)
            if isinstance(data, Tensor):
                raise TypeError(f"{what}: expected an iterable of batches such as [(x, y)], got a Tensor")
            if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
                    and data[0].ndim >= 1 and data[1].ndim >= 1 and data[0].shape[0] == data[1].shape[0]
                    and data[0].shape[0] != 2):
                raise TypeError(f"{what}: expected an iterable of batches, got one (x, y) pair of tensors; "
                                f"wrap it in a list: [(x, y)]")

    def task(self) -> Any:
        """The :class:`gradsketch.Task` for ``model`` and ``loss`` (``Task.from_classifier`` for a loss name)."""
        from .model import Task

        if isinstance(self.loss, Task):
            return self.loss
        if isinstance(self.loss, str):
            return Task.from_classifier(self.model, loss=self.loss)
        return Task(self.model, self.loss)

    def loss_fn(self) -> Callable[[nn.Module, Any], Tensor]:
        """The per-example loss as ``(model, batch) -> [B]`` for any model called like ``model``."""
        from .model.losses import classifier_loss

        if isinstance(self.loss, str):
            return classifier_loss(loss=self.loss)
        if callable(self.loss) and not hasattr(self.loss, "grads"):
            return self.loss  # type: ignore[no-any-return]
        task = self.loss
        loss = getattr(task, "loss_fn", None)
        if callable(loss):
            return loss  # type: ignore[no-any-return]
        out_fn, on_out = getattr(task, "output_fn", None), getattr(task, "loss_on_output", None)
        if callable(out_fn) and callable(on_out):
            return lambda m, b: on_out(out_fn(m, b), b)
        raise ValueError("loss: the Task carries no per-example loss usable on another model; pass the loss")


def parse_entry(spec: str) -> tuple[str, str]:
    """Split ``'module:function'`` / ``'path/file.py:function'``; raises ValueError naming ``entry``.

    >>> parse_entry("mypkg.models:build")
    ('mypkg.models', 'build')
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"entry: expected 'module:function' or 'path/file.py:function', got {spec!r}")
    mod_name, fn_name = spec.rsplit(":", 1)
    if not mod_name or not fn_name.isidentifier():
        raise ValueError(f"entry: expected 'module:function' or 'path/file.py:function', got {spec!r}")
    return mod_name, fn_name


def _import(mod_name: str) -> Any:
    if mod_name.endswith(".py") or os.path.sep in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise ValueError(f"entry: expected an existing Python file, got {mod_name!r}")
        spec = importlib.util.spec_from_file_location(f"_gradsketch_entry_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ValueError(f"entry: expected a Python file, got {mod_name!r}")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    # a module name is looked up as Python would from the current directory, without changing sys.path
    spec = None
    cwd_file = Path.cwd() / (mod_name.replace(".", os.path.sep) + ".py")
    if "." not in mod_name and cwd_file.is_file() and mod_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(mod_name, cwd_file)
    if spec is not None and spec.loader is not None:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"entry: expected an importable module or a .py file, got {mod_name!r} ({e})") from e


def load_entry(spec: str | Callable[[], Any] | Entry) -> Entry:
    """Call the entry point ``spec`` (``'module:function'``, ``'path/file.py:function'``, a callable, or an
    :class:`Entry` already) and return its :class:`Entry`.

    The function may also return a tuple ``(model, loss, train)`` or ``(model, loss, train, test)``: the
    fields of :class:`Entry` in order. Raises ValueError / TypeError starting with ``entry:``.

    >>> import torch
    >>> e = load_entry(lambda: (torch.nn.Linear(2, 2), "mse", [(torch.zeros(1, 2), torch.zeros(1, 2))]))
    >>> type(e).__name__, e.test is None
    ('Entry', True)
    """
    if isinstance(spec, Entry):
        return spec
    label = spec if isinstance(spec, str) else getattr(spec, "__name__", "entry")
    if isinstance(spec, str):
        mod_name, fn_name = parse_entry(spec)
        fn = getattr(_import(mod_name), fn_name, None)
        if not callable(fn):
            raise ValueError(f"entry: expected {mod_name!r} to have a callable {fn_name!r}, got "
                             f"{'nothing' if fn is None else type(fn).__name__}")
    elif callable(spec):
        fn = spec
    else:
        raise TypeError(f"entry: expected 'module:function', a callable or an Entry, got {type(spec).__name__}")
    out = fn()
    if isinstance(out, Entry):
        entry = out
    elif isinstance(out, (tuple, list)) and len(out) in (3, 4):
        try:
            entry = Entry(*out)
        except (TypeError, ValueError) as e:
            raise type(e)(f"entry: {label} returned a tuple that is not (model, loss, train[, test]): {e}") from e
    else:
        n = len(out) if isinstance(out, (tuple, list)) else None
        raise TypeError(f"entry: expected {label} to return a gradsketch.Entry (or a tuple (model, loss, train"
                        f"[, test])), got {type(out).__name__}{'' if n is None else f' of length {n}'}")
    if not entry.name:
        entry.name = str(label)
    return entry
