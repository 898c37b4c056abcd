"""SubspaceModel and train(): exact gradients on tiny float64 models, ω = 0 identity, SAID, state, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from gradsketch.intrinsic import SubspaceModel, train
from gradsketch.intrinsic.train import History

KINDS = ["dense", "sjlt", "fjl", "ffd", "affd", "afjl", "qk"]


def tiny_mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)  # n = 30+5+15+3 = 53


def data(seed=1, m=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 6, generator=g, dtype=dtype), torch.randint(0, 3, (m,), generator=g)


def flat_grad_at(model, params, x, y):
    """∇_θ L at θ = params (dict of the selected tensors), flattened in the given order."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        named = dict(m.named_parameters())
        for k, v in params.items():
            named[k].copy_(v)
    for p in m.parameters():
        p.requires_grad_(True)
    loss = nn.functional.cross_entropy(m(x), y)
    gs = torch.autograd.grad(loss, [dict(m.named_parameters())[k] for k in params])
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_is_sketched_full_gradient(kind):
    """∇_ω L(θ0 + cΦᵀω) = c·Φ ∇_θ L(θ) exactly (explicit Φ from sketch.matrix(), float64)."""
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 16, kind=kind, seed=3)
    with torch.no_grad():
        sm.omega.copy_(torch.randn(16, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    loss = nn.functional.cross_entropy(sm(x), y)
    (g_omega,) = torch.autograd.grad(loss, [sm.omega])
    theta = {k: v.detach() for k, v in sm.current_params().items()}
    g_full = flat_grad_at(sm.model, theta, x, y)
    M = sm.sketch.matrix()  # [d, n], columns in parameter order
    assert M.shape == (16, sm.n) and sm.n == 53
    torch.testing.assert_close(g_omega, sm.scale * (M @ g_full), rtol=1e-10, atol=1e-12)
    # and θ − θ0 is exactly c Φᵀω (no per-tensor rescaling, no cropping of ω)
    delta = torch.cat([v.reshape(-1) for v in sm.deltas().values()])
    torch.testing.assert_close(delta.detach(), sm.scale * (M.T @ sm.omega.detach()), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["affd", "ffd", "qk", "fjl"])
def test_gradcheck_and_gradgradcheck(kind):
    """Catches a wrongly scaled Hadamard backward (the 1/L bug of public ports)."""
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 8, kind=kind, seed=1, said=True)

    def f(w, lam):
        return torch.func.functional_call(sm, {"omega": w, "said_lambda": lam}, (x,))

    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    lam = torch.rand(4, dtype=torch.float64).add(0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (w, lam))
    assert torch.autograd.gradgradcheck(f, (w, lam))


def test_normalisation_no_offset_inflation():
    """c²‖Φ‖_F² = (d/n)·‖Φ‖_F² ≈ d regardless of the number of tensors (no √#tensors inflation).
    Dense: ‖Φ‖_F² ~ χ²_{nd}/d, relative s.d. √(2/(nd)) < 0.01 here, so ±10% fails with prob. < 1e-20."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)]).double()  # 24 tensors, n = 864
    sm = SubspaceModel(model, 64, kind="dense", seed=0)
    M = sm.sketch.matrix()
    ratio = sm.scale ** 2 * float((M ** 2).sum()) / 64
    assert 0.9 < ratio < 1.1


@pytest.mark.parametrize("kind", ["affd", "qk", "dense"])
def test_omega_zero_reproduces_outputs_exactly(kind):
    model = tiny_mlp(dtype=torch.float32)
    x = data(dtype=torch.float32)[0]
    ref = model(x)
    sm = SubspaceModel(model, 8, kind=kind)
    assert torch.equal(sm(x), ref)
    sm_s = SubspaceModel(tiny_mlp(dtype=torch.float32), 8, kind=kind, said=True)
    assert torch.equal(sm_s(x), ref)


def test_transformers_kwargs_pass_through():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}
    ref = model(**batch)
    sm = SubspaceModel(model, 32, kind="affd", params=lambda name, p: "embeddings" not in name)
    out = sm(**batch)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    out.loss.backward()
    assert sm.omega.grad is not None and sm.omega.grad.abs().sum() > 0
    # the caller's model is not modified: its flags stay on, no gradient reaches it, only ω/λ are parameters
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, _ in sm.named_parameters()] == ["omega"]
    assert sm.n == sum(p.numel() for k, p in model.named_parameters() if "embeddings" not in k)


def test_said_accounting_and_gradient():
    """SAID: θ_i = θ0_i + λ_i c(Φᵀω)_i; n_trainable = d + #tensors; ∇λ_i = ⟨g_i, c(Φᵀω)_i⟩,
    ∇ω = c Σ_i λ_i Φ_i g_i (float64, exact)."""
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 10, kind="affd", seed=2, said=True)
    assert sm.n_trainable == 10 + 4
    assert sum(p.numel() for p in sm.parameters() if p.requires_grad) == 14
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sm.omega.copy_(torch.randn(10, generator=g, dtype=torch.float64))
        sm.said_lambda.copy_(torch.rand(4, generator=g, dtype=torch.float64) + 0.5)
    loss = nn.functional.cross_entropy(sm(x), y)
    g_omega, g_lam = torch.autograd.grad(loss, [sm.omega, sm.said_lambda])
    theta = {k: v.detach() for k, v in sm.current_params().items()}
    g_full = flat_grad_at(sm.model, theta, x, y)
    M = sm.sketch.matrix()
    sizes = [dict(sm.model.named_parameters())[k].numel() for k in sm.param_names]
    u = sm.scale * (M.T @ sm.omega.detach())  # c Φᵀω, [n]
    lam_rep = torch.repeat_interleave(sm.said_lambda.detach(), torch.tensor(sizes))
    torch.testing.assert_close(g_omega, sm.scale * (M @ (lam_rep * g_full)), rtol=1e-10, atol=1e-12)
    expect_lam = torch.stack([(a * b).sum() for a, b in zip(torch.split(g_full, sizes), torch.split(u, sizes))])
    torch.testing.assert_close(g_lam, expect_lam, rtol=1e-10, atol=1e-12)


def test_active_dim_masks_value_and_gradient():
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 16, kind="affd")
    with torch.no_grad():
        sm.omega.fill_(1.0)
    sm.set_active_dim(4)
    assert sm.n_trainable == 4 and torch.all(sm.omega[4:] == 0)
    nn.functional.cross_entropy(sm(x), y).backward()
    assert torch.all(sm.omega.grad[4:] == 0) and sm.omega.grad[:4].abs().sum() > 0
    with pytest.raises(ValueError, match="k: expected an integer in"):
        sm.set_active_dim(17)


def test_state_dict_round_trip():
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 12, kind="qk", seed=4, said=True)
    train(sm, (x, y), steps=5, lr=0.1, progress=False)
    sm.set_active_dim(12)
    out = sm(x)
    sd = sm.state_dict()
    assert "omega" in sd and "said_lambda" in sd and "model.0.weight" in sd
    sm2 = SubspaceModel(tiny_mlp(), 12, kind="qk", seed=4, said=True)
    sm2.load_state_dict(sd)
    assert torch.equal(sm2(x), out)
    sm3 = SubspaceModel(tiny_mlp(), 12, kind="qk", seed=4, said=True)
    sm3.load_subspace_state_dict(sm.subspace_state_dict())
    assert torch.equal(sm3(x), out)
    merged = sm.merged_model()
    torch.testing.assert_close(merged(x), out, rtol=0, atol=0)
    wrong = SubspaceModel(tiny_mlp(), 12, kind="qk", seed=5, said=True)
    with pytest.raises(ValueError, match="same subspace spec"):
        wrong.load_subspace_state_dict(sm.subspace_state_dict())


def test_train_deterministic_and_history():
    x, y = data(m=40)

    def run():
        sm = SubspaceModel(tiny_mlp(), 8, kind="affd")
        h = train(sm, (x, y), lambda m: -float(nn.functional.cross_entropy(m(x), y)), steps=12, batch_size=8,
                  eval_every=4, lr=0.05, seed=3, progress=False)
        return sm.omega.detach().clone(), h

    w1, h1 = run()
    w2, h2 = run()
    assert torch.equal(w1, w2)
    assert [r["step"] for r in h1.records] == [0, 4, 8, 12] and h1.steps == 12
    assert h1.best_metric >= h1.records[0]["metric"]
    # an iterable of batches (a DataLoader) works too, epochs counted by len()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    h3 = train(SubspaceModel(tiny_mlp(), 8, kind="affd"), dl, epochs=2, progress=False)
    assert h3.steps == 8 and isinstance(h3, History)


# -- errors ----------------------------------------------------------------------------------------
def test_error_d_greater_than_n():
    with pytest.raises(ValueError, match=r"d: kind 'affd' needs d <= n.*d=64 > n=53"):
        SubspaceModel(tiny_mlp(), 64, kind="affd")
    assert SubspaceModel(tiny_mlp(), 64, kind="dense").n_trainable == 64  # dense allows d > n


def test_error_no_parameter_selected():
    with pytest.raises(ValueError, match="params: no trainable parameter selected"):
        SubspaceModel(tiny_mlp(), 4, params=lambda name, p: False)
    with pytest.raises(ValueError, match="params: no trainable parameter selected"):
        SubspaceModel(tiny_mlp(), 4, params=[])
    with pytest.raises(ValueError, match="params: 'nope' is not a parameter"):
        SubspaceModel(tiny_mlp(), 4, params=["nope"])
    with pytest.raises(ValueError, match="kind: expected one of"):
        SubspaceModel(tiny_mlp(), 4, kind="gauss")
    with pytest.raises(ValueError, match="d: expected a positive integer"):
        SubspaceModel(tiny_mlp(), 0)
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        SubspaceModel("mlp", 4)


def test_train_errors_and_nan():
    x, y = data()
    frozen = tiny_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model: expected at least one parameter with requires_grad"):
        train(frozen, (x, y), steps=1, progress=False)
    sm = SubspaceModel(tiny_mlp(), 4)
    with pytest.raises(ValueError, match="steps, epochs: expected exactly one"):
        train(sm, (x, y), steps=1, epochs=1, progress=False)
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        train(sm, (x, y), steps=1, optimizer="lbfgs2", progress=False)
    with pytest.raises(TypeError, match="train_data: expected"):
        train(sm, 3, steps=1, progress=False)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if calls["n"] == 4 else loss

    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        h = train(sm, (x, y), loss_fn=loss_fn, steps=10, progress=False)
    assert h.nan_step == 4 and h.steps == 3 and math.isnan(h.best_metric)
    calls["n"] = 0
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train(sm, (x, y), loss_fn=loss_fn, steps=10, on_nan="raise", progress=False)


# -- the fused θ0 + cΦᵀω autograd.Function (issue 18: memory of subspace training) --------------------------
@pytest.mark.parametrize("kind", ["affd", "afjl", "qk", "fjl", "ffd"])
def test_fused_adjoint_gradcheck_and_equals_autograd(kind):
    """Without SAID, θ = θ0 + cΦᵀω is one autograd.Function whose backward applies Φ to ∂L/∂θ: gradcheck and
    gradgradcheck in float64, and ∇_ω equals autograd through the sketch's own Φᵀ ops (the old path)."""
    x, y = data()
    sm = SubspaceModel(tiny_mlp(), 12, kind=kind, seed=2)

    def f(w):
        return torch.func.functional_call(sm, {"omega": w}, (x,))

    w = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))
    loss = nn.functional.cross_entropy(f(w), y)
    (g_fused,) = torch.autograd.grad(loss, [w])
    # reference: autograd through the sketch's Φᵀ (its torch ops recorded), θ0 + cΦᵀω by hand
    named = dict(sm.model.named_parameters())
    parts = sm.sketch.T(w * sm.scale)
    params = {k: named[k].detach() + parts[k].reshape(named[k].shape) for k in sm.param_names}
    loss_ref = nn.functional.cross_entropy(torch.func.functional_call(sm.model, params, (x,)), y)
    (g_ref,) = torch.autograd.grad(loss_ref, [w])
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-12, atol=1e-14)
    # the fused θ equals θ0 + cΦᵀω exactly as the reference built it
    with torch.no_grad():
        sm.omega.copy_(w)
    for k, v in sm.current_params().items():
        torch.testing.assert_close(v.detach(), params[k].detach(), rtol=0, atol=1e-14)


