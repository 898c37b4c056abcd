"""Per-example losses: every helper returns a ``[B]`` tensor, one loss per example.

Token-level losses (sequence models) reduce over each example's own valid tokens with ``reduction="sum"``
or ``"mean"``; padding (``mask == 0``) and ``ignore_index`` targets contribute nothing. For next-token
prediction (:func:`causal_lm_per_example`) a term t -> t+1 counts only when both the predicting position t
and the target t+1 are real tokens, so left or right padding an example inside a batch changes neither its
loss nor its gradient (provided the model itself ignores the padding: attention mask, and position ids
counted over the real tokens for left padding).

``reduction`` ("mean", the default everywhere, or "sum") combines an example's own elements: the tokens of a
sequence, the entries of a regression output.

``*_loss`` builders return ``loss_fn(model, batch) -> [B]`` callables ready for :class:`gradsketch.Task`;
:func:`classification_margin` returns TRAK's output function for ``Task(..., margin_fn=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS = ("sum", "mean")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")


def _reduce_tokens(per_token: Tensor, valid: Tensor, reduction: str) -> Tensor:
    """``[B, ...]`` token losses and validity -> ``[B]``: Σ_{t valid} ℓ_t, or that / max(1, #valid). Invalid
    tokens are selected out, not multiplied by 0 (an infinite loss at a padding position stays out)."""
    per_token = torch.where(valid, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    flat = per_token.reshape(per_token.shape[0], -1).sum(1)
    if reduction == "sum":
        return flat
    count = valid.reshape(valid.shape[0], -1).sum(1).clamp_min(1).to(flat.dtype)
    return flat / count


def _cross_entropy_from_margin(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """Cross-entropy over the last dimension, ``logits [..., C]``, ``targets [...]`` -> ``[...]``, computed for
    C ≥ 2 classes as softplus(−f) with f = z_y − logsumexp_{k≠y} z_k the margin (one class: −log softmax); 0
    where ``valid`` is false (those targets are never read). The same function as −log softmax(z)_y, but its
    gradient −σ(−f)·∇f is accurate in float32 for confidently predicted targets.

    The usual form differentiates to softmax(z) − e_y, whose y entry p_y − 1 is rounded to a multiple of 2⁻²⁴: when
    1 − p_y is near that size the gradient is mostly rounding error (on a Fashion-MNIST CNN some rows were 94%
    wrong, which cost TRAK 0.003 LDS). Here σ(−f) is small but exact to float32's relative precision, and ∇f has
    entries 1 and −softmax over the other classes. softplus switches to its argument at log(2/eps) of the dtype
    (16.6 in float32, 36.7 in float64), beyond which 1 − σ is below half a unit of rounding: its default, 20,
    would drop e^−20 from float64 values, gradients and curvature. (``logaddexp(·, 0)`` is exact too, but its
    second derivative is NaN where a row's other logits are all −inf.) The y slot of the sum over k ≠ y holds
    the most negative finite value, not −inf: its exp underflows to 0 next to any finite logit, the sum stays
    ≥ 1, and a row whose other logits are all −inf gets loss 0 and a zero gradient, not NaN.

    Memory and time: the sum runs over a copy d of the logits whose y slot is overwritten *through a detached
    alias*, so autograd records only ``d = clone(z)`` and neither keeps a mask nor makes a second copy in the
    backward pass; exp and the shift by the row maximum m are in place. Like the log-softmax form it keeps one
    logits-sized buffer for the backward pass, which makes two, but it releases the kept one before the second,
    so the peak is lower (benchmarks/results/ce_tokens.md: 0.67× the memory, 1.1× the CPU
    time of forward + backward at [8, 128, 30522] and [4, 256, 50257]; ``torch.logsumexp`` over the copy
    takes 1.33× the memory and 2.1–2.5× the time). This is exact, not an approximation: exp of the y slot minus m
    is 0, and so is every derivative autograd takes through it (of any order, reverse or forward mode), each
    being a multiple of that 0. (Only when every other logit is −inf is m the fill value and the slot's exp 1;
    then σ(−f) = 0 multiplies it, unless z_y is −inf too, a row whose loss is inf.)"""
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    if logits.shape[-1] < 2:   # one class: no margin; −log softmax, 0 for its one target
        return torch.where(valid, -torch.log_softmax(logits, -1).gather(-1, safe).squeeze(-1), zero)
    zy = logits.gather(-1, safe).squeeze(-1)
    d = logits.clone()
    # index_put_ (vmap has a rule for it, not for scatter_), indexing every leading position and its target
    where_y = (*torch.meshgrid(*(torch.arange(n, device=logits.device) for n in safe.shape[:-1]), indexing="ij"),
               safe[..., 0])
    d.detach().index_put_(where_y, torch.tensor(torch.finfo(logits.dtype).min, dtype=logits.dtype,
                                                device=logits.device))
    m = d.detach().amax(-1, keepdim=True)
    e = d.sub_(m).exp_()   # in place: the exp is the one saved buffer
    x = e.sum(-1).log() + m.squeeze(-1) - zy
    loss = F.softplus(x, threshold=math.log(2 / torch.finfo(x.dtype).eps))
    return torch.where(valid, loss, zero)


def cross_entropy_per_example(logits: Tensor, targets: Tensor, *, mask: Tensor | None = None,
                              reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Cross-entropy per example.

    ``logits [B, C]`` with ``targets [B]`` -> ``[B]``: ℓ_i = −log softmax(z_i)[y_i].
    ``logits [B, T, C]`` with ``targets [B, T]`` (and optional ``mask [B, T]``) -> ``[B]``: the sum or mean
    (``reduction``) of token losses over the example's valid tokens (mask ≠ 0 and target ≠ ignore_index); more
    leading dimensions work the same way (the class dimension is the last).

    Computed as softplus of minus the margin z_y − logsumexp_{k≠y} z_k: the same values as −log softmax, but the
    float32 gradient of a confidently predicted target is exact to float32 precision, where the log-softmax
    form's target entry p_y − 1 is rounded to a multiple of 2⁻²⁴ (mostly rounding when 1 − p_y is that small).
    """
    _check_reduction(reduction)
    if logits.ndim < 2:
        raise ValueError(f"logits: expected [B, C] or [B, T, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits without the class "
                         f"dimension), got {tuple(targets.shape)}")
    if logits.ndim == 2 and mask is None:
        return _cross_entropy_from_margin(logits, targets, targets != ignore_index)
    valid = targets != ignore_index
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask: expected shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
        valid = valid & (mask != 0)
    return _reduce_tokens(_cross_entropy_from_margin(logits, targets, valid), valid, reduction)


def mse_per_example(outputs: Tensor, targets: Tensor, *, reduction: str = "mean") -> Tensor:
    """Squared error per example: ``[B, ...]`` -> ``[B]``, ℓ_i = mean_j (o_ij − t_ij)² (``reduction="sum"``: Σ_j).

    ``reduction`` means the same in every helper here: how an example's own elements (output entries,
    tokens) are combined, default ``"mean"`` (before, this helper summed while the cross-entropy averaged).

    >>> mse_per_example(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2))
    tensor([5.])
    >>> mse_per_example(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2), reduction="sum")
    tensor([10.])
    """
    _check_reduction(reduction)
    if outputs.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
    sq = (outputs - targets.to(outputs.dtype)).pow(2).reshape(outputs.shape[0], -1)
    return sq.sum(1) if reduction == "sum" else sq.mean(1)


def cross_entropy_output_derivatives(logits: Tensor, targets: Tensor, *,
                                    ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """``(e [B, K], t [B])`` float64, in closed form, for ``ℓ = cross_entropy_per_example(logits, targets)``
    (its default mean over valid tokens; K = the number of logits per example): e = ∂ℓ/∂z flattened and
    t = tr ∂²ℓ/∂z². Per valid position, with p = softmax(z) and y the target, the gradient is p − e_y and the
    Hessian diag(p) − ppᵀ, of trace 1 − ‖p‖²; positions average over the example's valid ones (both scale by
    1/n_valid), invalid ones contribute 0. No backward pass and no C × C matrix, so any number of classes.

    Both are computed from ε = Σ_{c≠y} p_c rather than from p_y: the y entry of the gradient is −ε and the
    trace ε(2 − ε) − Σ_{c≠y} p_c², which keeps their relative precision for a confidently predicted target
    (p_y = 1 to float64, ε ~ 1e-20), where 1 − p_y and 1 − ‖p‖² would be 0 — and a Gauss-Newton-trace weight
    tr/‖e‖² ≈ 2/ε would be 0/0.

    >>> e, t = cross_entropy_output_derivatives(torch.zeros(1, 2), torch.tensor([0]))   # p = (1/2, 1/2)
    >>> e, t
    (tensor([[-0.5000,  0.5000]], dtype=torch.float64), tensor([0.5000], dtype=torch.float64))
    """
    if logits.ndim < 2:
        raise ValueError(f"logits: expected [B, C] or [B, T, C], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets: expected shape {tuple(logits.shape[:-1])} (logits without the class "
                         f"dimension), got {tuple(targets.shape)}")
    B = logits.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).unsqueeze(-1)
    p = torch.softmax(logits.detach().to(torch.float64), -1)
    p_not = p.scatter(-1, safe, 0.0)                       # p with the target's entry set to 0
    eps = p_not.sum(-1)                                    # 1 − p_y, from the other classes
    e = p_not.scatter(-1, safe, -eps.unsqueeze(-1))        # p − e_y
    t = eps * (2 - eps) - p_not.pow(2).sum(-1)             # 1 − ‖p‖²
    zero = torch.zeros((), dtype=torch.float64, device=p.device)
    e = torch.where(valid.unsqueeze(-1), e, zero)
    t = torch.where(valid, t, zero)
    count = valid.reshape(B, -1).sum(1).clamp_min(1).to(torch.float64)
    return e.reshape(B, -1) / count[:, None], t.reshape(B, -1).sum(1) / count


def mse_output_derivatives(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(e [B, K], t [B])`` float64 for ``ℓ = mse_per_example(outputs, targets)`` (mean over the K entries of an
    example): e = 2(o − t)/K and the trace of the Hessian (2/K)·I, t = 2.

    >>> mse_output_derivatives(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2))
    (tensor([[1., 3.]], dtype=torch.float64), tensor([2.], dtype=torch.float64))
    """
    if outputs.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(outputs.shape)}, got {tuple(targets.shape)}")
    B = outputs.shape[0]
    r = (outputs.detach().to(torch.float64) - targets.to(torch.float64)).reshape(B, -1)
    return 2 * r / r.shape[1], torch.full((B,), 2.0, dtype=torch.float64, device=r.device)


class OutputLoss:
    """``loss_on_output(outputs, batch) -> [B]`` of :meth:`gradsketch.Task.from_classifier`: a per-example loss
    applied to ``batch[target_key]``, which also gives its output gradient and Hessian trace in closed form
    (:meth:`gradient_and_hessian_trace`, what TRAK's ``kernel="ggn_trace"`` reads; a ``loss_on_output`` of
    your own may define the same method). ``loss``: ``"cross_entropy"`` or ``"mse"``."""

    def __init__(self, loss: str = "cross_entropy", target_key: Any = 1) -> None:
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"loss: expected 'cross_entropy' or 'mse', got {loss!r}")
        self.loss, self.target_key = loss, target_key

    def __call__(self, outputs: Tensor, batch: Any) -> Tensor:
        per = cross_entropy_per_example if self.loss == "cross_entropy" else mse_per_example
        return per(outputs, _get(batch, self.target_key, "target_key"))

    def gradient_and_hessian_trace(self, outputs: Tensor, batch: Any) -> tuple[Tensor, Tensor]:
        """``(e [B, K], t [B])`` float64: each example's ∂ℓ/∂z (flattened) and tr ∂²ℓ/∂z² in closed form
        (:func:`cross_entropy_output_derivatives`, :func:`mse_output_derivatives`)."""
        fn = cross_entropy_output_derivatives if self.loss == "cross_entropy" else mse_output_derivatives
        return fn(outputs, _get(batch, self.target_key, "target_key"))

    def __repr__(self) -> str:
        return f"OutputLoss({self.loss!r}, target_key={self.target_key!r})"


def causal_lm_per_example(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                          reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy per sequence: ``logits [B, T, V]``, ``input_ids [B, T]`` -> ``[B]``.

    ℓ_i = reduce_{t ∈ V_i} −log p(x_{i,t+1} | x_{i,≤t}) (``logits[:, t]`` predicts ``input_ids[:, t+1]``),
    with V_i = {t < T−1 : m_{i,t} ≠ 0, m_{i,t+1} ≠ 0, x_{i,t+1} ≠ ignore_index} for the ``attention_mask`` m
    (all ones when omitted): a term counts only when both the predicting position and the target are real
    tokens. So neither left padding (the first real token, predicted from a padding position, is not
    counted) nor right padding (padding targets) contributes. ``reduction="sum"``: Σ over V_i; ``"mean"``:
    that / |V_i| (0 when V_i is empty).
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits/input_ids: expected [B, T, V] and [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(input_ids.shape)}")
    shift_mask = None
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (input_ids), got "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask != 0
        shift_mask = real[:, :-1] & real[:, 1:]
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



def _causal_lm_forward(model: Any, batch: Any) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(input_ids, attention_mask or None, logits [B, T, V])`` of a transformers causal LM (or a callable
    returning logits) on a dict batch, passing ``position_ids`` when the batch has them."""
    ids = _get(batch, "input_ids", "batch")
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    pos = batch.get("position_ids") if hasattr(batch, "get") else None
    kw = {} if pos is None else {"position_ids": pos}
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return ids, mask, (out.logits if hasattr(out, "logits") else out)

def causal_lm_loss(reduction: str = "mean") -> Callable[[torch.nn.Module, Any], Tensor]:
    """``loss_fn(model, batch)`` for a transformers causal LM and a batch dict with ``input_ids`` and
    (optionally) ``attention_mask`` and ``position_ids``: :func:`causal_lm_per_example` of
    ``model(...).logits``. For left-padded batches pass ``position_ids`` counted over the real tokens
    (e.g. ``(mask.cumsum(1) - 1).clamp_min(0)``): models that number positions 0, 1, ... from the first
    column would otherwise see a left-padded sequence at shifted positions."""
    _check_reduction(reduction)

    def loss_fn(model: torch.nn.Module, batch: Any) -> Tensor:
        ids, mask, logits = _causal_lm_forward(model, batch)
        return causal_lm_per_example(logits, ids, mask, reduction=reduction)

    return loss_fn


def causal_lm_token_losses() -> Callable[[torch.nn.Module, Any], Tensor]:
    """Per-token next-token losses of a transformers causal LM, ``token_loss(model, batch) -> [B, T − 1]``:
    entry ``[i, t]`` is −log p(x_{i,t+1} | x_{i,≤t}) (the target token t + 1), NaN where it is not a target
    (padding of ``attention_mask``, or the predicting position is padding). At least float32 (lower-precision
    logits are promoted), in the margin form of :func:`cross_entropy_per_example` (exact float32 gradients for
    confidently predicted tokens). The token-level form of
    :func:`causal_lm_loss` (its ``"mean"`` is the nan-mean of this over t), for
    :meth:`gradsketch.Attributor.topk_tokens` and :meth:`~gradsketch.Attributor.self_influence_tokens`.

    >>> fn = causal_lm_token_losses()
    >>> model = lambda input_ids, attention_mask=None: torch.zeros(*input_ids.shape, 4)   # uniform over 4 tokens
    >>> fn(model, {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])})
    tensor([[1.3863,    nan]])
    """

    def token_loss(model: Any, batch: Any) -> Tensor:
        ids, mask, logits = _causal_lm_forward(model, batch)
        z = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        tgt = ids[:, 1:]
        if mask is None:
            valid = torch.ones(tgt.shape, dtype=torch.bool, device=tgt.device)
        else:
            real = mask != 0
            valid = real[:, :-1] & real[:, 1:]
        # the margin form (accurate float32 gradients for confident tokens; see cross_entropy_per_example)
        nll = _cross_entropy_from_margin(z, tgt, valid)
        return torch.where(valid, nll, torch.full_like(nll, float("nan")))

    return token_loss


def classification_margin(input_key: Any = 0, target_key: Any = 1) -> Callable[[torch.nn.Module, Any], Tensor]:
    """TRAK's output function for a classifier: ``f = z_y − logsumexp_{j≠y} z_j = log p_y/(1 − p_y)``
    with logits ``z = model(batch[input_key])`` and labels ``y = batch[target_key]``; returns
    ``margin_fn(model, batch) -> [B]``.

    Dict batches (Hugging Face style) work too: with the default keys the labels are ``batch["labels"]`` and
    every other entry is passed to the model as a keyword argument; a named ``input_key`` is passed
    positionally. Model outputs may be logits ``[B, C]`` or carry them as ``.logits`` / ``["logits"]``.

    >>> m = torch.nn.Linear(2, 3, bias=False); _ = m.weight.data.copy_(torch.eye(3, 2))
    >>> classification_margin()(m, (torch.tensor([[2.0, 0.0]]), torch.tensor([0]))).detach().round(decimals=4)
    tensor([1.3069])
    """
    def margin_fn(model: torch.nn.Module, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            tkey = "labels" if target_key == 1 else target_key
            if tkey not in batch:
                raise ValueError(f"batch: expected the labels under {tkey!r} (target_key), got keys {sorted(batch)}")
            y = batch[tkey].long()
            out = (model(**{k: v for k, v in batch.items() if k != tkey}) if input_key == 0
                   else model(batch[input_key]))
        else:
            out = model(batch[input_key])
            y = batch[target_key].long()
        z = out.logits if hasattr(out, "logits") else (out["logits"] if isinstance(out, Mapping) else out)
        zy = z.gather(1, y[:, None])[:, 0]
        hit = torch.zeros_like(z).scatter(1, y[:, None], 1.0) > 0
        others = torch.where(hit, torch.full_like(z, float("-inf")), z)
        return zy - torch.logsumexp(others, dim=1)

    return margin_fn
