"""gradsketch.optim: Shampoo and Sketchy against hand-computed steps and each other, state round trips,
bad input; the OCO learners against their dense formulas; the spectrum diagnostic."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from gradsketch.optim import (
    FDSON,
    OGD,
    AdaFD,
    DiagonalAdaGrad,
    FactorSpectrumTracker,
    FullMatrixAdaGrad,
    SAdaGrad,
    Shampoo,
    Sketchy,
    online_logistic_regret,
    top_k_share,
)

D64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# one step by hand on a 2×3 weight
def inv_sqrt_2x2(M):
    """(M)^(−1/2) of an SPD 2×2 matrix by the closed form √M = (M + s I)/t, s = √det M, t = √(tr M + 2s)."""
    a, b, c = M[0][0], M[0][1], M[1][1]
    s = math.sqrt(a * c - b * b)
    t = math.sqrt(a + c + 2 * s)
    r = [[(a + s) / t, b / t], [b / t, (c + s) / t]]  # √M
    det = r[0][0] * r[1][1] - r[0][1] * r[1][0]
    return [[r[1][1] / det, -r[0][1] / det], [-r[1][0] / det, r[0][0] / det]]


C = [[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]  # the gradient of loss = Σ W ∘ C


def hand_direction(eps):
    """Step 1 with summed statistics: L^(−1/4) C R^(−1/4) = (C Cᵀ + r I)^(−1/2) C, with r = eps·λ_max the
    same for both sides (C Cᵀ and Cᵀ C share their non-zero eigenvalues; push-through identity)."""
    M = [[sum(C[i][k] * C[j][k] for k in range(3)) for j in range(2)] for i in range(2)]
    tr, det = M[0][0] + M[1][1], M[0][0] * M[1][1] - M[0][1] ** 2
    lam_max = tr / 2 + math.sqrt(tr * tr / 4 - det)
    r = eps * lam_max
    Mr = [[M[0][0] + r, M[0][1]], [M[1][0], M[1][1] + r]]
    X = inv_sqrt_2x2(Mr)
    return [[sum(X[i][k] * C[k][j] for k in range(2)) for j in range(3)] for i in range(2)]


def one_step(opt_cls, **kw):
    W = nn.Parameter(torch.arange(6, dtype=D64).reshape(2, 3) / 10)
    W0 = W.detach().clone()
    opt = opt_cls([W], **kw)
    (W * torch.tensor(C, dtype=D64)).sum().backward()
    opt.step()
    return W0, W.detach()


@pytest.mark.parametrize("opt_cls,extra", [(Shampoo, {}), (Sketchy, {"rank": 2})])
def test_one_step_by_hand_2x3(opt_cls, extra):
    eps, lr = 0.1, 0.5
    P = torch.tensor(hand_direction(eps), dtype=D64)
    W0, W1 = one_step(opt_cls, lr=lr, betas=(0.0, 1.0), eps=eps, graft="none", update_freq=1, **extra)
    assert torch.allclose(W1, W0 - lr * P, atol=1e-12, rtol=0)
    # Adam grafting + momentum + decoupled weight decay: step 1 has norm ‖g/(|g| + ε_g)‖ (bias-corrected
    # Adam moments), momentum's bias correction gives back the same direction, decay shrinks W first.
    W0, W1 = one_step(opt_cls, lr=lr, betas=(0.9, 0.99), eps=eps, graft="adam", graft_eps=1e-8,
                      weight_decay=0.2, update_freq=1, **extra)
    g = torch.tensor(C, dtype=D64)
    D = g / (g.abs() + 1e-8)
    expect = W0 * (1 - lr * 0.2) - lr * P * (torch.linalg.vector_norm(D) / torch.linalg.vector_norm(P))
    assert torch.allclose(W1, expect, atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Embedding + conv + linear + biases: every parameter kind the optimisers must handle."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 5, dtype=D64)
        self.conv = nn.Conv2d(2, 3, 3, dtype=D64)
        self.lin = nn.Linear(12 + 5, 4, dtype=D64)
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=D64))

    def forward(self, img, tok):
        h = torch.tanh(self.conv(img)).flatten(1)
        return self.scale * self.lin(torch.cat([h, self.emb(tok)], dim=1))


def batches(n_steps, seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        yield (torch.randn(n, 2, 4, 4, generator=g, dtype=D64), torch.randint(0, 10, (n,), generator=g),
               torch.randn(n, 4, generator=g, dtype=D64))


def train(model, opt, data):
    losses = []
    for img, tok, y in data:
        opt.zero_grad()
        loss = ((model(img, tok) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


KW = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.01, update_freq=1, block_size=8)


def test_sketchy_full_rank_equals_shampoo_step_for_step():
    torch.manual_seed(0)
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa, ob = Shampoo(a.parameters(), **KW), Sketchy(b.parameters(), rank=8, **KW)  # 8 = block_size
    for batch in batches(25):
        train(a, oa, [batch])
        train(b, ob, [batch])
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa, pb, atol=1e-10, rtol=0)
    # the test can fail: a truncated sketch takes different steps
    c = copy.deepcopy(base)
    train(c, Sketchy(c.parameters(), rank=2, **KW), batches(25))
    assert max(float((pa - pc).detach().abs().max()) for pa, pc in zip(a.parameters(), c.parameters())) > 1e-4


@pytest.mark.parametrize("freq", [3, 5])
def test_sketchy_full_rank_accumulates_like_shampoo_between_refreshes(freq):
    # every step's statistics are kept (in the sketch's basis), so at full rank Sketchy equals Shampoo
    # with the same update_freq; the reference semantics (accumulate=False) see only refresh-step gradients
    torch.manual_seed(0)
    base = Net()
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    kw = {**KW, "update_freq": freq}
    oa, ob = Shampoo(a.parameters(), **kw), Sketchy(b.parameters(), rank=8, **kw)
    oc = Sketchy(c.parameters(), rank=8, accumulate=False, **kw)
    for batch in batches(17):
        for m, o in ((a, oa), (b, ob), (c, oc)):
            train(m, o, [batch])
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.allclose(pa, pb, atol=1e-10, rtol=0)
    assert max(float((pa - pc).detach().abs().max()) for pa, pc in zip(a.parameters(), c.parameters())) > 1e-4
    # the accumulated statistics are the decayed sum in the sketch's basis: compare with Shampoo's
    for pa, pb in zip(a.parameters(), b.parameters()):
        for ba, bb in zip(oa.state[pa]["blocks"], ob.state[pb]["blocks"]):
            for side in ba:
                U = bb[side]["vecs"]
                assert torch.allclose(U.T @ ba[side]["stat"] @ U, bb[side]["acc"], atol=1e-9, rtol=0)


def _mlp_run(model, data, **kw):
    opt = Sketchy(model.parameters(), **kw)
    for x, y in data:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return opt


def _mlp(seed, bias=True):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 6, bias=bias, dtype=D64), nn.Tanh(), nn.Linear(6, 6, bias=bias, dtype=D64),
                         nn.Tanh(), nn.Linear(6, 6, bias=bias, dtype=D64))
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(9, 6, generator=g, dtype=D64), torch.randn(9, 6, generator=g, dtype=D64))
            for _ in range(10)]
    return base, data


def test_sketchy_gram_refresh_equals_svd_refresh():
    # the default refresh (one eigendecomposition of the smaller Gram matrix) takes the SVD's steps; no bias
    # (a 1-D gradient has rank 1 < k, and the vectors of a zero singular value are arbitrary in both paths)
    base, data = _mlp(0, bias=False)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(lr=0.05, update_freq=3, eps=1e-4)
    assert _mlp_run(a, data, rank=2, shrink="gram", **kw).shrink == "gram"
    _mlp_run(b, data, rank=2, shrink="svd", **kw)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-10, rtol=0)
    # the test can fail: another rank takes other steps
    _mlp_run(c, data, rank=3, **kw)
    assert max(float((pa - pc).detach().abs().max()) for pa, pc in zip(a.parameters(), c.parameters())) > 1e-4


@pytest.mark.parametrize("shrink", ["auto", "gram", "svd"])
def test_sketchy_batched_refresh_equals_one_factor_at_a_time(shrink, monkeypatch):
    # factors of equal shape share one batched decomposition; doing them one by one gives the same steps
    import gradsketch.optim.shampoo as sh

    base, data = _mlp(1)

    def run(model):
        _mlp_run(model, data, lr=0.05, rank=2, update_freq=3, shrink=shrink)

    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sizes = []
    real = sh.fd_shrink

    methods = set()

    def recording(M, ell, method="svd"):
        sizes.append(M.shape[0])
        methods.add((tuple(M.shape[1:]), method))
        return real(M, ell, method)

    monkeypatch.setattr(sh, "fd_shrink", recording)
    run(a)
    assert max(sizes) == 6  # the six 6 × 6 factors (L and R of three weights) in one call
    if shrink == "auto":  # weights: M [2 + 6, 6], Gram; biases: M [2 + 1, 6] (rank-deficient, small), SVD
        assert methods == {((8, 6), "gram"), ((3, 6), "svd")}
    sizes.clear()

    def one_by_one(M, ell, method="svd"):
        sizes.append(M.shape[0])
        outs = [real(m, ell, method) for m in M]
        return tuple(torch.stack(parts) for parts in zip(*outs))

    monkeypatch.setattr(sh, "fd_shrink", one_by_one)
    run(b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-12, rtol=0)


def test_sketchy_direction_equals_dense_inverse_roots():
    # graft 'none', no momentum, lr 1: the step is −L' G R' with L' = (U diag(λ) Uᵀ + τ I)^(−1/p) formed
    # densely (p = 4 for a matrix with two factors, 2 for one factor); at refresh and at plain steps
    W = nn.Parameter(torch.randn(5, 7, dtype=D64))  # L and R
    col = nn.Parameter(torch.randn(6, 1, dtype=D64))  # L only
    vec = nn.Parameter(torch.randn(8, dtype=D64))  # R only (a 1-D parameter)
    eps = 1e-3
    opt = Sketchy([W, col, vec], lr=1.0, rank=2, betas=(0.0, 0.95), eps=eps, graft="none", update_freq=3)
    g = torch.Generator().manual_seed(3)
    T = [torch.randn(q.shape, generator=g, dtype=D64) for q in (W, col, vec)]

    def dense_root(f, p):
        lam, U, rho = f["vals"], f["vecs"], f["rho"]
        tau = rho + eps * (lam[0] + rho)
        d = U.shape[0]
        return U @ torch.diag((lam + tau) ** (-1 / p)) @ U.T + tau ** (-1 / p) * (torch.eye(d, dtype=D64) - U @ U.T)

    for step in range(1, 8):
        opt.zero_grad()
        sum(((q - t) ** 3).sum() for q, t in zip((W, col, vec), T)).backward()
        before = [q.detach().clone() for q in (W, col, vec)]
        grads = [q.grad.clone() for q in (W, col, vec)]
        opt.step()
        # refresh steps change the factors before they are applied: read them after the step either way
        bW, bc, bv = (opt.state[q]["blocks"][0] for q in (W, col, vec))
        expect_W = dense_root(bW["L"], 4) @ grads[0] @ dense_root(bW["R"], 4)
        expect_c = dense_root(bc["L"], 2) @ grads[1]
        expect_v = grads[2][None] @ dense_root(bv["R"], 2)
        assert torch.allclose(before[0] - W.detach(), expect_W, atol=1e-10, rtol=1e-10), step
        assert torch.allclose(before[1] - col.detach(), expect_c, atol=1e-10, rtol=1e-10), step
        assert torch.allclose(before[2] - vec.detach(), expect_v[0], atol=1e-10, rtol=1e-10), step
    assert bW["L"]["vecs"].shape == (5, 2) and float(bW["L"]["rho"]) > 0  # truncated: the test can fail


@pytest.mark.parametrize("opt_cls,extra", [(Shampoo, {}), (Sketchy, {"rank": 2})])
def test_empty_parameter_steps_with_the_others(opt_cls, extra):
    empty = nn.Parameter(torch.zeros(0, 3, dtype=D64))
    W = nn.Parameter(torch.ones(2, 3, dtype=D64))
    opt = opt_cls([empty, W], lr=0.1, **extra)
    empty.grad = torch.zeros(0, 3, dtype=D64)
    W.grad = torch.tensor(C, dtype=D64)
    opt.step()
    assert empty.shape == (0, 3) and not torch.equal(W.detach(), torch.ones(2, 3, dtype=D64))
    W.grad = torch.full((2, 3), float("inf"), dtype=D64)  # the check still names the bad one
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*expected finite"):
        opt.step()


def test_blocks_and_shapes():
    torch.manual_seed(0)
    m = Net()
    opt = Sketchy(m.parameters(), rank=3, **KW)
    losses = train(m, opt, list(batches(1)) * 30)  # fit one batch
    assert losses[-1] < 0.5 * losses[0]
    st = opt.state[m.conv.weight]  # [3, 2·3·3 = 18] → column blocks 8, 8, 2 (rows 3 < 8)
    assert [tuple(b["R"]["vecs"].shape) for b in st["blocks"]] == [(8, 3), (8, 3), (2, 2)]
    assert [tuple(b["L"]["vecs"].shape) for b in st["blocks"]] == [(3, 3)] * 3
    assert len(opt.state[m.emb.weight]["blocks"]) == 2  # [10, 5]: row blocks 8 and 2
    assert opt.state[m.scale]["blocks"] == [{}]  # a scalar follows its graft
    assert set(opt.state[m.lin.bias]["blocks"][0]) == {"R"}  # a vector gets one factor (p = 2)
    assert float(opt.state[m.emb.weight]["blocks"][0]["L"]["rho"]) > 0  # rank 3 < 8: mass escaped


def test_shampoo_roots_against_eigh():
    torch.manual_seed(1)
    m = Net()
    opt = Shampoo(m.parameters(), **{**KW, "update_freq": 4})
    train(m, opt, batches(9))  # roots were last refreshed at step 9
    for st in opt.state.values():
        for blk in st["blocks"]:
            p = 2 * len(blk)
            for f in blk.values():
                w, Q = torch.linalg.eigh(f["stat"])
                w = w.clamp_min(0)
                ref = (Q * (w + KW["eps"] * w.max()) ** (-1.0 / p)) @ Q.T
                assert torch.allclose(f["root"], ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))


def test_memory_formulas():
    lin = nn.Linear(32, 24, bias=False, dtype=D64)
    k = 5
    sk, sh = Sketchy(lin.parameters(), rank=k, lr=0.1), Shampoo(lin.parameters(), lr=0.1)
    lin(torch.randn(3, 32, dtype=D64)).sum().backward()
    sk.step()
    sh.step()
    assert sk.preconditioner_bytes() == 8 * (k * (24 + 32) + 2 * k * k + 2 * k + 4)
    ref = Sketchy(lin.parameters(), rank=k, lr=0.1, accumulate=False)
    ref.step()
    assert ref.preconditioner_bytes() == 8 * (k * (24 + 32) + 2 * k + 2)
    assert sh.preconditioner_bytes() == 8 * (2 * (24 ** 2 + 32 ** 2) + 24 + 32)


def test_start_step_follows_graft():
    torch.manual_seed(2)
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    oa = Shampoo(a.parameters(), lr=0.05, betas=(0.0, 0.9), graft="sgd", start_step=5)
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    data = list(batches(6))
    train(a, oa, data[:4])
    train(b, ob, data[:4])
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    train(a, oa, data[4:])
    train(b, ob, data[4:])
    assert not all(torch.allclose(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("opt_cls,extra", [(Shampoo, {}), (Sketchy, {"rank": 3})])
def test_state_dict_round_trip_mid_training(opt_cls, extra):
    torch.manual_seed(3)
    m = Net()
    kw = {**KW, "update_freq": 3, "start_step": 2}
    opt = opt_cls(m.parameters(), **kw, **extra)
    data = list(batches(10, seed=4))
    train(m, opt, data[:5])
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
    after = train(m, opt, data[5:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    m2 = Net()
    m2.load_state_dict(saved["model"])
    opt2 = opt_cls(m2.parameters(), **kw, **extra)
    opt2.load_state_dict(saved["opt"])
    after2 = train(m2, opt2, data[5:])
    assert after == after2
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))



needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("opt_cls,extra", [(Shampoo, {}), (Sketchy, {"rank": 3}), (Sketchy, {"rank": 8})])
def test_cuda_steps_equal_cpu_steps_and_state_moves_between_devices(opt_cls, extra):
    """The same float64 run on CPU and CUDA takes the same steps (to eigh's rounding), keeps its state on
    the parameter's device, and a CPU state_dict loaded into a CUDA optimiser continues identically."""
    torch.manual_seed(0)
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base).cuda()
    kw = {**KW, "update_freq": 2}
    oa, ob = opt_cls(a.parameters(), **kw, **extra), opt_cls(b.parameters(), **kw, **extra)
    data = list(batches(12, seed=2))
    for img, tok, y in data[:6]:
        train(a, oa, [(img, tok, y)])
        train(b, ob, [(img.cuda(), tok.cuda(), y.cuda())])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb.cpu(), atol=1e-9, rtol=0)
    tensors = [v for st in ob.state.values() for v in _state_tensors(st)]
    assert tensors and all(v.device.type == "cuda" for v in tensors if v.dim() > 0)
    c = copy.deepcopy(a).cuda()
    oc = opt_cls(c.parameters(), **kw, **extra)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    for img, tok, y in data[6:]:
        train(a, oa, [(img, tok, y)])
        train(c, oc, [(img.cuda(), tok.cuda(), y.cuda())])
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.allclose(pa, pc.cpu(), atol=1e-9, rtol=0)


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v)

