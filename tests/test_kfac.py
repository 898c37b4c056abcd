"""K-FAC / EK-FAC curvature (gradsketch.curvature.KFACOperator) against explicit float64 computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradsketch import Task
from gradsketch.curvature import FisherOperator, GGNOperator, KFACOperator

DT = torch.float64


def _ce(z, y):
    return F.cross_entropy(z.unsqueeze(0), y.view(1))


def _block_index(task, blk):
    """Flat-parameter indices of the block's [rows, cols] view (bias folded), row-major."""
    offs, o = {}, 0
    for n, s in zip(task.param_names, task.param_sizes):
        offs[n] = o
        o += s
    w0 = offs[blk.weight]
    idx = torch.empty(blk.rows, blk.cols, dtype=torch.long)
    if blk.bias is None:
        return (w0 + torch.arange(blk.rows * blk.cols)).reshape(blk.rows, blk.cols).reshape(-1)
    b0 = offs[blk.bias]
    if blk.kind == "conv1d":
        idx[:-1] = (w0 + torch.arange((blk.rows - 1) * blk.cols)).reshape(blk.rows - 1, blk.cols)
        idx[-1] = b0 + torch.arange(blk.cols)
    else:
        idx[:, :-1] = (w0 + torch.arange(blk.rows * (blk.cols - 1))).reshape(blk.rows, blk.cols - 1)
        idx[:, -1] = b0 + torch.arange(blk.rows)
    return idx.reshape(-1)


def _basis(blk):
    qr = torch.eye(blk.rows, dtype=DT) if blk.qr is None else blk.qr
    return torch.kron(qr.contiguous(), blk.qc.contiguous())


def _check_correction(task, op, dense):
    """EK-FAC eigenvalues = diag(Qᵀ G_block Q) of the exact matrix; diagonal blocks = its diagonal."""
    for blk in op.blocks.values():
        idx = _block_index(task, blk)
        G = dense[idx][:, idx]
        Q = _basis(blk)
        torch.testing.assert_close(blk.lam.reshape(-1), torch.diagonal(Q.T @ G @ Q), rtol=1e-9, atol=1e-12)
    offs, o = {}, 0
    for n, s in zip(task.param_names, task.param_sizes):
        offs[n] = (o, o + s)
        o += s
    for n, d in op.diag.items():
        lo, hi = offs[n]
        torch.testing.assert_close(d, torch.diagonal(dense)[lo:hi], rtol=1e-9, atol=1e-12)


