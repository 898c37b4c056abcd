"""gradsketch.eval: metrics against hand-computed values, retraining harness, LOO vs influence functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradsketch.attribution import Attributor, batches
from gradsketch.eval import (
    flip_labels,
    ground_truth,
    lds,
    lds_ground_truth,
    load_model,
    load_models,
    loo_correlation,
    loo_effects,
    make_mlp,
    mislabel_detection,
    model_outputs,
    subset_masks,
    train_models,
)
from gradsketch.model import Task


def test_lds_hand_computed():
    scores = np.array([[1.0, 2.0, 4.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])  # predictions 1, 2, 3, 4
    assert lds(scores, masks, np.array([[10.0], [20], [30], [40]])).mean == pytest.approx(1.0)
    assert lds(scores, masks, np.array([[4.0], [3], [2], [1]])).mean == pytest.approx(-1.0)
    # ranks (1,3,2,4) vs (1,2,3,4): 1 - 6 Σd² / (n(n² - 1)) = 1 - 12/60
    assert lds(scores, masks, np.array([[1.0], [3], [2], [4]])).mean == pytest.approx(0.8)
    two = lds(np.vstack([scores, -scores]), masks, np.array([[1.0, 1], [3, 3], [2, 2], [4, 4]]))
    np.testing.assert_allclose(two.per_target, [0.8, -0.8])
    assert two.mean == pytest.approx(0.0)
    with pytest.raises(ValueError, match="outputs: expected shape"):
        lds(scores, masks, np.zeros((3, 1)))


def test_mislabel_detection_hand_computed():
    r = mislabel_detection(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True]))
    assert r.auc == pytest.approx(0.75)  # 3 of the 4 (flipped, clean) pairs ordered correctly
    assert r.ap == pytest.approx((1 + 2 / 3) / 2)  # precision at each flipped example's rank
    with pytest.raises(ValueError, match="both flipped and clean"):
        mislabel_detection([1.0, 2.0], [True, True])


def test_flip_labels_and_subset_masks():
    y = torch.arange(100) % 10
    y2, flipped = flip_labels(y, 0.1, 10, seed=3)
    assert int(flipped.sum()) == 10 and torch.all(y2[flipped] != y[flipped]) and torch.equal(y2[~flipped], y[~flipped])
    m = subset_masks(50, 7, alpha=0.3, seed=1)
    assert m.shape == (7, 50) and torch.all(m.sum(1) == 15)
    assert torch.equal(m, subset_masks(50, 7, alpha=0.3, seed=1))


def _lr_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = (X @ w + 0.8 * torch.randn(80, 3, generator=g, dtype=torch.float64)).argmax(1)
    Xt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    yt = (Xt @ w).argmax(1)
    return X, y, Xt, yt


def test_loo_matches_influence_on_logistic_regression():
    """Convex model trained to its optimum (L-BFGS, weight decay wd): removing example i changes the test loss
    by ≈ g_testᵀ (H + wd·I)⁻¹ g_i / n (first order; Koh & Liang 2017) = influence score / n. Checks sign and
    scale of the Attributor's influence scores against actual retraining."""
    X, y, Xt, yt = _lr_problem()
    wd, n = 0.05, X.shape[0]

    def mf():
        return make_mlp((4, 3), dtype=torch.float64)

    kw = dict(optimizer="lbfgs", steps=500, weight_decay=wd)
    idx = list(range(0, 80, 8))
    eff = loo_effects(mf, (X, y), (Xt, yt), idx, output="loss", **kw)
    model = load_model(mf, train_models(mf, X, y, **kw))
    task = Task.from_classifier(model)
    S = Attributor(task, "influence", damping=wd).fit(batches(X, y, batch_size=40), progress=False)\
        .score([(Xt, yt)], progress=False)
    pred = S[:, idx].T / n
    pearson, spearman = loo_correlation(pred, eff)
    assert pearson > 0.98 and spearman > 0.95
    big = eff.abs() > eff.abs().max() * 0.2
    assert torch.all(torch.sign(pred[big]) == torch.sign(eff[big]))
    # first order only, and the retrained objective averages over n - 1 examples (a shift of the data/weight-decay
    # balance common to every i): agreement within 30% on the large effects
    torch.testing.assert_close(pred[big], eff[big], rtol=0.3, atol=0)


