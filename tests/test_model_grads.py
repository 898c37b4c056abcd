"""Exact per-example gradients equal one ordinary backward pass per example (float64, 1e-10)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _helpers import cnn, digits, gpt2, loop_grads, mlp, token_batch

import gradsketch
from gradsketch.model import (
    Task,
    causal_lm_loss,
    causal_lm_per_example,
    classifier_loss,
    cross_entropy_per_example,
    mse_per_example,
)

TOL = 1e-10


def test_mlp_per_example_grads_match_loop():
    X, y = digits(12)
    model = mlp()
    G = Task(model, classifier_loss()).grads((X, y))
    ref = loop_grads(model, lambda i: F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), 12)
    assert G.shape == (12, sum(p.numel() for p in model.parameters()))
    assert G.dtype == torch.float64
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)


def test_cnn_per_example_grads_match_loop_and_loop_mode():
    X, y = digits(8, image=True)
    model = cnn()
    task = Task(model, classifier_loss())
    G = task.grads((X, y))
    ref = loop_grads(model, lambda i: F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), 8)
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)
    G_loop = Task(model, classifier_loss(), per_example="loop").grads((X, y))
    torch.testing.assert_close(G_loop, ref, atol=TOL, rtol=0)


def test_gpt2_per_example_grads_match_loop_and_padding_changes_nothing():
    model = gpt2()
    batch = token_batch(3, 10, pad_rows={1: 6})
    task = Task(model, causal_lm_loss(reduction="mean"))
    G = task.grads(batch)
    assert not gradsketch.gradients.uses_loop(task)  # eager attention: vmap traces GPT-2

    def one(i):
        ids, m = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
        return causal_lm_per_example(model(input_ids=ids, attention_mask=m).logits, ids, m)[0]

    torch.testing.assert_close(G, loop_grads(model, one, 3), atol=TOL, rtol=0)
    # the padded example alone, unpadded, has the same gradient
    alone = {"input_ids": batch["input_ids"][1:2, :6], "attention_mask": batch["attention_mask"][1:2, :6]}
    torch.testing.assert_close(G[1], task.grads(alone)[0], atol=TOL, rtol=0)


def test_vmap_failure_falls_back_to_loop_with_warning():
    # sdpa attention in transformers checks the mask with data-dependent control flow: vmap cannot trace it
    model = gpt2(attn="sdpa")
    batch = token_batch(2, 8, pad_rows={0: 5})
    task = Task(model, causal_lm_loss())
    import pytest

    with pytest.warns(RuntimeWarning, match="falling back"):
        G = task.grads(batch)
    ref = Task(gpt2(attn="eager"), causal_lm_loss()).grads(batch)
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)


def test_param_selection_globs_modules_and_order():
    model = mlp()
    X, y = digits(5)
    full = Task(model, classifier_loss()).grads((X, y))
    t = Task(model, classifier_loss(), params=["2.*"])
    assert t.param_names == ["2.weight", "2.bias"]
    torch.testing.assert_close(t.grads((X, y)), full[:, -(16 * 10 + 10):], atol=TOL, rtol=0)
    t2 = Task(model, classifier_loss(), params=[model[0]])
    assert t2.param_names == ["0.weight", "0.bias"] and t2.n_params == 64 * 16 + 16
    torch.testing.assert_close(t2.grads((X, y)), full[:, :t2.n_params], atol=TOL, rtol=0)
    frozen = mlp()
    frozen[0].weight.requires_grad_(False)
    assert "0.weight" not in Task(frozen, classifier_loss()).param_names


def test_dict_batches_buffers_and_train_mode_without_randomness():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10).double()
            self.register_buffer("shift", torch.linspace(-1, 1, 64, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x + self.shift)

    X, y = digits(6)
    model = Net().train()
    task = Task(model, lambda m, b: cross_entropy_per_example(m(b["x"]), b["y"]))
    G = task.grads({"x": X, "y": y, "note": "ignored", "scale": torch.tensor(1.0)})
    ref = loop_grads(model, lambda i: F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), 6)
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)


def test_dropout_randomness_differs_per_example_in_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(64, 10)).double().train()
    X, y = digits(4)
    Xs = X[:1].repeat(4, 1)
    G = Task(model, classifier_loss()).grads((Xs, y[:1].repeat(4)))
    assert not torch.allclose(G[0], G[1])  # same input, independent dropout masks
    Gs = Task(model, classifier_loss(), randomness="same").grads((Xs, y[:1].repeat(4)))
    torch.testing.assert_close(Gs[0], Gs[1])


def test_loss_helpers():
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    tgt = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    per_tok = F.cross_entropy(logits.reshape(-1, 7), tgt.reshape(-1), reduction="none").reshape(3, 5)
    s = cross_entropy_per_example(logits, tgt, mask=mask, reduction="sum")
    torch.testing.assert_close(s, (per_tok * mask).sum(1))
    m = cross_entropy_per_example(logits, tgt, mask=mask, reduction="mean")
    torch.testing.assert_close(m, (per_tok * mask).sum(1) / mask.sum(1))
    ids = torch.randint(0, 7, (3, 5))
    c = causal_lm_per_example(logits, ids, mask, reduction="sum")
    pt = F.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none")
    pt = pt.reshape(3, 4)
    torch.testing.assert_close(c, (pt * mask[:, 1:]).sum(1))
    o, t = torch.randn(4, 3), torch.randn(4, 3)
    # one meaning of reduction: the default combines an example's elements by their mean, as for tokens
    torch.testing.assert_close(mse_per_example(o, t, reduction="sum"), ((o - t) ** 2).sum(1))
    torch.testing.assert_close(mse_per_example(o, t), ((o - t) ** 2).mean(1))


def test_cross_entropy_gradient_accurate_in_float32_for_confident_examples():
    """[B, C] cross-entropy is computed as softplus(−margin): the value equals F.cross_entropy (float64), and the
    float32 gradient matches the exact p − e_y (float64 from the same float32 logits) to float32's relative
    precision even where 1 − p_y is near 2⁻²⁴, where the softmax-minus-one-hot form is mostly rounding error."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    z[0, 2], z[1, 1] = 25.0, 17.0   # 1 − p_y ≈ e^(−25 + ...) and e^(−17 + ...): below / near float32's resolution of 1
    y = torch.tensor([2, 1, 0, 4, -100, 3])
    torch.testing.assert_close(cross_entropy_per_example(z, y), F.cross_entropy(z, y, reduction="none"),
                               rtol=1e-13, atol=1e-15)
    z32 = z.float()
    p = torch.softmax(z32.double(), 1)
    ref = p - F.one_hot(y.clamp_min(0), 5).double()
    ref[4] = 0.0   # ignore_index: loss 0 and no gradient
    zg = z32.clone().requires_grad_(True)
    got = torch.autograd.grad(cross_entropy_per_example(zg, y).sum(), zg)[0].double()
    rel = (got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)
    assert float(rel.max()) < 1e-5 and float(got[4].abs().max()) == 0.0
    zo = z32.clone().requires_grad_(True)   # the form it replaces, for contrast: row 0 is mostly rounding
    old = torch.autograd.grad(F.cross_entropy(zo, y, reduction="none").sum(), zo)[0].double()
    assert float(((old - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300))[0]) > 0.1


