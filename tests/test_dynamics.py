"""gradsketch.dynamics: post-hoc, online and embedded CMD against exact answers (float64)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from gradsketch.dynamics import (
    CONSTANT,
    KEPT,
    EmbeddedCMD,
    Layout,
    OnlineCMD,
    accuracy,
    cmd,
    cmd_model,
    evaluate_snapshots,
)


def planted(n_per_mode=(40, 30, 20), e=12, seed=0, n_const=3):
    """Weights that are exact affine copies of 3 reference trajectories, plus constant weights."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, e)
    refs = np.stack([np.exp(-3 * t), np.sin(5 * t), t ** 3 - t])
    rows, modes, a, b = [], [], [], []
    for m, k in enumerate(n_per_mode):
        am = rng.uniform(0.5, 2.0, k) * rng.choice([-1, 1], k)
        bm = rng.normal(size=k)
        am[0], bm[0] = 1.0, 0.0            # the reference itself is a member
        rows.append(am[:, None] * refs[m] + bm[:, None])
        modes += [m] * k
        a.append(am)
        b.append(bm)
    consts = rng.normal(size=n_const)
    rows.append(np.repeat(consts[:, None], e, axis=1))
    x = np.concatenate(rows)
    perm = rng.permutation(len(x))
    modes = np.array(modes + [-1] * n_const)[perm]
    a = np.concatenate(a + [np.zeros(n_const)])[perm]
    b = np.concatenate(b + [consts])[perm]
    return x[perm], modes, a, b, refs


@pytest.mark.parametrize("sampling", ["layer", "uniform", "variance"])
def test_planted_modes_recovered_exactly(sampling):
    x, modes, a, b, refs = planted()
    res = cmd(torch.from_numpy(x), n_modes=3, n_samples=60, sampling=sampling, seed=1,
              layers=[("l0", 0, 50), ("l1", 0 + 50, 93)])
    assert res.n_modes == 3
    # modes agree up to relabelling: map found -> planted through the references
    found = res.modes.copy()
    assert set(np.flatnonzero(found == CONSTANT)) == set(np.flatnonzero(modes == -1))
    mapping = {m: modes[res.ref_index[m]] for m in range(3)}
    assert sorted(mapping.values()) == [0, 1, 2]
    moving = found >= 0
    assert np.array_equal(np.vectorize(mapping.get)(found[moving]), modes[moving])
    # each reference is an exact affine copy of its planted reference; a, b are the planted ones once the
    # reference's own (a, b) is divided out
    for m in range(3):
        r = res.ref_traj[m]
        p = mapping[m]
        ar, br = a[res.ref_index[m]], b[res.ref_index[m]]
        np.testing.assert_allclose(r, ar * refs[p] + br, atol=1e-12)
        mem = np.flatnonzero(found == m)
        np.testing.assert_allclose(res.a[mem] * ar, a[mem], atol=1e-10)
        np.testing.assert_allclose(res.a[mem] * br + res.b[mem], b[mem], atol=1e-10)
    np.testing.assert_allclose(res.reconstruct().numpy(), x, atol=1e-10)
    assert res.rel_error < 1e-12 and all(v < 1e-12 for v in res.layer_error.values())
    assert res.a.dtype == np.float64 and np.isfinite(res.a).all() and np.isfinite(res.b).all()
    assert res.layer_mode_counts.sum() == (modes >= 0).sum()


