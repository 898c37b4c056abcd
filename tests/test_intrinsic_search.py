"""intrinsic_dimension on a problem whose intrinsic dimension is known analytically, and its error paths.

Problem: least squares L(θ) = mean_i (x_iᵀθ − y_i)², θ ∈ R^256, with k = 48 Gaussian rows x_i; metric
R² = 1 − L(θ)/L(θ0). In the subspace θ0 + Pω (P any full-rank n×d map, here cΦᵀ), XP = Z(PᵀP)^{1/2}
with Z a k×d Gaussian matrix, so range(XP) is a uniformly random d-dim subspace of R^k whatever the
sketch. The best R² at d < k is the squared cosine of the residual with that subspace: Beta(d/2, (k−d)/2),
mean d/k; for d ≥ k it is 1. Hence D_int90 ≈ 0.9k = 43.2, and on the doubling grid the answer is 32 or 64:
R²(16) ~ Beta(8, 16) exceeds 0.9 with probability < 1e-6; R²(32) ~ Beta(16, 8) with probability ≈ 0.01,
and even then 32 is within 2× of 43.2. Seeds are fixed, so the test is deterministic.
"""

import math
import os

import pytest
import torch
from torch import nn

from gradsketch.intrinsic import IntrinsicDimResult, intrinsic_dimension

N, K = 256, 48
TRUE = 0.9 * K


def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(K, N, generator=g, dtype=torch.float64)
    y = torch.randn(K, generator=g, dtype=torch.float64)
    return X, y


def model_fn():
    torch.manual_seed(1)
    return nn.Linear(N, 1, bias=False).double()


def r2(model, data):
    X, y = data
    loss = ((model(X).squeeze(-1) - y) ** 2).mean()
    loss0 = ((model_fn()(X).squeeze(-1) - y) ** 2).mean()
    return float(1 - loss / loss0)


KW = dict(d_max=128, full_metric=1.0, lr=0.05, eval_every=20, delta=0.005, d_start=4, progress=False)


@pytest.mark.parametrize("kind", ["affd", "qk", "dense"])
def test_one_run_search_finds_known_dimension(kind):
    X, y = problem()
    res = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind=kind, method="one-run", steps=600, **KW)
    assert res.estimate is not None and TRUE / 2 <= res.estimate <= 2 * TRUE
    assert [r["d"] for r in res.table] == [4 * 2 ** i for i in range(len(res.table))]
    assert res.table[-1]["reached"] and not any(r["reached"] for r in res.table[:-1])
    assert res.confirm is not None and res.confirm["d"] == res.estimate // 2
    # at d = 16 the best achievable R² is ~ d/k = 1/3 (Beta(8,16) < 0.6 with prob. > 0.999)
    r16 = [r for r in res.table if r["d"] == 16]
    assert r16 and r16[0]["metric"] < 0.6


def test_grid_agrees_and_plot(tmp_path):
    X, y = problem()
    res = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind="affd", method="grid", steps=300,
                              stop_at_threshold=True, **KW)
    assert res.estimate is not None and TRUE / 2 <= res.estimate <= 2 * TRUE
    assert [r["d"] for r in res.table] == [4, 8, 16, 32, 64, 128]
    path = res.plot(str(tmp_path / "id.png"))
    assert os.path.getsize(path) > 1000
    assert "| d |" in res.to_markdown() and "D_int90 (grid, affd)" in str(res)


def test_full_finetuning_measured_and_threshold():
    X, y = problem()
    kw = {**KW, "full_metric": None}
    res = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind="affd", steps=600, full_steps=300, full_lr=0.05,
                              confirm=False, **kw)
    assert res.full_metric > 0.99 and math.isclose(res.threshold, 0.9 * res.full_metric)
    assert res.estimate is not None and TRUE / 2 <= res.estimate <= 2 * TRUE


def test_never_reaching_reports_lower_bound():
    X, y = problem()
    kw = {**KW, "d_max": 16}
    res = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind="affd", steps=600, **kw)
    assert res.estimate is None and res.lower_bound == 16 and not res.reached
    assert "> 16" in str(res) and any("D_int > 16" in n for n in res.notes)
    g = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind="affd", method="grid", steps=100, **kw)
    assert g.estimate is None and g.estimate_str == "> 16"


def test_nan_loss_stops_and_keeps_results():
    X, y = problem()
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()
        return loss * float("nan") if calls["n"] == 150 else loss

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        res = intrinsic_dimension(model_fn, (X, y), (X, y), r2, kind="affd", steps=600, loss_fn=loss_fn, **KW)
    assert res.nan is not None and "step 150" in res.nan
    assert res.estimate is None and len(res.table) >= 2  # stages at d = 4 (100 steps), 8 kept


def test_errors():
    X, y = problem()
    data = (X, y)
    with pytest.raises(ValueError, match=r"d_max: kind 'affd' needs d <= n=256.*got d_max=512"):
        intrinsic_dimension(model_fn, data, data, r2, **{**KW, "d_max": 512})
    with pytest.raises(ValueError, match="method: expected one of"):
        intrinsic_dimension(model_fn, data, data, r2, method="bisect", **KW)
    with pytest.raises(ValueError, match="metric: expected one of"):
        intrinsic_dimension(model_fn, data, data, "rouge", **KW)
    with pytest.raises(ValueError, match="d_start: expected d_start <= d_max"):
        intrinsic_dimension(model_fn, data, data, r2, **{**KW, "d_start": 256})
    with pytest.raises(ValueError, match="params: no trainable parameter selected"):
        intrinsic_dimension(model_fn, data, data, r2, params=lambda n, p: False, **KW)
    with pytest.raises(ValueError, match="fraction: expected"):
        intrinsic_dimension(model_fn, data, data, r2, fraction=1.5, **KW)
    with pytest.raises(ValueError, match="grid: expected dimensions"):
        intrinsic_dimension(model_fn, data, data, r2, method="grid", grid=[8, 1024], **KW)
    assert isinstance(IntrinsicDimResult("grid", "affd", 0.9, 1.0, 0.9, 8).estimate_str, str)


def test_cli_intrinsic_dim(tmp_path):
    from typer.testing import CliRunner

    from gradsketch.cli import app

    runner = CliRunner()
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["intrinsic-dim", "--kind", "qk", "--d-max", "64", "--d-start", "16", "--steps", "20",
                            "--full-metric", "0.95", "--eval-every", "20", "--no-progress", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "D_int90 (one-run, qk)" in r.output and out.exists()
    bad = runner.invoke(app, ["intrinsic-dim", "--kind", "affd", "--d-max", "100000", "--no-progress"])
    assert bad.exit_code == 2 and "d_max: kind 'affd' needs d <= n" in bad.output