def test_fused_adjoint_forward_mode():
    """Forward-mode AD through the Function (its jvp): the directional derivative of the outputs along t
    equals the central difference (f(w + εt) − f(w − εt))/2ε in float64 (error O(ε²) ≈ 1e-10)."""
    x, _ = data()
    sm = SubspaceModel(tiny_mlp(), 10, kind="affd", seed=5)

    def f(w):
        return torch.func.functional_call(sm, {"omega": w}, (x,))

    g = torch.Generator().manual_seed(6)
    w, t = torch.randn(10, dtype=torch.float64, generator=g), torch.randn(10, dtype=torch.float64, generator=g)
    _, jt = torch.func.jvp(f, (w,), (t,))
    eps = 1e-5
    fd = (f(w + eps * t) - f(w - eps * t)) / (2 * eps)
    torch.testing.assert_close(jt, fd.detach(), rtol=1e-7, atol=1e-8)


# -- regenerate=True: no stored sketch state between calls (issue 18: fjl/ffd subspace memory) ------------------
@pytest.mark.parametrize("kind", ["fjl", "ffd", "affd", "qk"])
def test_regenerate_is_the_same_map_and_holds_no_state(kind):
    """A BlockSketch with regenerate=True is the same matrix as the stored one (forward, adjoint, explicit
    matrix, equal in float64 to the last bit), holds 0 bytes of state and records nothing in its spec;
    several groups (min_group small) so that building one group at a time is exercised."""
    from gradsketch.sketch import BlockSketch

    shapes = {"a": (40, 30), "b": 50, "c": (7, 9), "d": 300}
    kw = dict(d=32, kind=kind, seed=7, min_group=64)
    stored, lazy = BlockSketch(shapes, **kw), BlockSketch(shapes, regenerate=True, **kw)
    assert len(stored.groups) >= 3 and lazy.groups == stored.groups
    assert stored.state_bytes() > 0 and lazy.state_bytes() == 0 and lazy.spec == stored.spec
    g = torch.Generator().manual_seed(3)
    xs = {k: torch.randn(2, *((s,) if isinstance(s, int) else s), generator=g, dtype=torch.float64)
          for k, s in shapes.items()}
    assert torch.equal(lazy(xs), stored(xs))
    y = torch.randn(2, 32, generator=g, dtype=torch.float64)
    a, b = lazy.T(y), stored.T(y)
    assert all(torch.equal(a[k], b[k]) for k in shapes)
    assert torch.equal(lazy.matrix(), stored.matrix())


