"""Token-level cross-entropy in the margin form (softplus of minus the margin, any leading shape).

The reference everywhere is the log-softmax form the token paths used before (written out here), in float64:
values, gradients, double-backward Hessian-vector products and forward-mode derivatives must equal it; in
float32 the gradient of confidently predicted tokens must match the exact float64 value, which the
log-softmax form cannot (its target entry p_y − 1 is rounded to a multiple of 2⁻²⁴).
"""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vmap

from gradsketch.model.losses import causal_lm_per_example, causal_lm_token_losses, cross_entropy_per_example

INF = float("inf")


def _log_softmax_form(logits, targets, mask=None, reduction="mean", ignore_index=-100):
    """The token path before the margin form: −log_softmax(z)[y] over valid tokens, sum or mean per example."""
    valid = targets != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    tok = -torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    tok = torch.where(valid, tok, torch.zeros((), dtype=tok.dtype)).reshape(len(tok), -1)
    count = valid.reshape(len(valid), -1).sum(1)
    return tok.sum(1) if reduction == "sum" else tok.sum(1) / count.clamp_min(1).to(tok.dtype)


def _case(seed=0, B=4, T=6, V=9, dtype=torch.float64):
    """Random logits with confident targets (margins up to 40: beyond F.softplus's threshold of 20), one
    ignore_index target, one padded tail, one all-masked row and −inf logits away from the target."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g, dtype=dtype) * 3
    y = torch.randint(0, V, (B, T), generator=g)
    z[0, 0, y[0, 0]] = 40.0
    z[0, 1, y[0, 1]] = 17.0
    z[1, 2, y[1, 2]] = -30.0   # confidently wrong: loss > 36.7 (float64 softplus is linear there)
    z[2, 0, y[2, 0]] = -20.0   # loss ≈ 27: F.softplus's default threshold (20) would be e^−27 off here
    z[2, 3, :] = -INF
    z[2, 3, y[2, 3]] = 1.5                              # every other logit −inf: loss 0
    z[2, 4, (y[2, 4] + 1) % V] = -INF                   # one −inf logit
    z[1, 0, :4] = -INF
    y[1, 0] = 5                                         # −inf logits before a finite target
    y[0, 2] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, :] = 0                                      # an all-masked row
    return z, y, mask


def _exact_grad(z32, y, weight):
    """∂/∂z Σ weight·ℓ at float32 logits, computed in float64: p off the target and −(1 − p_y) at it, with
    1 − p_y = σ(logsumexp_{k≠y} z_k − z_y) (not p_y − 1, whose float64 rounding is not small next to e^−40)."""
    z = z32.double()
    safe = y.clamp_min(0).unsqueeze(-1)
    one_minus = (torch.logsumexp(z.scatter(-1, safe, -INF), -1) - z.gather(-1, safe)[..., 0]).sigmoid()
    ref = torch.softmax(z, -1).scatter(-1, safe, -one_minus.unsqueeze(-1))
    return ref * weight.unsqueeze(-1)


def test_values_and_gradients_equal_the_log_softmax_form_in_float64():
    z, y, mask = _case()
    for reduction in ("sum", "mean"):
        for m in (None, mask):
            new = cross_entropy_per_example(z, y, mask=m, reduction=reduction)
            old = _log_softmax_form(z, y, m, reduction)
            torch.testing.assert_close(new, old, rtol=1e-13, atol=1e-13)
            zg = z.clone().requires_grad_(True)
            gn = torch.autograd.grad(cross_entropy_per_example(zg, y, mask=m, reduction=reduction).sum(), zg)[0]
            go = torch.autograd.grad(_log_softmax_form(zg, y, m, reduction).sum(), zg)[0]
            torch.testing.assert_close(gn, go, rtol=0, atol=1e-14)
    assert float(cross_entropy_per_example(z, y, mask=mask)[3]) == 0.0   # all-masked row: 0, not NaN
    # a −inf target logit at a valid position is an infinite loss in both forms; at a masked one it drops out
    zi = z.clone()
    zi[0, 3, y[0, 3]] = -INF
    assert float(cross_entropy_per_example(zi, y, mask=mask)[0]) == INF == float(_log_softmax_form(zi, y, mask)[0])
    mi = mask.clone()
    mi[0, 3] = 0
    torch.testing.assert_close(cross_entropy_per_example(zi, y, mask=mi), _log_softmax_form(zi, y, mi),
                               rtol=1e-13, atol=1e-13)
    # 3 leading dimensions, a custom ignore_index, and the [B, C] path (same function, no mask)
    z4 = z.reshape(2, 2, 6, 9)
    y4 = torch.where(y == -100, -1, y).reshape(2, 2, 6)
    torch.testing.assert_close(cross_entropy_per_example(z4, y4, ignore_index=-1),
                               _log_softmax_form(z4, y4, ignore_index=-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(cross_entropy_per_example(z[:, 0], y[:, 0]), _log_softmax_form(z[:, :1], y[:, :1]),
                               rtol=1e-13, atol=1e-13)


def test_float32_gradient_of_confident_tokens_is_exact_to_float32_precision():
    """1 − p_y down to e^−40 (far below float32's 2⁻²⁴ spacing at 1): the log-softmax form's gradient rows are
    then almost all rounding (checked here too, so the test would fail on it); the margin form's agree with the
    exact value to float32 precision, through every token path."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 3, 8, 50
    z = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    lift = torch.linspace(0.0, 45.0, B * T)[torch.randperm(B * T, generator=g)].reshape(B, T)
    z.scatter_(-1, y[..., None], (z.max(-1).values + lift - 5.0)[..., None])
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 6:] = 0
    confident = (torch.softmax(z.double(), -1).gather(-1, y[..., None])[..., 0] > 1 - 1e-7) & (mask != 0)
    assert int(confident.sum()) >= 8

    def rel_err(got, ref):
        return (got.double() - ref).norm(dim=-1) / ref.norm(dim=-1)

    weight = mask.double() / mask.sum(1, keepdim=True)   # reduction="mean" over each row's valid tokens
    ref = _exact_grad(z, y, weight)
    zg = z.clone().requires_grad_(True)
    got = torch.autograd.grad(cross_entropy_per_example(zg, y, mask=mask).sum(), zg)[0]
    assert float(rel_err(got, ref)[mask != 0].max()) < 1e-5
    assert float(got[2, 6:].abs().max()) == 0.0
    old = torch.autograd.grad(_log_softmax_form(zg, y, mask).sum(), zg)[0]
    assert float(rel_err(old, ref)[confident].max()) > 0.5   # the form it replaces: mostly rounding

    # causal_lm_per_example (logits[:, t] predicts ids[:, t + 1]) and causal_lm_token_losses (per token)
    ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), y], 1)
    zc = torch.cat([z, torch.randn(B, 1, V, generator=g)], 1).requires_grad_(True)
    am = torch.cat([mask[:, :1], mask], 1)
    got = torch.autograd.grad(causal_lm_per_example(zc, ids, am, reduction="sum").sum(), zc)[0][:, :-1]
    assert float(rel_err(got, _exact_grad(z, y, mask.double()))[mask != 0].max()) < 1e-5

    def model(input_ids, attention_mask=None):
        return zc

    tok = causal_lm_token_losses()(model, {"input_ids": ids, "attention_mask": am})
    got = torch.autograd.grad(tok.nan_to_num().sum(), zc)[0][:, :-1]
    assert float(rel_err(got, _exact_grad(z, y, mask.double()))[mask != 0].max()) < 1e-5


