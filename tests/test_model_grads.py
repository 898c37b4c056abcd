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


def test_loss_values_and_flatten_roundtrip():
    model = mlp()
    X, y = digits(7)
    task = Task(model, classifier_loss())
    torch.testing.assert_close(task.loss((X, y)), F.cross_entropy(model(X), y, reduction="none"))
    v = torch.randn(task.n_params, dtype=torch.float64)
    torch.testing.assert_close(task.flatten(task.unflatten(v)), v)