def test_mlp_factors_match_explicit_expectations_and_ekfac_is_the_ggn_diagonal_in_its_basis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    task = Task.from_classifier(model)
    X, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 3, (7,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    op = KFACOperator.fit(task, data)
    l1, l2 = model[0], model[2]
    A1 = S1 = A2 = S2 = 0
    for i in range(7):
        a1 = torch.cat([X[i], torch.ones(1, dtype=DT)])
        h = torch.tanh(l1(X[i]))
        a2 = torch.cat([h, torch.ones(1, dtype=DT)])
        z = l2(h)
        H = torch.autograd.functional.hessian(lambda zz, i=i: _ce(zz, y[i]), z.detach())
        J1 = l2.weight * (1 - h ** 2)[None, :]          # dz/dy1
        A1, A2 = A1 + torch.outer(a1, a1) / 7, A2 + torch.outer(a2, a2) / 7
        S1, S2 = S1 + (J1.T @ H @ J1).detach() / 7, S2 + H / 7
    b1, b2 = op.blocks["0.weight"], op.blocks["2.weight"]
    assert b1.bias == "0.bias" and b2.bias == "2.bias" and not op.diag
    for got, want in [(b1.A, A1), (b1.S, S1), (b2.A, A2), (b2.S, S2)]:
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    G = GGNOperator(task, data).to_dense()
    _check_correction(task, op, G)
    # K-FAC: the block is exactly S ⊗ A
    kf = KFACOperator.fit(task, data, kind="kfac")
    D = kf.to_dense()
    for blk in kf.blocks.values():
        idx = _block_index(task, blk)
        torch.testing.assert_close(D[idx][:, idx], torch.kron(blk.S, blk.A), rtol=1e-9, atol=1e-12)
    # block diagonal: nothing between the layers
    i1, i2 = _block_index(task, b1), _block_index(task, b2)
    assert float(D[i1][:, i2].abs().max()) == 0.0


def test_one_layer_linear_model_ekfac_and_kfac_equal_the_exact_ggn_and_its_inverse():
    # ℓ = ½ (z − t)ᵀ M (z − t), z = W x + b: the GGN is M ⊗ E[[x;1][x;1]ᵀ], a Kronecker product, so both
    # K-FAC and EK-FAC with exact factors reproduce it (and its damped inverse)
    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    B = torch.randn(3, 3, dtype=DT)
    M = B @ B.T + 0.5 * torch.eye(3, dtype=DT)

    def loss_on_output(z, b):
        r = z - b[1]
        return 0.5 * ((r @ M) * r).sum(1)

    task = Task(model, output_fn=lambda m, b: m(b[0]), loss_on_output=loss_on_output)
    X, T = torch.randn(9, 4, dtype=DT), torch.randn(9, 3, dtype=DT)
    data = [(X[:5], T[:5]), (X[5:], T[5:])]
    G = GGNOperator(task, data).to_dense()
    for kind in ("ekfac", "kfac"):
        op = KFACOperator.fit(task, data, kind=kind)
        torch.testing.assert_close(op.to_dense(), G, rtol=1e-9, atol=1e-12)
        inv = op.inverse(0.03).to_dense()
        torch.testing.assert_close(inv, torch.linalg.inv(G + 0.03 * torch.eye(G.shape[0], dtype=DT)),
                                   rtol=1e-8, atol=1e-10)



def test_undamped_inverse_refuses_eigenvalues_that_are_zero_up_to_rounding():
    """δ = 0 inverts a non-singular curvature exactly, and is refused when the smallest eigenvalue is at most
    SINGULAR_RTOL of the largest even if rounding made it positive (1/rounding would be returned otherwise)."""
    from gradsketch.curvature.kfac import SINGULAR_RTOL

    torch.manual_seed(1)
    model = nn.Linear(4, 3).to(DT)
    task = Task(model, output_fn=lambda m, b: m(b[0]),
                loss_on_output=lambda z, b: 0.5 * (z - b[1]).pow(2).sum(1))
    X, T = torch.randn(9, 4, dtype=DT), torch.randn(9, 3, dtype=DT)
    op = KFACOperator.fit(task, [(X, T)], kind="ekfac")
    G = op.to_dense()
    torch.testing.assert_close(op.inverse(0.0).to_dense(), torch.linalg.inv(G), rtol=1e-8, atol=1e-10)
    lam = op.blocks["weight"].lam
    top = float(lam.max())
    lam.view(-1)[int(lam.argmin())] = 0.1 * SINGULAR_RTOL * top
    with pytest.raises(ValueError, match="damping: expected > 0 for a negative power"):
        op.inverse(0.0)
    op.inverse(1e-3)   # damped: fine
    lam.view(-1)[int(lam.argmin())] = 10 * SINGULAR_RTOL * top
    op.inverse(0.0)

def test_conv2d_factors_use_unfolded_patches():
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).to(DT)
    head = nn.Linear(3 * 3 * 3, 4).to(DT)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), head)
    task = Task.from_classifier(model)
    X, y = torch.randn(5, 2, 5, 5, dtype=DT), torch.randint(0, 4, (5,))
    data = [(X, y)]
    op = KFACOperator.fit(task, data)
    blk = op.blocks["0.weight"]
    # explicit patches: zero-pad, then the 3x3 window at every stride-2 position, channel-major
    Xp = F.pad(X, (1, 1, 1, 1))
    A = torch.zeros(19, 19, dtype=DT)
    S = torch.zeros(3, 3, dtype=DT)
    rest = nn.Sequential(*list(model)[1:])
    for i in range(5):
        yi = conv(X[i:i + 1]).detach()
        z = rest(yi)[0].detach()
        H = torch.autograd.functional.hessian(lambda zz, i=i: _ce(zz, y[i]), z)
        J = torch.autograd.functional.jacobian(lambda t: rest(t)[0], yi)[:, 0]   # [C, out, 3, 3]
        for u in range(3):
            for v in range(3):
                patch = torch.cat([Xp[i, :, 2 * u:2 * u + 3, 2 * v:2 * v + 3].reshape(-1), torch.ones(1, dtype=DT)])
                A += torch.outer(patch, patch) / (5 * 9)
                Jt = J[:, :, u, v]
                S += Jt.T @ H @ Jt / 5
    torch.testing.assert_close(blk.A, A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(blk.S, S, rtol=1e-10, atol=1e-12)
    _check_correction(task, op, GGNOperator(task, data).to_dense())


class _Tiny(nn.Module):
    """Embedding -> LayerNorm -> transformers Conv1D -> mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.proj = Conv1D(3, 4)
        nn.init.normal_(self.proj.weight, std=0.5)
        nn.init.normal_(self.proj.bias, std=0.5)

    def forward(self, ids):
        return self.proj(self.ln(self.emb(ids))).mean(1)


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
def test_embedding_conv1d_layernorm_against_dense_ggn_and_fisher(fisher):
    torch.manual_seed(3)
    model = _Tiny().to(DT)
    task = Task.from_classifier(model)
    ids = torch.randint(0, 6, (8, 5))
    ids[0, :2] = 2   # a token repeated within an example: its rows add up before squaring
    y = torch.randint(0, 3, (8,))
    data = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    op = KFACOperator.fit(task, data, fisher=fisher)
    assert set(op.blocks) == {"emb.weight", "proj.weight"} and set(op.diag) == {"ln.weight", "ln.bias"}
    emb = op.blocks["emb.weight"]
    assert emb.qr is None and emb.A.ndim == 1
    freq = torch.bincount(ids.reshape(-1), minlength=6).to(DT) / ids.numel()
    torch.testing.assert_close(emb.A, freq)
    proj = op.blocks["proj.weight"]
    assert proj.bias == "proj.bias" and proj.rows == 5 and proj.cols == 3
    dense = (GGNOperator if fisher == "ggn" else FisherOperator)(task, data).to_dense()
    _check_correction(task, op, dense)


def test_inverse_and_power_match_dense_and_state_round_trips():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    task = Task.from_classifier(model)
    data = [(torch.randn(6, 1, 4, 4, dtype=DT), torch.randint(0, 3, (6,)))]
    for kind in ("ekfac", "kfac"):
        op = KFACOperator.fit(task, data, kind=kind)
        D = op.to_dense()
        torch.testing.assert_close(D, D.T)
        eye = torch.eye(D.shape[0], dtype=DT)
        torch.testing.assert_close(op.inverse(0.05).to_dense(), torch.linalg.inv(D + 0.05 * eye), rtol=1e-8,
                                   atol=1e-10)
        R = op.power(-0.5, 0.05).to_dense()
        torch.testing.assert_close(R @ R, torch.linalg.inv(D + 0.05 * eye), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(op.eigenvalues(), torch.linalg.eigvalsh(D), rtol=1e-8, atol=1e-12)
        back = KFACOperator.from_state_dict(task, op.state_dict())
        torch.testing.assert_close(back.to_dense(), D)


def test_bad_arguments_are_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 2)).to(DT).eval()
    task = Task.from_classifier(model)
    data = [(torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,)))]
    with pytest.raises(ValueError, match="kind"):
        KFACOperator.fit(task, data, kind="shampoo")
    with pytest.raises(ValueError, match="fisher"):
        KFACOperator.fit(task, data, fisher="true")
    with pytest.raises(ValueError, match="1.weight"):   # BatchNorm: no per-example GGN factor
        KFACOperator.fit(task, data)
    op = KFACOperator.fit(task, data, fisher="empirical")   # ... but its empirical Fisher diagonal is fine
    assert set(op.diag) == {"1.weight", "1.bias"}
    _check_correction(task, op, FisherOperator(task, data).to_dense())
    with pytest.raises(TypeError, match="data"):
        KFACOperator.fit(task, iter(data), fisher="empirical")
    plain = Task(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"))
    with pytest.raises(ValueError, match="output_fn"):
        KFACOperator.fit(plain, data)


def test_output_hessian_roots_of_softmax_cross_entropy():
    """L Lᵀ = diag(p) − ppᵀ, and the all-ones null direction (eigh: ~1e-17, not 0) is an exactly zero column, so
    K-FAC's GGN fit and TRAK's GGN kernel skip it."""
    from gradsketch.curvature.kfac import output_loss_derivatives
    from gradsketch.model.losses import cross_entropy_per_example

    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, generator=g, dtype=DT) * 4
    y = torch.randint(0, 5, (6,), generator=g)
    _, L = output_loss_derivatives(lambda zz, b: cross_entropy_per_example(zz, b[1]), z, (None, y))
    p = z.softmax(-1)
    torch.testing.assert_close(L @ L.transpose(1, 2), torch.diag_embed(p) - p[:, :, None] * p[:, None, :],
                               rtol=0, atol=1e-14)
    zero_cols = (L == 0).all(dim=1)   # [m, C]: which columns are exactly zero
    assert zero_cols.sum(1).tolist() == [1] * 6 and zero_cols[:, 0].all()
