"""The three Influence solvers (explicit, CG, LiSSA) apply one rule to one system (issue 19): the damping rule
(|K| + δI)⁻¹ of attribution/damping.py. On an indefinite system all three accept it, report the same finding
(same log line, same ``kernel_info_``) and return the same scores, the closed form from the eigendecomposition;
on a positive definite system all three solve (K + δI)⁻¹ and agree numerically. LiSSA reports the damping
that was passed (not its normalised d = δ/scale) and never stops silently unconverged."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _helpers import indefinite_tanh_task

from gradsketch import Attributor
from gradsketch.linalg import MatrixOperator
from gradsketch.linalg.inverse import LiSSAInverse

SOLVERS = ("explicit", "cg", "lissa")


def _fit_all(task, data, caplog, **kw):
    out = {}
    for solver in SOLVERS:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gradsketch.attribution"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # none of them warns: they agree on the system
            extra = {"tol": 1e-13} if solver == "cg" else {"depth": 4000, "tol": 1e-13} if solver == "lissa" else {}
            a = Attributor(task, "influence", solver=solver, **kw, **extra).fit(data, progress=False)
            S = a.score([data[0]], progress=False)
        lines = [r.getMessage() for r in caplog.records if r.name == "gradsketch.attribution"
                 and r.getMessage().startswith("influence: the ")]  # the kernel line (not the gradient mode's)
        out[solver] = (a, S, lines)
    return out


def test_on_an_indefinite_system_all_three_solvers_apply_the_rule_and_say_so(caplog):
    task, data, H = indefinite_tanh_task()
    w, V = torch.linalg.eigh((H + H.T) / 2)
    assert float(w[0]) < -0.01  # below -δ: (H + δI) itself is indefinite, CG would stop, LiSSA would diverge
    damping = 0.01
    G = torch.cat([task.grads(b) for b in data])
    exact = (task.grads(data[0]) @ V) / (w.abs() + damping) @ (G @ V).T
    res = _fit_all(task, data, caplog, curvature="hessian", damping=damping)
    for solver, (a, S, lines) in res.items():
        torch.testing.assert_close(S, exact, rtol=1e-9, atol=1e-11)
        info = a.kernel_info_
        assert info["indefinite"] and info["solver"] == solver and info["solver_used"] == "explicit"
        assert info["lambda_min"] == pytest.approx(float(w[0]), rel=1e-10)
        assert len(lines) == 1
    # the same words about the same system; CG and LiSSA add that they could not apply |K| themselves
    head = res["explicit"][2][0]
    assert "is indefinite (λ_min = " in head and "kernel (|K| + δI)⁻¹ with δ = 0.01" in head
    for solver in ("cg", "lissa"):
        assert res[solver][2][0].startswith(head)
        assert f"'{solver}' cannot apply |K|" in res[solver][2][0]


def test_on_a_positive_definite_system_all_three_solvers_agree(caplog):
    task, data, _ = indefinite_tanh_task()
    res = _fit_all(task, data, caplog, curvature="ggn", damping=0.5)  # LiSSA contracts by 1 - δ/scale per step
    S0 = res["explicit"][1]
    torch.testing.assert_close(res["cg"][1], S0, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(res["lissa"][1], S0, rtol=1e-9, atol=1e-11)
    for solver, (a, _, lines) in res.items():
        assert not a.kernel_info_["indefinite"] and a.kernel_info_["solver_used"] == solver
        assert lines == [f"influence: the ggn K (26×26) is positive semi-definite; kernel (K + δI)⁻¹ with δ = 0.5 "
                         f"by solver {solver!r}"]


def test_lissa_reports_the_damping_it_was_given_and_never_diverges_silently():
    A = MatrixOperator(torch.diag(torch.tensor([1.0, 0.5, -0.11], dtype=torch.float64)))
    b = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"LiSSA diverges with damping = 0.01 \(the ridge added; LiSSA's normalised "
                                         r"d = damping/scale = 0.0083"):
        LiSSAInverse(A, 0.01, scale=1.2, depth=2000) @ b
    P = MatrixOperator(torch.diag(torch.tensor([1.0, 0.5, 0.01], dtype=torch.float64)))
    with pytest.warns(RuntimeWarning, match=r"LiSSA did not converge in depth = 5 steps \(damping = 0.01"):
        LiSSAInverse(P, 0.01, depth=5) @ b
    x = LiSSAInverse(P, 0.01, depth=20000, tol=1e-13) @ b  # converged: the requested damping, exactly
    torch.testing.assert_close(x, b / torch.tensor([1.01, 0.51, 0.02], dtype=torch.float64), rtol=1e-9, atol=0)