def test_hessian_vector_products_and_forward_mode_equal_the_log_softmax_form():
    """The curvature paths differentiate the loss twice: double backward, forward-over-reverse (torch.func) and
    plain forward mode, also per example under vmap, all equal the log-softmax form's in float64."""
    z, y, mask = _case(seed=1)
    g = torch.Generator().manual_seed(2)
    v = torch.randn(z.shape, generator=g, dtype=torch.float64)
    v[2, 3] = 0.0   # forward mode through a −inf logit: a nonzero tangent there is NaN in both forms

    def f_new(t):
        return cross_entropy_per_example(t, y, mask=mask).sum()

    def f_old(t):
        return _log_softmax_form(t, y, mask).sum()

    zg = z.clone().requires_grad_(True)
    hv = []
    for f in (f_new, f_old):
        gz = torch.autograd.grad(f(zg), zg, create_graph=True)[0]
        hv.append(torch.autograd.grad(gz, zg, v)[0])
    torch.testing.assert_close(hv[0], hv[1], rtol=0, atol=1e-14)
    assert float(hv[0].abs().max()) > 1e-3
    torch.testing.assert_close(jvp(grad(f_new), (z,), (v,))[1], hv[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(jvp(f_new, (z,), (v,))[1], jvp(f_old, (z,), (v,))[1], rtol=1e-13, atol=1e-13)

    def per_example(f):
        def one(zi, yi, mi, vi):
            def loss(t):
                return f(t[None], yi[None], mask=mi[None]).sum()

            return grad(loss)(zi), jvp(grad(loss), (zi,), (vi,))[1]
        return vmap(one)(z, y, mask, v)

    (gn, hn), (go, ho) = per_example(cross_entropy_per_example), per_example(_log_softmax_form)
    torch.testing.assert_close(gn, go, rtol=0, atol=1e-14)
    torch.testing.assert_close(hn, ho, rtol=0, atol=1e-14)


def test_causal_lm_token_losses_nan_placement_and_dtypes():
    """NaN exactly where the target or the predicting position is padding (left and right padding), the
    log-softmax form's values elsewhere; logits below float32 are promoted to float32, float64 kept."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 20, (3, 6), generator=g)
    am = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    logits = torch.randn(3, 6, 20, generator=g, dtype=torch.float64) * 4

    def fn(z, mask):
        batch = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
        return causal_lm_token_losses()(lambda input_ids, attention_mask=None: z, batch)

    out = fn(logits, am)
    valid = (am[:, :-1] != 0) & (am[:, 1:] != 0)
    assert torch.equal(out.isnan(), ~valid)
    ref = -torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-13, atol=1e-13)
    assert out.dtype == torch.float64
    full = fn(logits, None)
    assert not full.isnan().any()
    torch.testing.assert_close(full, ref, rtol=1e-13, atol=1e-13)
    for low in (torch.float16, torch.bfloat16):
        o = fn(logits.to(low), am)
        assert o.dtype == torch.float32 and torch.equal(o.isnan(), ~valid)
        r = -torch.log_softmax(logits.to(low)[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(o[valid], r[valid], rtol=1e-5, atol=1e-5)
    # cross_entropy_per_example keeps the logits' dtype, as before
    assert cross_entropy_per_example(logits.to(torch.bfloat16), ids).dtype == torch.bfloat16


def test_saves_one_logits_sized_buffer_like_the_log_softmax_form():
    """Memory: autograd keeps one logits-sized tensor for the backward pass, as log_softmax does (no mask, no
    second copy); measured peaks and times are in benchmarks/results/ce_tokens.md."""
    z, y, mask = _case(V=64)
    zg = z.clone().requires_grad_(True)
    for f in (cross_entropy_per_example, _log_softmax_form):
        big = {}   # storage -> bytes: a tensor saved by two nodes (log_softmax's output, by gather too) counts once

        def pack(t, big=big):
            if t.numel() >= z.numel() and t.data_ptr() != zg.data_ptr():
                big[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            f(zg, y, mask=mask).sum()
        assert list(big.values()) == [z.numel() * z.element_size()], (f.__name__, big)