@pytest.mark.parametrize("kind", ["fjl", "ffd"])
def test_subspace_regenerate_equals_stored(kind):
    """SubspaceModel(..., regenerate=True): the same θ, loss and ∇_ω as the stored sketch (float64, exact), and
    still gradcheck/gradgradcheck-correct."""
    x, y = data()
    stored = SubspaceModel(tiny_mlp(), 12, kind=kind, seed=2)
    lazy = SubspaceModel(tiny_mlp(), 12, kind=kind, seed=2, regenerate=True)
    assert lazy.sketch.state_bytes() == 0 and lazy.spec == stored.spec
    w = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    grads = []
    for sm in (stored, lazy):
        out = torch.func.functional_call(sm, {"omega": w}, (x,))
        grads.append(torch.autograd.grad(nn.functional.cross_entropy(out, y), [w])[0])
    assert torch.equal(grads[0], grads[1])

    def f(v):
        return torch.func.functional_call(lazy, {"omega": v}, (x,))

    assert torch.autograd.gradcheck(f, (w,))
    assert torch.autograd.gradgradcheck(f, (w,))


def test_regenerate_rejects_non_bool():
    from gradsketch.sketch import BlockSketch

    with pytest.raises(TypeError, match="regenerate: expected True or False"):
        BlockSketch([10, 20], d=4, kind="fjl", regenerate="yes")


