"""Per-token attribution for a causal LM (issue 19; bergson #33, kronfluence #34): topk_tokens and
self_influence_tokens on a GPT-2 built from a config (random weights, float64) against brute-force per-token
gradients, one backward pass per token, and streamed a block of tokens at a time."""

from __future__ import annotations

import pytest
import torch
from _helpers import gpt2, loop_grads, token_batch

from gradsketch import Attributor, Task
from gradsketch.model.losses import causal_lm_loss, causal_lm_token_losses


@pytest.fixture(scope="module")
def lm():
    model = gpt2()
    task = Task(model, causal_lm_loss())
    train = [token_batch(B=3, T=8, seed=0), token_batch(B=3, T=8, seed=1, pad_rows={2: 6})]
    query = [token_batch(B=2, T=8, seed=2, pad_rows={1: 5})]
    ps = [p for _, p in task.named_params]
    # exact per-sequence training gradients and per-token query gradients (one backward pass each)
    rows = [(b, i) for b in train for i in range(3)]
    G = loop_grads(model, lambda j: causal_lm_loss()(model, {k: v[rows[j][1]:rows[j][1] + 1]
                                                              for k, v in rows[j][0].items()})[0], len(rows), ps)
    q = query[0]
    L = causal_lm_token_losses()(model, q)
    targets = [(int(i), int(t)) for i, t in torch.isfinite(L).nonzero().tolist()]
    Gt = loop_grads(model, lambda j: causal_lm_token_losses()(model, {k: v[targets[j][0]:targets[j][0] + 1]
                                                                       for k, v in q.items()})[0, targets[j][1]],
                    len(targets), ps)
    return task, train, query, G, Gt, targets


def _check(top, S, targets, k):
    assert top.tokens.tolist() == [list(t) for t in targets]
    ref = torch.topk(S, k, dim=1)
    torch.testing.assert_close(top.values.double(), ref.values, rtol=1e-9, atol=1e-12)
    assert torch.equal(top.indices, ref.indices)
    low = torch.topk(S, k, dim=1, largest=False)
    torch.testing.assert_close(top.opponent_values.double(), low.values, rtol=1e-9, atol=1e-12)
    assert torch.equal(top.opponent_indices, low.indices)


def test_unsketched_grad_dot_per_token_equals_brute_force(lm, monkeypatch):
    task, train, query, G, Gt, targets = lm
    assert len(targets) == 7 + 4  # 8 tokens -> 7 targets; the padded row has 5 real tokens -> 4
    a = Attributor(task, "grad-dot").fit(train, progress=False)
    seen = []
    real = type(a)._score_block
    monkeypatch.setattr(type(a), "_score_block", lambda self, psis, blocks: seen.append(psis[0].shape[0])
                        or real(self, psis, blocks))
    top = a.topk_tokens(query, k=3, block_tokens=4, progress=False)
    assert max(seen) <= 4  # scored four tokens at a time: never the n_tokens × n_train matrix
    _check(top, Gt @ G.T, targets, 3)
    si = a.self_influence_tokens(query, block_tokens=4, progress=False)
    assert si.shape == (2, 7) and bool(torch.isnan(si[1, 4:]).all())
    ref = torch.full((2, 7), float("nan"), dtype=torch.float64)
    for (i, t), v in zip(targets, (Gt * Gt).sum(1)):
        ref[i, t] = v
    torch.testing.assert_close(si, ref, rtol=1e-9, atol=1e-12, equal_nan=True)


def test_sketched_trak_per_token_uses_the_fitted_sketch_and_kernel(lm):
    task, train, query, G, Gt, targets = lm
    a = Attributor(task, "trak", sketch=dict(d=32, seed=1)).fit(train, progress=False)
    assert a.mode == "factored"  # the default on this GPT-2: per-layer sketches, no per-token gradient formed
    comp = a._components[0]
    F, Ft = comp.sketch(G), comp.sketch(Gt)
    S = comp.kernel(Ft) @ F.T
    _check(a.topk_tokens(query, k=2, block_tokens=5, progress=False), S, targets, 2)
    si = a.self_influence_tokens(query, progress=False)
    torch.testing.assert_close(si[~torch.isnan(si)], (comp.kernel(Ft) * Ft).sum(1), rtol=1e-8, atol=1e-12)


def test_per_token_needs_loss_gradient_features(lm):
    from gradsketch.attribution import classification_margin

    task, train, query, *_ = lm
    a = Attributor(task, "grad-dot").fit(train, progress=False)
    with pytest.raises(ValueError, match="token_loss: expected per-token losses"):
        a.topk_tokens(query, token_loss=causal_lm_loss(), progress=False)
    t = Attributor(task, "trak", margin_fn=classification_margin())
    t._fitted = True
    t._fit_fingerprint = a._fit_fingerprint
    with pytest.raises(ValueError, match="per-token attribution differentiates each token's loss"):
        t.topk_tokens(query, progress=False)