def test_train_models_vectorised_equals_one_by_one():
    X, y, Xt, yt = _lr_problem()
    X, Xt = X.float(), Xt.float()

    def mf():
        return make_mlp((4, 6, 3))

    masks = torch.ones(3, 80, dtype=torch.bool)
    masks[1, :40] = False
    together = train_models(mf, X, y, masks, seeds=[0, 1, 2], steps=8, lr=1e-2)
    for m in range(3):
        alone = train_models(mf, X, y, masks[m:m + 1], seeds=[m], steps=8, lr=1e-2)
        for k in alone:
            torch.testing.assert_close(together[k][m], alone[k][0], rtol=1e-4, atol=1e-5)
    o = model_outputs(mf, together, Xt, yt, "margin")
    assert o.shape == (3, 6)
    lp = model_outputs(mf, together, Xt, yt, "logprob")
    torch.testing.assert_close(model_outputs(mf, together, Xt, yt, "loss"), -lp)
    # margin = log p/(1 - p)
    torch.testing.assert_close(o, lp - torch.log1p(-lp.exp()), rtol=1e-4, atol=1e-4)
    # load_models: every stacked model as a module, in order
    ms = load_models(mf, together)
    assert len(ms) == 3
    for m, mod in enumerate(ms):
        torch.testing.assert_close(mod(Xt), load_model(mf, together, m)(Xt), rtol=0, atol=0)
    assert not torch.equal(ms[0](Xt), ms[1](Xt))


def test_lds_ground_truth_cache_resumes(tmp_path, monkeypatch):
    X, y, Xt, yt = _lr_problem()
    X, Xt = X.float(), Xt.float()

    def mf():
        return make_mlp((4, 3))

    kw = dict(n_subsets=6, n_runs=2, group=2, steps=20, lr=0.05, progress=False)
    trained = []  # the subset masks of every train_models call, to see which groups were (re)trained
    real = ground_truth.train_models

    def counting(model_fn, X, y, masks, **k):
        trained.append(masks.clone())
        return real(model_fn, X, y, masks, **k)

    monkeypatch.setattr(ground_truth, "train_models", counting)
    a = lds_ground_truth(mf, (X, y), (Xt, yt), cache=tmp_path, **kw)
    assert len(trained) == 3  # groups 0, 2, 4 of two subsets each
    (tmp_path / "group_00002.npy").unlink()
    trained.clear()
    b = lds_ground_truth(mf, (X, y), (Xt, yt), cache=tmp_path, **kw)
    # only the deleted group (subsets 2 and 3, n_runs models each) was retrained; the others came from the cache
    assert len(trained) == 1 and torch.equal(trained[0], a.masks[2:4].repeat_interleave(2, 0))
    torch.testing.assert_close(a.outputs, b.outputs)
    assert torch.equal(a.masks, b.masks) and a.outputs.shape == (6, 6)
    # a complete cache trains nothing, and its files are what is returned (not a recomputation)
    trained.clear()
    np.save(tmp_path / "group_00004.npy", np.full((2, 6), 7.0))
    c = lds_ground_truth(mf, (X, y), (Xt, yt), cache=tmp_path, **kw)
    assert trained == [] and torch.equal(c.outputs[4:], torch.full((2, 6), 7.0, dtype=torch.float64))
    torch.testing.assert_close(c.outputs[:4], a.outputs[:4])
    with pytest.raises(ValueError, match="another configuration"):
        lds_ground_truth(mf, (X, y), (Xt, yt), cache=tmp_path, **{**kw, "n_runs": 3})