@pytest.mark.parametrize("s", [1, 2, 3])
def test_hashed_rows_drawn_as_int32_equal_the_int64_draws(s):
    """The CountSketch rows are drawn as int32 directly (no int64 copy per regenerated map): the same values as
    the former int64 draw cast to int32, so every existing sjlt/fjl sketch keeps its matrix."""
    from gradsketch.sketch.kinds import _Hashed

    n, d = 5000, 37
    new = _Hashed.draw(n, d, s, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    bounds = [d * j // s for j in range(s + 1)]
    old = torch.stack([bounds[j] + torch.randint(0, bounds[j + 1] - bounds[j], (n,), generator=g, dtype=torch.int64)
                       for j in range(s)]).to(torch.int32)
    assert new.dtype == torch.int32 and new.shape == (s, n) and torch.equal(new, old)


@pytest.mark.parametrize("s", [1, 3])
def test_fjl_int16_rows_are_the_int32_map(s):
    """FJL keeps its row indices as int16 on the CPU when d <= 2^15 (issue 18: MiniLM fjl state 310 -> 242 MB):
    the same values as the int32 draw, and every map (no-autograd fast paths with the native kernels, the
    autograd paths, the explicit matrix) equals, bit for bit in float64, the same sketch with int32 rows; the
    adjoint identity holds; d > 2^15 and non-CPU devices keep int32."""
    import copy

    from gradsketch.sketch import sketch
    from gradsketch.sketch.kinds import _Hashed

    g16, g32 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    r16 = _Hashed.draw(3000, 300, s, g16, torch.int16)
    assert r16.dtype == torch.int16 and torch.equal(r16.to(torch.int32), _Hashed.draw(3000, 300, s, g32))
    assert torch.equal(torch.rand(4, generator=g16), torch.rand(4, generator=g32))  # same generator use after

    S = sketch("fjl", 700, 40, seed=9, s=s)
    assert S._bufs["rows"].dtype == torch.int16 and S.state_bytes() == 1024 * (1 + s * 6)
    W = copy.deepcopy(S)
    W._bufs["rows"] = W._bufs["rows"].to(torch.int32)
    gen = torch.Generator().manual_seed(2)
    for m in (1, 3):
        x = torch.randn(m, 700, generator=gen, dtype=torch.float64)
        y = torch.randn(m, 40, generator=gen, dtype=torch.float64)
        assert torch.equal(S(x), W(x)) and torch.equal(S.T(y), W.T(y))
        xr = x.clone().requires_grad_(True)
        assert torch.equal(S(xr), W(x))  # the autograd path (index_add on widened rows)
        assert torch.allclose((S(x) * y).sum(), (x * S.T(y)).sum(), rtol=1e-12)
    assert torch.equal(S.matrix(), W.matrix())
    assert S._rows_dtype(torch.device("cuda")) == torch.int32
    assert sketch("fjl", 33_000, 1 << 15, seed=1)._bufs["rows"].dtype == torch.int16
    assert sketch("fjl", 33_000, (1 << 15) + 1, seed=1)._bufs["rows"].dtype == torch.int32