def test_affine_fit_matches_lstsq_on_noisy_weights():
    rng = np.random.default_rng(3)
    x, _, _, _, _ = planted(seed=3)
    x = x + 0.05 * rng.normal(size=x.shape)
    res = cmd(x, n_modes=3, n_samples=50, seed=2)
    for m in range(res.n_modes):
        r = res.ref_traj[m]
        design = np.stack([r, np.ones_like(r)], axis=1)
        mem = np.flatnonzero(res.modes == m)
        coef, *_ = np.linalg.lstsq(design, x[mem].T, rcond=None)
        np.testing.assert_allclose(res.a[mem], coef[0], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(res.b[mem], coef[1], rtol=1e-9, atol=1e-11)
    # assignment: every weight's mode is its best |correlation| reference
    c = np.abs(np.corrcoef(np.concatenate([x, res.ref_traj]))[: len(x), len(x):])
    np.testing.assert_array_equal(res.modes, c.argmax(axis=1))
    # reported errors are the real ones
    err = np.linalg.norm(res.reconstruct().numpy() - x) / np.linalg.norm(x)
    assert res.rel_error == pytest.approx(err, rel=1e-9)


def test_reference_is_most_central_member():
    x, *_ = planted(seed=5)
    x = x + 0.02 * np.random.default_rng(5).normal(size=x.shape)
    res = cmd(x, n_modes=3, n_samples=93, seed=0)
    s = x[res.sample_index]
    c = np.abs(np.corrcoef(s))
    for m in range(res.n_modes):
        mem = np.flatnonzero(res.sample_modes == m)
        best = res.sample_index[mem[np.argmax(c[np.ix_(mem, mem)].mean(axis=0))]]
        assert res.ref_index[m] == best


def test_bad_input():
    x, *_ = planted()
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        cmd(x[:, :2], n_modes=2)
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        cmd(x, n_modes=2, start=10)
    with pytest.raises(ValueError, match="n_modes: expected at most n_samples=5"):
        cmd(x, n_modes=6, n_samples=5)
    with pytest.raises(ValueError, match="n_modes"):
        cmd(x, n_modes=0)
    with pytest.raises(ValueError, match="sampling"):
        cmd(x, n_modes=2, sampling="random")
    with pytest.raises(TypeError, match="trajectory"):
        cmd([[1.0, 2.0, 3.0]], n_modes=1)
    with pytest.raises(ValueError, match="2-D"):
        cmd(np.zeros(5), n_modes=1)
    # all constant: correlation undefined everywhere -> a clear error
    with pytest.raises(ValueError, match="only 0 weights move"):
        cmd(np.ones((10, 5)), n_modes=1)
    # constant weights among moving ones: exact, finite
    res = cmd(x, n_modes=3, n_samples=1000)
    assert res.info["n_samples"] == 90  # capped at the moving weights
    assert res.n_constant == 3 and np.isfinite(res.a).all() and np.isfinite(res.b).all()
    np.testing.assert_allclose(res.reconstruct().numpy(), x, atol=1e-10)
    with pytest.raises(IndexError):
        res.reconstruct(12)
    with pytest.raises(TypeError):
        res.reconstruct(1.0)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x))))