def test_cross_entropy_second_derivatives_and_edge_cases():
    """The Hessian in the logits is diag(p) − ppᵀ (float64, double backward and forward-over-reverse); a row
    whose other logits are all −inf has loss 0 and gradient 0 (no NaN); one class falls back to F.cross_entropy."""
    from torch.func import grad, jvp

    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    H = torch.autograd.functional.hessian(lambda t: cross_entropy_per_example(t, y).sum(), z)
    p = torch.softmax(z, 1)
    v = torch.randn(3, 4, generator=g, dtype=torch.float64)
    hv = jvp(grad(lambda t: cross_entropy_per_example(t, y).sum()), (z,), (v,))[1]
    for i in range(3):
        Hi = torch.diag(p[i]) - torch.outer(p[i], p[i])
        torch.testing.assert_close(H[i, :, i, :], Hi, rtol=0, atol=1e-14)
        torch.testing.assert_close(hv[i], Hi @ v[i], rtol=0, atol=1e-14)
    zi = torch.tensor([[0.0, float("-inf"), float("-inf")]], dtype=torch.float64, requires_grad=True)
    loss = cross_entropy_per_example(zi, torch.tensor([0]))
    assert float(loss) == 0.0 and torch.equal(torch.autograd.grad(loss.sum(), zi)[0], torch.zeros(1, 3,
                                                                                                 dtype=torch.float64))
    one = torch.randn(4, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cross_entropy_per_example(one, torch.zeros(4, dtype=torch.long)), torch.zeros(4,
                               dtype=torch.float64))


def test_loss_values_and_flatten_roundtrip():
    model = mlp()
    X, y = digits(7)
    task = Task(model, classifier_loss())
    torch.testing.assert_close(task.loss((X, y)), F.cross_entropy(model(X), y, reduction="none"))
    v = torch.randn(task.n_params, dtype=torch.float64)
    torch.testing.assert_close(task.flatten(task.unflatten(v)), v)
