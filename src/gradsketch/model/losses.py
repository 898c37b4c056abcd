"""Per-example losses: every helper returns a ``[B]`` tensor, one loss per example.

Token-level losses (sequence models) reduce over each example's own valid tokens with ``reduction="sum"``
or ``"mean"``; padding (``mask == 0``) and ``ignore_index`` targets contribute nothing, so padding an
example inside a batch changes neither its loss nor its gradient.

``*_loss`` builders return ``loss_fn(model, batch) -> [B]`` callables ready for :class:`gradsketch.Task`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS = ("sum", "mean")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _reduce_tokens(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """``[B, ...]`` token losses and validity -> ``[B]``: Σ_t valid·ℓ_t, or that / max(1, Σ_t valid)."""
    per_token = per_token * valid.to(per_token.dtype)
    flat = per_token.reshape(per_token.shape[0], -1).sum(1)
    if reduction == "sum":
        return flat
    count = valid.reshape(valid.shape[0], -1).sum(1).clamp_min(1).to(flat.dtype)
    return flat / count


def cross_entropy_per_example(logits: Tensor, targets: Tensor, *, mask: Tensor | None = None,
                              reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Cross-entropy per example.

    ``logits [B, C]`` with ``targets [B]`` -> ``[B]``: ℓ_i = −log softmax(z_i)[y_i].
    ``logits [B, T, C]`` with ``targets [B, T]`` (and optional ``mask [B, T]``) -> ``[B]``: the sum or mean
    (``reduction``) of token losses over the example's valid tokens (mask ≠ 0 and target ≠ ignore_index).
    """
    _check_reduction(reduction)
    if logits.ndim < 2:
        raise ValueError(f"logits: expected [B, C] or [B, T, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits without the class "
                         f"dimension), got {tuple(targets.shape)}")
    if logits.ndim == 2 and mask is None:
        return F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    valid = targets != ignore_index
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask: expected shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
        valid = valid & (mask != 0)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    tok = -torch.log_softmax(logits, -1).gather(-1, safe_t.unsqueeze(-1)).squeeze(-1)
    return _reduce_tokens(tok, valid, reduction)


def mse_per_example(outputs: Tensor, targets: Tensor, *, reduction: str = "sum") -> Tensor:
    """Squared error per example: ``[B, ...]`` -> ``[B]``, ℓ_i = Σ_j (o_ij − t_ij)² (or the mean over j)."""
    _check_reduction(reduction)
    if outputs.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
    sq = (outputs - targets.to(outputs.dtype)).pow(2).reshape(outputs.shape[0], -1)
    return sq.sum(1) if reduction == "sum" else sq.mean(1)


def causal_lm_per_example(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                          reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy per sequence: ``logits [B, T, V]``, ``input_ids [B, T]`` -> ``[B]``.

    ℓ_i = reduce_{t: m_{i,t+1}=1} −log p(x_{i,t+1} | x_{i,≤t}); positions whose *target* is padding
    (``attention_mask == 0``) or ``ignore_index`` are dropped, so right-padding contributes nothing.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits/input_ids: expected [B, T, V] and [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(input_ids.shape)}")
    shift_mask = None if attention_mask is None else attention_mask[:, 1:]
    return cross_entropy_per_example(logits[:, :-1], input_ids[:, 1:], mask=shift_mask,
                                     reduction=reduction, ignore_index=ignore_index)


def _get(batch: Any, key: Any, what: str) -> Any:
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{what}: key {key!r} not found in the batch ({type(batch).__name__})") from e


def classifier_loss(input_key: Any = 0, target_key: Any = 1, loss: str = "cross_entropy",
                    ) -> Callable[[torch.nn.Module, Any], Tensor]:
    """``loss_fn(model, batch) = ℓ(model(batch[input_key]), batch[target_key])`` with ℓ cross-entropy or
    squared error (``loss="mse"``), per example ``[B]``."""
    if loss not in ("cross_entropy", "mse"):
        raise ValueError(f"loss: expected 'cross_entropy' or 'mse', got {loss!r}")
    per = cross_entropy_per_example if loss == "cross_entropy" else mse_per_example

    def loss_fn(model: torch.nn.Module, batch: Any) -> Tensor:
        return per(model(_get(batch, input_key, "input_key")), _get(batch, target_key, "target_key"))

    return loss_fn


def causal_lm_loss(reduction: str = "mean") -> Callable[[torch.nn.Module, Any], Tensor]:
    """``loss_fn(model, batch)`` for a transformers causal LM and a batch dict with ``input_ids`` and
    (optionally) ``attention_mask``: :func:`causal_lm_per_example` of ``model(...).logits``."""
    _check_reduction(reduction)

    def loss_fn(model: torch.nn.Module, batch: Any) -> Tensor:
        ids = _get(batch, "input_ids", "batch")
        mask = batch.get("attention_mask") if hasattr(batch, "get") else None
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits if hasattr(out, "logits") else out
        return causal_lm_per_example(logits, ids, mask, reduction=reduction)

    return loss_fn