def _train_snapshots(model, layout, epochs=6, seed=0):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 2, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snaps = []
    for _ in range(epochs):
        for s in range(0, 64, 16):
            loss = nn.functional.cross_entropy(model(x[s:s + 16]), y[s:s + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
        snaps.append(layout.flatten(model, torch.float64))
    return torch.stack(snaps, dim=1), x, y


def test_bn_keep_and_model_and_copies():
    net = BNNet().double()
    lay = Layout.from_model(net)
    assert [e.kind for e in lay.entries].count("buffer") == 2  # running mean and var (not num_batches)
    traj, x, y = _train_snapshots(net, lay)
    keep = cmd(traj, n_modes=2, n_samples=20, layout=lay, bn="keep")
    buf = lay.buffer_mask()
    assert (keep.modes[buf] == KEPT).all() and not (keep.modes[~buf] == KEPT).any()
    np.testing.assert_array_equal(keep.reconstruct().numpy()[buf], traj.numpy()[buf])
    modelled = cmd(traj, n_modes=2, n_samples=20, layout=lay, bn="model")
    assert not (modelled.modes == KEPT).any()
    # copies: the user's model is never touched
    before = copy.deepcopy(net.state_dict())
    net.train()
    m2 = cmd_model(net, keep, t=-1)
    np.testing.assert_allclose(lay.flatten(m2, torch.float64).numpy(), keep.reconstruct(-1).numpy())
    accs = evaluate_snapshots(net, keep, lambda m: accuracy(m, x, y))
    assert len(accs) == 6 and all(0 <= v <= 1 for v in accs)
    exact = evaluate_snapshots(net, traj, lambda m: accuracy(m, x, y), layout=lay)
    assert exact[-1] == accuracy(net, x, y)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="bn"):
        cmd(traj, n_modes=2, bn="keep")  # no layout: unknown buffers


def test_online_equals_posthoc_fit_on_same_snapshots():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    lay = Layout.from_model(net)
    online = OnlineCMD(net, n_modes=3, warmup=5, n_samples=40, seed=0)
    x, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
    snaps = []
    for epoch in range(14):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        online.update(net)
        snaps.append(lay.flatten(net, torch.float64).numpy())
        if epoch == 4:
            assert online.ready
            warm = cmd(np.stack(snaps, 1), n_modes=3, n_samples=40, seed=0, layout=lay)
            np.testing.assert_array_equal(online.result.modes, warm.modes)
    X = np.stack(snaps, axis=1)
    a, b = online.coefficients()
    refs = X[online.result.ref_index]
    np.testing.assert_allclose(online.reference_trajectories(), refs)
    for m in range(online.result.n_modes):
        mem = np.flatnonzero(online.result.modes == m)
        design = np.stack([refs[m], np.ones(X.shape[1])], axis=1)
        coef, *_ = np.linalg.lstsq(design, X[mem].T, rcond=None)
        np.testing.assert_allclose(a[mem], coef[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b[mem], coef[1], rtol=1e-9, atol=1e-12)
    w = online.weights().numpy()
    np.testing.assert_allclose(w, a * refs[np.maximum(online.result.modes, 0), -1] + b)
    copy_ = online.model(net)
    assert copy_ is not net
    np.testing.assert_allclose(lay.flatten(copy_, torch.float64).numpy(), w)
    with pytest.raises(ValueError, match="warmup"):
        OnlineCMD(net, warmup=2)


def test_embedded_freezing_leaves_optimizer_and_follows_affine_path():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    before = copy.deepcopy(net.state_dict())
    emb = EmbeddedCMD(net, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), n_modes=2, warmup=4, every=2,
                      percent=25, n_samples=30)
    n = emb.layout.n
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 2, (40,))
    frozen_at = {}
    prev: dict = {}
    for _epoch in range(12):
        for s in range(0, 40, 10):
            loss = nn.functional.cross_entropy(emb(x[s:s + 10]), y[s:s + 10])
            emb.optimizer.zero_grad()
            loss.backward()
            emb.optimizer.step()
            if emb.n_frozen:
                # frozen weights sit exactly on a * w_r + b, with w_r the current (trained) reference
                w = emb.weights()
                ref_vals = emb.free.detach()[emb.frozen_ref]
                assert torch.equal(w[emb.frozen_idx], emb.frozen_a * ref_vals + emb.frozen_b)
        if emb.epoch_end():
            frozen_at[emb.epoch] = emb.n_frozen
            in_opt = sum(p.numel() for g in emb.optimizer.param_groups for p in g["params"])
            assert in_opt == n - emb.n_frozen == emb.n_trainable
            assert emb.optimizer.param_groups[0]["momentum"] == 0.9
            # weights frozen earlier keep their (a, b)
            now = dict(zip(emb.frozen_idx.tolist(), zip(emb.frozen_a.tolist(), emb.frozen_b.tolist())))
            for i, ab in prev.items():
                assert now[i] == ab
            prev = now
            # references are never frozen
            assert not np.isin(emb.online.result.ref_index, emb.frozen_idx.numpy()).any()
    # embeddings at epochs 6, 8, 10, 12 (every 2 after the warm-up of 4), 25 % of the remaining free weights
    assert sorted(frozen_at) == [6, 8, 10, 12]
    free = n - len(emb.online.result.ref_index)
    expected = 0
    for _ in range(4):
        add = int(np.ceil((free - expected) * 0.25))
        expected += add
    assert emb.n_frozen == expected
    # frozen weights changed their a, b at no point after freezing; the free ones trained
    trained = emb.model()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # user's model untouched
    assert not torch.equal(emb.layout.flatten(trained), emb.layout.flatten(net))
    with pytest.raises(ValueError, match="percent"):
        EmbeddedCMD(net, lambda p: torch.optim.SGD(p, lr=0.1), percent=0)


def test_plots_render(tmp_path):
    import matplotlib

    from gradsketch.dynamics import plots

    backend = matplotlib.get_backend()
    x, *_ = planted()
    res = cmd(x, n_modes=3, n_samples=60, layers=[("l0", 0, 50), ("l1", 50, 93)])
    figs = [plots.reference_trajectories(res), plots.mode_membership(res),
            plots.reconstruction_error([1, 2, 3], {"posthoc": [0.3, 0.1, 0.0]}),
            plots.accuracy_curves({"final": [80, 85, 86], "CMD": [81, 86, 87]})]
    for i, fig in enumerate(figs):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 5000
    heights = [p.get_height() for p in figs[1].axes[0].patches]
    assert np.allclose(np.sum(np.reshape(heights, (3, 2)), axis=0), 1.0)  # fractions per layer sum to 1
    assert matplotlib.get_backend() == backend


def test_input_not_modified():
    x, *_ = planted()
    before = x.copy()
    t = torch.from_numpy(x)
    cmd(t, n_modes=3, n_samples=40, block=7)
    np.testing.assert_array_equal(x, before)
