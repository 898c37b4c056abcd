"""A small, deterministic training loop with periodic evaluation, a callback and a history.

Works for plain modules (full fine-tuning) and :class:`SubspaceModel` (only ω, λ train) alike.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

OPTIMIZERS = ("adam", "adamw", "sgd")


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Mean loss of a batch: ``(x, y)`` -> cross-entropy(model(x), y) (MSE if y is floating);
    a dict -> ``model(**batch).loss`` (transformers) or cross-entropy of ``.logits`` with ``batch['labels']``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise ValueError("loss_fn: the model's output has no .loss; pass loss_fn(model, batch) -> scalar")
        return loss
    if isinstance(batch, Sequence) and len(batch) == 2:
        x, y = batch
        out = model(x)
        if y.is_floating_point():
            return nn.functional.mse_loss(out.reshape(y.shape), y)
        return nn.functional.cross_entropy(out, y)
    raise TypeError(f"batch: expected (x, y) or a dict of model inputs, got {type(batch).__name__}; "
                    "pass loss_fn(model, batch) -> scalar")


@dataclass
class History:
    """What :func:`train` did: one record per evaluation (``step``, ``loss`` (mean since the last
    evaluation), ``metric``, ``n_trainable``), the last loss, and why it stopped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    stopped: str = "completed"
    nan_step: int | None = None

    @property
    def metrics(self) -> list[float]:
        return [r["metric"] for r in self.records if r.get("metric") is not None]

    @property
    def best_metric(self) -> float:
        m = [v for v in self.metrics if not math.isnan(v)]
        return max(m) if m else float("nan")

    @property
    def final_metric(self) -> float:
        m = self.metrics
        return m[-1] if m else float("nan")


def _batches(train_data: Any, batch_size: int | None, gen: torch.Generator):  # type: ignore[no-untyped-def]
    """Yield batches forever (epoch by epoch) and the number of batches per epoch."""
    if isinstance(train_data, tuple) and train_data and all(isinstance(t, Tensor) for t in train_data):
        m = train_data[0].shape[0]
        if any(t.shape[0] != m for t in train_data):
            shapes = [tuple(t.shape) for t in train_data]
            raise ValueError(f"train_data: expected tensors with equal first dimension, got {shapes}")
        bs = m if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        per_epoch = math.ceil(m / bs)

        def gen_tuple():  # type: ignore[no-untyped-def]
            while True:
                perm = torch.randperm(m, generator=gen) if bs < m else torch.arange(m)
                for i in range(0, m, bs):
                    idx = perm[i:i + bs]
                    yield tuple(t[idx] for t in train_data)
        return gen_tuple(), per_epoch
    if isinstance(train_data, Iterable) and not isinstance(train_data, (str, Tensor)):
        try:
            per_epoch = len(train_data)  # type: ignore[arg-type]
        except TypeError:
            per_epoch = None

        def gen_iter():  # type: ignore[no-untyped-def]
            while True:
                empty = True
                for b in train_data:
                    empty = False
                    yield b
                if empty:
                    raise ValueError("train_data: expected at least one batch, got an empty iterable")
        return gen_iter(), per_epoch
    raise TypeError(f"train_data: expected a tuple of tensors (x, y, ...) or an iterable of batches, "
                    f"got {type(train_data).__name__}")


class _DataParallel:
    """Data parallelism of :func:`train` under ``torch.distributed`` (issue 15): each rank takes its contiguous
    shard ``[a_r, b_r)`` of every batch (:func:`~gradsketch.linalg.distributed.shard_range`), back-propagates
    ``(n_r / n) · mean loss of its shard`` and one ``all_reduce`` sums the trainable parameters' gradients
    (for a subspace model only ω and λ: ``d`` numbers), so every rank steps with the gradient of the batch
    mean, ``Σ_r (n_r/n) ∇ mean_r = ∇ mean``, and the runs stay identical. Needs ``loss_fn`` to be the mean over
    the batch's examples (the default loss is). Without a process group (or with one rank) it is inactive."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        from ..linalg.distributed import is_distributed, rank_and_world

        self.rank, self.world = rank_and_world() if is_distributed() else (0, 1)
        self.params = list(params)

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: Any) -> tuple[Any, float]:
        """(this rank's shard of ``batch``, its weight ``n_r / n``); ``(None, 0.0)`` for an empty shard."""
        from ..linalg.distributed import shard_range
        from ..model._batch import SplitBatch

        split = SplitBatch(batch)
        a, b = shard_range(split.size, self.rank, self.world)
        return (split.slice(a, b).rebuild(), (b - a) / split.size) if b > a else (None, 0.0)

    def reduce(self, loss: Tensor) -> Tensor:
        """All-reduce the gradients (summed) and the weighted loss; returns the batch's mean loss."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        off = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[off:off + g.numel()].view_as(p).to(p.dtype)
            off += g.numel()
        return flat[-1]


def _scalar(loss: Any) -> Tensor:
    """``loss`` if it is the batch's mean (one number); else a ValueError naming the fix."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"loss_fn: expected the batch's mean loss (a scalar tensor), got "
            f"{('shape ' + str(list(loss.shape))) if isinstance(loss, Tensor) else type(loss).__name__}; "
            "a per-example loss [B] (as gradsketch.Task takes) must be reduced here: return loss.mean()")
    return loss


