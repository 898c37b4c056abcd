"""gradsketch.spectrum against exact eigendecompositions of tiny float64 models (torch.func.hessian)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from _helpers import exact_eigh, exact_matrix, single_thread, tiny_data, tiny_model, tiny_task

from gradsketch.linalg import MatrixOperator
from gradsketch.model import Task
from gradsketch.sketch import sketch as make_sketch
from gradsketch.spectrum import (
    DensityResult,
    SpectrumResult,
    density,
    plot_density,
    plot_eigenvalues,
    spectrum,
    spectrum_over_checkpoints,
    trace,
    write_report,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: oversubscribed intra-op threads make tiny HVPs ~100x slower
    with single_thread():
        yield


@pytest.fixture(scope="module")
def setup():
    task, data = tiny_task()
    mats = {op: exact_matrix(task, data, op) for op in ("hessian", "ggn", "fisher")}
    eig = {op: exact_eigh(M) for op, M in mats.items()}
    return task, data, mats, eig


def rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("operator", ["hessian", "ggn", "fisher"])
def test_top10_matches_exact(setup, operator):
    task, data, mats, eig = setup
    r = spectrum(task, data, k=10, operator=operator, n_iter=150, tol=1e-10, progress=False)
    lam, _ = eig[operator]
    assert r.eigenvectors.shape == (task.n_params, 10)
    assert torch.all(r.eigenvalues[:-1] >= r.eigenvalues[1:])
    assert rel(r.eigenvalues, lam[:10]) < 1e-6
    M = mats[operator]
    V = r.eigenvectors
    res = (M @ V - V * r.eigenvalues).norm(dim=0)
    assert float(res.max()) < 1e-6 * float(lam[0])
    assert torch.allclose(r.residuals, res, rtol=1e-3, atol=1e-9 * float(lam[0]))
    assert bool(r.converged.all())
    # n_hvp counts the operator's products
    assert r.n_hvp >= r.info["n_iter"]


def test_arnoldi_and_which(setup):
    task, data, mats, eig = setup
    lam, _ = eig["hessian"]
    ra = spectrum(task, data, k=10, method="arnoldi", n_iter=task.n_params, progress=False)
    assert rel(ra.eigenvalues, lam[:10]) < 1e-6
    assert float(ra.residuals.max()) < 1e-6 * float(lam[0])
    rs = spectrum(task, data, k=4, which="SA", n_iter=200, tol=1e-10, progress=False)
    assert rel(rs.eigenvalues, lam[-4:]) < 1e-6  # descending order: the 4 most negative, largest first
    rb = spectrum(task, data, k=6, which="BE", n_iter=200, tol=1e-10, progress=False)
    expect = torch.cat([lam[:3], lam[-3:]])
    assert rel(rb.eigenvalues, expect) < 1e-6
    rm = spectrum(task, data, k=5, which="LM", n_iter=200, tol=1e-10, progress=False)
    top_mag = lam[torch.argsort(lam.abs(), descending=True)[:5]].sort(descending=True).values
    assert rel(rm.eigenvalues, top_mag) < 1e-6


def test_sketched_equals_explicit_phi_h_phit(setup):
    task, data, mats, _ = setup
    N, d = task.n_params, 64
    for kind in ("affd", "qk", "afjl"):
        S = make_sketch(kind, N, d, seed=3)
        Phi = S.matrix()
        lam, _ = exact_eigh(Phi @ mats["hessian"] @ Phi.T)
        r = spectrum(task, data, k=10, sketch=S, n_iter=d, tol=1e-10, progress=False)
        assert r.eigenvectors.shape == (d, 10)
        assert r.sketch_spec == json.loads(json.dumps(S.spec))
        assert rel(r.eigenvalues, lam[:10]) < 1e-6, kind
    # a BlockSketch over the parameters (the task's own): explicit Φ from its action on the identity
    B = task.block_sketch(48, "affd", seed=1)
    eye = torch.eye(N, dtype=torch.float64)
    Phi = B(list(torch.split(eye, task.param_sizes, dim=1))).T  # [d, N]
    lam, _ = exact_eigh(Phi @ mats["ggn"] @ Phi.T)
    r = spectrum(task, data, k=8, sketch=B, operator="ggn", n_iter=48, tol=1e-10, progress=False)
    assert rel(r.eigenvalues, lam[:8]) < 1e-6


def test_sketch_scaling_convention(setup):
    """E‖Φx‖² = ‖x‖² (E ΦᵀΦ = I): E tr(ΦHΦᵀ) = tr(H). Averaged over 40 seeds of a dense Gaussian sketch
    (variance of tr(ΦHΦᵀ) = 2‖H‖_F²/d per seed), within 6 standard errors (CLT failure prob ~2e-9)."""
    task, data, mats, _ = setup
    H = mats["hessian"]
    N, d = task.n_params, 32
    vals = [float(torch.trace(P @ H @ P.T)) for P in (make_sketch("dense", N, d, seed=s).matrix() for s in range(40))]
    se = math.sqrt(2 * float((H**2).sum()) / d / 40)
    assert abs(np.mean(vals) - float(torch.trace(H))) < 6 * se


def test_diagnostics_against_exact(setup):
    task, data, mats, eig = setup
    lam, V = eig["hessian"]
    r = spectrum(task, data, k=10, which="BE", n_iter=250, tol=1e-10, progress=False)
    # outliers among the computed ones: λ_n/λ_1 > t
    for t in (0.05, 0.2, 0.5):
        exact = lam[:5][lam[:5] / lam[0] > t]
        assert torch.allclose(r.outliers(t), exact, rtol=1e-6)
    assert math.isclose(r.negative_ratio, float(-lam[-1] / lam[0]), rel_tol=1e-6)
    # LA alone cannot see the bottom: nan; merged with an SA run it can
    top = spectrum(task, data, k=5, n_iter=150, tol=1e-10, progress=False)
    assert math.isnan(top.negative_ratio)
    bottom = spectrum(task, data, k=3, which="SA", n_iter=250, tol=1e-10, progress=False)
    both = top.merge(bottom)
    assert both.k == 8 and both.n_hvp == top.n_hvp + bottom.n_hvp
    assert math.isclose(both.negative_ratio, float(-lam[-1] / lam[0]), rel_tol=1e-6)
    # alignment of per-example gradients and of the mean gradient with the top-5 eigenspace
    G = task.grads(data[0])
    V5 = V[:, :5]
    exact_rows = ((G @ V5) ** 2).sum(1) / (G**2).sum(1)
    assert torch.allclose(top.alignment(G), exact_rows, rtol=1e-6, atol=1e-9)
    g = G.mean(0)
    assert math.isclose(top.alignment(g), float(((g @ V5) ** 2).sum() / (g**2).sum()), rel_tol=1e-6)
    assert math.isclose(top.alignment(G, reduce="total"), float(((G @ V5) ** 2).sum() / (G**2).sum()),
                        rel_tol=1e-6)
    assert math.isclose(top.alignment(g, k=2), float(((g @ V[:, :2]) ** 2).sum() / (g**2).sum()), rel_tol=1e-6)


def test_sketched_alignment(setup):
    task, data, mats, _ = setup
    N, d = task.n_params, 64
    S = make_sketch("affd", N, d, seed=5)
    Phi = S.matrix()
    lam, V = exact_eigh(Phi @ mats["hessian"] @ Phi.T)
    r = spectrum(task, data, k=4, sketch=S, n_iter=d, tol=1e-10, progress=False)
    g = task.grads(data[1]).mean(0)
    sg = Phi @ g
    expect = float(((sg @ V[:, :4]) ** 2).sum() / (sg**2).sum())
    assert math.isclose(r.alignment(g), expect, rel_tol=1e-6)  # raw gradient, sketched inside
    assert math.isclose(r.alignment(sg), expect, rel_tol=1e-6)  # already sketched
    # survives save/load (sketch rebuilt from its spec)
    with pytest.raises(ValueError, match="grads"):
        r.alignment(torch.ones(7, dtype=torch.float64))


def test_density_against_exact(setup):
    """SLQ moments are unbiased for tr(H^p)/N (p ≤ 2m−1, Rademacher probes so v = z/√N): within 6 standard
    errors, std from the exact Hutchinson variance 2(‖H^p‖_F² − Σ diag(H^p)²)/N² per probe (CLT failure
    probability ~2e-9 each). CDF within a δ/ε sandwich of the exact one (below)."""
    task, data, mats, eig = setup
    H = mats["hessian"]
    lam, _ = eig["hessian"]
    N, P = task.n_params, 12
    dres = density(task, data, n_probes=P, n_steps=40, progress=False, seed=1)
    assert isinstance(dres, DensityResult) and dres.n_hvp == P * 40 + 2
    for p in (1, 2, 3):
        Hp = torch.linalg.matrix_power(H, p)
        var = 2 * (float((Hp**2).sum()) - float((torch.diagonal(Hp) ** 2).sum())) / N**2
        assert abs(dres.slq.moment(p) - float(torch.trace(Hp)) / N) < 6 * math.sqrt(var / P) + 1e-12
    # CDF sandwich: F(x − δ) − ε ≤ F_slq(x) ≤ F(x + δ) + ε with δ = 3% of the spectral range (the Gauss
    # nodes smear each eigenvalue cluster over about one node spacing) and ε = 0.05 (sampling std ~0.01)
    srt = lam.flip(0).numpy()
    delta = 0.03 * float(srt[-1] - srt[0])
    xs = np.linspace(srt[0], srt[-1], 25)
    F = lambda x: np.searchsorted(srt, x, side="right") / N  # noqa: E731
    est = dres.cdf(xs).numpy()
    assert np.all(est >= F(xs - delta) - 0.05) and np.all(est <= F(xs + delta) + 0.05)
    g, v = dres.grid.numpy(), dres.values.numpy()
    assert abs(np.trapezoid(v, g) - 1) < 1e-3  # a probability density


def test_trace_against_exact(setup):
    """Hutchinson within 6 σ of the exact per-probe variance 2(‖H‖_F² − Σ H_ii²) (CLT failure ~2e-9);
    Hutch++ within 6 of its reported standard errors (plus rounding)."""
    task, data, mats, _ = setup
    H = mats["hessian"]
    tr = float(torch.trace(H))
    M = 60
    h = trace(task, data, method="hutchinson", n_matvecs=M, progress=False)
    sd = math.sqrt(2 * (float((H**2).sum()) - float((torch.diagonal(H) ** 2).sum())) / M)
    assert abs(h.estimate - tr) < 6 * sd
    hp = trace(task, data, method="hutchpp", n_matvecs=M, progress=False)
    assert hp.n_matvec == M
    assert abs(hp.estimate - tr) < 6 * hp.std_error + 1e-9 * abs(tr)
    full = trace(task, data, method="hutchpp", n_matvecs=3 * task.n_params, progress=False)
    assert math.isclose(full.estimate, tr, rel_tol=1e-9)  # s = N: exact


def test_checkpoint_series(tmp_path):
    data = tiny_data()
    model = tiny_model(steps=0)
    states = []
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    path = tmp_path / "ckpt2.pt"
    torch.save({"state_dict": states[2]}, path)
    task = Task.from_classifier(model)
    before = task.flatten(task.params_dict()).clone()
    ser = spectrum_over_checkpoints(task, [states[0], states[1], str(path)], data, k=3, n_iter=120, tol=1e-10,
                                    plot=tmp_path / "evo.png", progress=False)
    assert len(ser) == 3 and ser.labels == ["0", "1", "ckpt2.pt"]
    assert torch.equal(task.flatten(task.params_dict()), before)  # restored
    assert (tmp_path / "evo.png").stat().st_size > 1000
    for st, r in zip(states, ser):
        model.load_state_dict(st)
        lam, _ = exact_eigh(exact_matrix(task, data, "hessian"))
        assert rel(r.eigenvalues, lam[:3]) < 1e-6
    assert ser.eigenvalues().shape == (3, 3)
    # model factory + loss_fn path
    ser2 = spectrum_over_checkpoints(lambda: tiny_model(steps=0), states[:1], data, k=3, n_iter=120, tol=1e-10,
                                     progress=False)
    assert torch.allclose(ser2[0].eigenvalues, ser[0].eigenvalues, rtol=1e-8)
    with pytest.raises(ValueError, match="checkpoints"):
        spectrum_over_checkpoints(task, [], data)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]"):
        spectrum_over_checkpoints(task, [{"0.weight": torch.zeros(2, 2)}], data, k=2)


def test_save_load_report_plots(setup, tmp_path):
    task, data, _, _ = setup
    r = spectrum(task, data, k=5, which="BE", n_iter=150, progress=False)
    jp, npz = r.save(tmp_path / "res.json")
    r2 = SpectrumResult.load(jp)
    assert torch.equal(r2.eigenvalues, r.eigenvalues) and torch.equal(r2.eigenvectors, r.eigenvectors)
    assert r2.info == json.loads(json.dumps(r.info)) and r2.n_hvp == r.n_hvp
    assert r2.negative_ratio == r.negative_ratio
    assert SpectrumResult.load(jp, vectors=False).eigenvectors is None
    S = make_sketch("affd", task.n_params, 32, seed=0)
    rs = spectrum(task, data, k=3, sketch=S, n_iter=32, progress=False)
    rs.save(tmp_path / "sk")
    rs2 = SpectrumResult.load(tmp_path / "sk")
    g = task.grads(data[0]).mean(0)
    assert math.isclose(rs2.alignment(g), rs.alignment(g), rel_tol=1e-9)  # sketch rebuilt from spec
    dres = density(task, data, n_probes=2, n_steps=10, progress=False)
    dres2 = DensityResult.load(dres.save(tmp_path / "dens.json"))
    assert torch.allclose(dres2.values, dres.values)
    plot_eigenvalues([r, rs], tmp_path / "ev.png")
    plot_density(dres, tmp_path / "dens.png", exact=r.eigenvalues.numpy())
    html = write_report(tmp_path / "rep.html", spectrum=r, density=dres, grads=g, notes=["hello"])
    text = open(html).read()
    assert text.count("data:image/png;base64,") == 2 and "http" not in text.replace("http-equiv", "")
    assert "hello" in text and "negative ratio" in text


def test_determinism_and_progress(setup):
    task, data, _, _ = setup
    a = spectrum(task, data, k=3, n_iter=40, tol=0, seed=7, progress=False)
    b = spectrum(task, data, k=3, n_iter=40, tol=0, seed=7, progress=True)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.n_hvp == b.n_hvp


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs(setup):
    task, data, _, _ = setup
    N = task.n_params
    with pytest.raises(ValueError, match=r"k: expected at most the number of parameters N = 310"):
        spectrum(task, data, k=N + 1, progress=False)
    S = make_sketch("affd", N, 16, seed=0)
    with pytest.raises(ValueError, match=r"k: expected at most the sketch dimension d = 16"):
        spectrum(task, data, k=17, sketch=S, progress=False)
    with pytest.raises(ValueError, match="sketch: expected .* n = 310"):
        spectrum(task, data, k=2, sketch=make_sketch("affd", 100, 16), progress=False)
    with pytest.raises(ValueError, match="operator"):
        spectrum(task, data, operator="hess", progress=False)
    with pytest.raises(ValueError, match="method"):
        spectrum(task, data, method="power", progress=False)
    with pytest.raises(ValueError, match="which"):
        spectrum(task, data, which="XX", progress=False)
    with pytest.raises(TypeError, match="k: expected an int"):
        spectrum(task, data, k=2.5, progress=False)
    with pytest.raises(TypeError, match="task"):
        spectrum("model", data, progress=False)
    with pytest.raises(ValueError, match="data"):
        spectrum(task, None, progress=False)


def test_non_symmetric_operator_is_refused():
    A = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    op = MatrixOperator(A, symmetric=False)
    with pytest.raises(ValueError, match="symmetric"):
        spectrum(op, k=3, progress=False)
    with pytest.raises(ValueError, match="symmetric"):
        spectrum(op, k=3, method="arnoldi", progress=False)


def test_breakdown_returns_what_was_found():
    # rank-3 PSD operator: from a random start the Krylov space is invariant after 4 steps (3 + null part)
    D = torch.zeros(20, dtype=torch.float64)
    D[:3] = torch.tensor([3.0, 2.0, 1.0])
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    op = MatrixOperator(Q @ torch.diag(D) @ Q.T)
    with pytest.warns(RuntimeWarning, match="invariant"):
        r = spectrum(op, k=6, restart_on_breakdown=False, progress=False)
    assert r.k == 4
    assert torch.allclose(r.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64), atol=1e-10)
    # default: restarts and finds the zero eigenvalues too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = spectrum(op, k=6, progress=False)
    assert torch.allclose(r.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0, 0, 0], dtype=torch.float64), atol=1e-10)
    # a Task: empirical Fisher of 2 examples has rank <= 2
    task, data = Task.from_classifier(tiny_model(steps=0)), tiny_data(2)
    with pytest.warns(RuntimeWarning):
        r = spectrum(task, data, k=5, operator="fisher", restart_on_breakdown=False, progress=False)
    assert r.k == 3 and abs(float(r.eigenvalues[-1])) < 1e-10


def test_nan_hvp_is_a_clear_error():
    data = tiny_data()
    model = tiny_model(steps=0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    task = Task.from_classifier(model, validate=False)
    with pytest.raises(ValueError, match=r"NaN or Inf.*hessian-vector product"):
        spectrum(task, data, k=2, progress=False)


def test_outlier_errors():
    r = spectrum(MatrixOperator(-torch.eye(5, dtype=torch.float64) * torch.arange(1.0, 6.0, dtype=torch.float64)),
                 k=2, progress=False)
    with pytest.raises(ValueError, match="<= 0"):
        r.outliers()
    with pytest.raises(ValueError, match="threshold"):
        spectrum(MatrixOperator(torch.eye(5, dtype=torch.float64)), k=1, progress=False).outliers(-1)