def test_float32_and_escaped_mass():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = Sketchy(m.parameters(), lr=0.01, rank=4, update_freq=2)
    g = torch.Generator().manual_seed(6)
    X, y = torch.randn(64, 20, generator=g), torch.randint(0, 3, (64,), generator=g)
    first = last = None
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(X), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.8 * first
    f = opt.state[m[0].weight]["blocks"][0]["R"]
    assert f["vecs"].dtype == torch.float32 and torch.isfinite(f["vecs"]).all() and float(f["rho"]) > 0
    # the sketch's eigenvectors stay orthonormal in float32
    V = f["vecs"][:, f["vals"] > 0]
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1]), atol=1e-5)


def test_bad_input():
    lin = nn.Linear(3, 2, dtype=D64)
    with pytest.raises(ValueError, match="lr: expected a finite number in \\[0.0"):
        Shampoo(lin.parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        Sketchy(lin.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="rank: expected an integer >= 1, got 0"):
        Sketchy(lin.parameters(), lr=0.1, rank=0)
    with pytest.raises(TypeError, match="rank"):
        Sketchy(lin.parameters(), lr=0.1, rank=2.5)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        Shampoo(lin.parameters(), betas=(0.9, 0.0))
    with pytest.raises(ValueError, match="graft"):
        Shampoo(lin.parameters(), graft="lion")
    with pytest.raises(ValueError, match="graft: 'adam' needs betas"):
        Shampoo(lin.parameters(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="update_freq"):
        Sketchy(lin.parameters(), update_freq=0)
    with pytest.raises(ValueError, match="eps"):
        Shampoo(lin.parameters(), eps=0.0)
    with pytest.raises(ValueError, match="shrink: expected one of \\('auto', 'svd', 'gram'\\), got 'qr'"):
        Sketchy(lin.parameters(), shrink="qr")
    # NaN gradients: the error names the parameter (by name when named_parameters() were given)
    opt = Sketchy(lin.named_parameters(), lr=0.1, rank=2)
    lin.weight.grad = torch.zeros(2, 3, dtype=D64)
    lin.bias.grad = torch.tensor([0.0, float("nan")], dtype=D64)
    with pytest.raises(ValueError, match="gradient of parameter 'bias': expected finite"):
        opt.step()
    opt = Shampoo(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] \(shape \(2,\)\)"):
        opt.step()
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        Shampoo(emb.parameters(), lr=0.1).step()
    # a sketch rank at or above the dimension is meaningless for a single vector learner
    with pytest.raises(ValueError, match="rank: expected an integer < d = 4"):
        SAdaGrad(4, rank=4, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        OGD(3, lr=-0.1)
    with pytest.raises(ValueError, match="g: expected finite"):
        OGD(2, lr=0.1).step(torch.tensor([float("nan"), 0.0]))
    with pytest.raises(TypeError, match="optimizer"):
        FactorSpectrumTracker(Sketchy(lin.parameters(), lr=0.1))


# ---------------------------------------------------------------------------------------------------
def subspace_grads(d=12, r=3, T=40, seed=7):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=D64))[0]
    return [Q @ torch.randn(r, generator=g, dtype=D64) for _ in range(T)]


def test_s_adagrad_equals_full_matrix_adagrad_in_a_subspace():
    # gradients in a 3-dim subspace: an FD sketch of rank 4 is exact (no escaped mass)
    a, b = SAdaGrad(12, rank=4, lr=0.3, delta=1e-3), FullMatrixAdaGrad(12, lr=0.3, delta=1e-3)
    for g in subspace_grads():
        a.step(g)
        b.step(g)
        assert torch.allclose(a.x, b.x, atol=1e-10)
    assert a.rho < 1e-20


def test_ada_fd_and_fd_son_against_dense_formulas():
    grads = subspace_grads(seed=8)
    delta, lr = 0.5, 0.7
    a, f = AdaFD(12, rank=4, lr=lr, delta=delta), FDSON(12, rank=4, lr=lr, delta=delta)
    xa, xf = torch.zeros(12, dtype=D64), torch.zeros(12, dtype=D64)
    H, S = torch.zeros(12, 12, dtype=D64), torch.zeros(12, 12, dtype=D64)
    I = torch.eye(12, dtype=D64)
    for t, g in enumerate(grads, start=1):
        H += torch.outer(g, g)
        S += torch.outer(g, g) / (lr * math.sqrt(t))
        w, Q = torch.linalg.eigh(H)
        xa -= lr * torch.linalg.solve(delta * I + (Q * w.clamp_min(0).sqrt()) @ Q.T, g)
        xf -= torch.linalg.solve(delta * I + S, g)
        a.step(g)
        f.step(g)
        assert torch.allclose(a.x, xa, atol=1e-9) and torch.allclose(f.x, xf, atol=1e-9)


def test_diagonal_adagrad_and_ogd_closed_forms():
    d = DiagonalAdaGrad(2, lr=1.0, delta=1e-12)
    o = OGD(2, lr=1.0)
    for g in ([1.0, 0.0], [1.0, 2.0]):
        d.step(torch.tensor(g, dtype=D64))
        o.step(torch.tensor(g, dtype=D64))
    assert torch.allclose(d.x, torch.tensor([-1 - 1 / math.sqrt(2), -1.0], dtype=D64), atol=1e-9)
    assert torch.allclose(o.x, torch.tensor([-1 - 1 / math.sqrt(2), -2 / math.sqrt(2)], dtype=D64))


def test_online_logistic_regret_bookkeeping():
    g = torch.Generator().manual_seed(9)
    X = torch.randn(30, 5, generator=g, dtype=D64)
    y = torch.where(X[:, 0] > 0, 1.0, -1.0).to(D64)
    w_star = torch.tensor([2.0, 0, 0, 0, 0], dtype=D64)
    learner = OGD(5, lr=0.5)
    res = online_logistic_regret(learner, X, y, w_star)
    comp = torch.nn.functional.softplus(-y * (X @ w_star)).sum()
    assert res.comparator_loss[-1] == pytest.approx(float(comp))
    assert res.cumulative_loss[0] == pytest.approx(math.log(2))  # x_1 = 0
    assert res.regret[-1] == pytest.approx(res.cumulative_loss[-1] - float(comp))
    assert learner.t == 30


def test_spectrum_tracker_and_plot(tmp_path):
    assert top_k_share(torch.tensor([0.0, 0.0]), 1) == 1.0
    assert top_k_share(torch.tensor([2.0, 1.0, 1.0]), 1) == 0.5
    torch.manual_seed(10)
    m = Net()
    opt = Shampoo(m.parameters(), **KW)
    tr = FactorSpectrumTracker(opt, ks=(1, 4), names=dict(m.named_parameters()))
    for s, batch in enumerate(batches(5), start=1):
        train(m, opt, [batch])
        tr.record(s)
    shares = tr.history["lin.weight[block 0].L"]
    assert [s for s, _ in shares] == [1, 2, 3, 4, 5]
    assert shares[0][1][4] == pytest.approx(1.0)  # 4×4 factor: top 4 hold all of it
    assert all(0 < v[1] <= v[4] + 1e-12 for _, v in shares)
    out = tmp_path / "spec.png"
    tr.figure().savefig(out)
    assert out.stat().st_size > 1000