def make_optimizer(optimizer: Any, params: Sequence[Tensor], lr: float) -> torch.optim.Optimizer:
    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name == "adam":
            return torch.optim.Adam(params, lr=lr)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr)
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS} or a callable(params, lr), got {optimizer!r}")
    if callable(optimizer):
        return optimizer(params, lr=lr)
    raise TypeError(f"optimizer: expected a name or a callable(params, lr=...), got {type(optimizer).__name__}")


def train(model: nn.Module, train_data: Any, eval_fn: Callable[[nn.Module], float] | None = None, *,
          steps: int | None = None, epochs: int | None = None, lr: float = 1e-3, optimizer: Any = "adam",
          loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, batch_size: int | None = None,
          eval_every: int | None = None, callback: Callable[[int, dict[str, Any], nn.Module], Any] | None = None,
          on_nan: str = "stop", seed: int = 0, progress: bool = True, desc: str = "train") -> History:
    """Train the trainable parameters of ``model`` (``requires_grad=True``) and evaluate every ``eval_every`` steps.

    train_data : a tuple of tensors ``(x [m, ...], y [m, ...])`` (shuffled minibatches of ``batch_size``
        drawn from a generator seeded by ``seed``; full batch if None) or any iterable of batches (a
        DataLoader; re-iterated each epoch).
    eval_fn : ``eval_fn(model) -> float``, higher is better; evaluated at step 0, every ``eval_every`` steps
        (default: once per epoch or at the end) and at the end. The model is in ``eval()`` mode and under
        ``torch.no_grad()`` while evaluated.
    steps | epochs : how long (exactly one of them).
    callback : ``callback(step, record, model)`` after each evaluation; returning True stops training.
    on_nan : "stop" (stop, warn, record ``nan_step``) or "raise" (FloatingPointError) on a non-finite loss.
    Returns a :class:`History`.
    """
    if (steps is None) == (epochs is None):
        raise ValueError(f"steps, epochs: expected exactly one of them, got steps={steps!r}, epochs={epochs!r}")
    if on_nan not in ("stop", "raise"):
        raise ValueError(f"on_nan: expected 'stop' or 'raise', got {on_nan!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: expected at least one parameter with requires_grad=True, got none")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    gen = torch.Generator().manual_seed(int(seed))
    it, per_epoch = _batches(train_data, batch_size, gen)
    if steps is None:
        if per_epoch is None:
            raise ValueError("epochs: train_data has no len(); pass steps instead")
        steps = int(epochs) * per_epoch  # type: ignore[arg-type]
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    steps = int(steps)
    if eval_every is None:
        eval_every = per_epoch or steps or 1
    if int(eval_every) < 1:
        raise ValueError(f"eval_every: expected a positive integer, got {eval_every!r}")
    loss_fn = loss_fn or default_loss
    opt = make_optimizer(optimizer, params, lr)
    par = _DataParallel(params)
    if par.active:  # ranks that disagree fail together before any collective of the loop, never hang
        from ..linalg.distributed import check_same

        check_same((steps, int(eval_every), float(lr), per_epoch, int(seed)),
                   "train (steps, eval_every, lr, batches per epoch, seed)")
        check_same(sum(p.numel() for p in params), "model (its number of trainable parameters)")
    hist = History()

    def evaluate(step: int, losses: list[float]) -> bool:
        metric = None
        if eval_fn is not None:
            was = model.training
            model.eval()
            with torch.no_grad():
                metric = float(eval_fn(model))
            model.train(was)
        rec = {"step": step, "loss": (sum(losses) / len(losses)) if losses else float("nan"), "metric": metric,
               "n_trainable": int(getattr(model, "n_trainable", sum(p.numel() for p in params)))}
        hist.records.append(rec)
        if callback is not None:
            return bool(callback(step, rec, model))
        return False

    model.train()
    losses: list[float] = []
    stop = evaluate(0, losses)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    step = 0
    try:
        while not stop and step < steps:
            batch = next(it)
            opt.zero_grad(set_to_none=True)
            if par.active:  # this rank's shard of the batch, weighted; gradients summed over the ranks
                part, weight = par.shard(batch)
                loss = _scalar(loss_fn(model, part)) * weight if part is not None else params[0].sum() * 0.0
                loss.backward()
                loss = par.reduce(loss)
            else:
                loss = _scalar(loss_fn(model, batch))
            if not torch.isfinite(loss.detach()).all():
                hist.nan_step = step + 1
                hist.stopped = f"non-finite loss ({float(loss.detach())}) at step {step + 1}"
                if on_nan == "raise":
                    raise FloatingPointError(hist.stopped)
                warnings.warn(f"train: {hist.stopped}; stopping this run", RuntimeWarning, stacklevel=2)
                break
            if not par.active:
                loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if step % int(eval_every) == 0 or step == steps:
                stop = evaluate(step, losses)
                losses = []
                if stop:
                    hist.stopped = "callback"
    finally:
        bar.close()
    hist.steps = step
    return hist
