"""Sketched per-example gradients: explicit, implicit and factored modes equal Φ(exact gradients)."""

from __future__ import annotations

import pytest
import torch
from _helpers import batches, cnn, digits, gpt2, mlp, token_batch

from gradsketch.model import FactoredSketch, Task, causal_lm_loss, classifier_loss
from gradsketch.sketch import BlockSketch, sketch

TOL = 1e-9


def _blocks(task: Task, G: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(G, task.param_sizes, dim=1))


@pytest.mark.parametrize("kind", ["affd", "qk", "sjlt"])
@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_mlp_sketch_grads_equal_blocksketch_of_exact(kind, mode):
    X, y = digits(20)
    task = Task(mlp(), classifier_loss())
    S = task.block_sketch(256, kind=kind, seed=3)
    data = batches(X, y, 7)
    out = task.sketch_grads(data, S, mode=mode, progress=False, chunk_size=3)
    G = task.grads((X, y))
    expected = S(_blocks(task, G))
    assert out.shape == (20, 256)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
    # the same numbers through the explicit d x N matrix
    torch.testing.assert_close(out, G @ S.matrix().T, atol=TOL, rtol=0)


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_unhooked_explicit_and_implicit_paths(per_example):
    """per_example="vmap"/"loop" bypass the hook engine: explicit mode sketches vmapped (or looped) per-example
    gradients, implicit mode differentiates L(θ0 + Φᵀω) at ω = 0 literally. Both equal Φ(exact gradients),
    on a CNN (Conv2d, in-place ReLU) and on GPT-2 with padding."""
    from gradsketch.gradients import sketching

    X, y = digits(9, image=True)
    task = Task(cnn(), classifier_loss(), per_example=per_example)
    assert sketching.hook_engine(task) is None
    S = task.block_sketch(64, kind="qk", seed=4)
    G = task.grads((X, y))
    for mode in ("explicit", "implicit"):
        out = task.sketch_grads(batches(X, y, 4), S, mode=mode, progress=False, chunk_size=2)
        torch.testing.assert_close(out, S(_blocks(task, G)), atol=TOL, rtol=0)
    task = Task(gpt2(), causal_lm_loss(reduction="mean"), per_example=per_example)
    S = task.block_sketch(128, kind="sjlt", seed=5)
    b = token_batch(3, 8, seed=4, pad_rows={1: 5})
    G = task.grads(b)
    for mode in ("explicit", "implicit"):
        torch.testing.assert_close(task.sketch_grads([b], S, mode=mode, progress=False), S(_blocks(task, G)),
                                   atol=TOL, rtol=0)


def test_plain_sketch_and_list_blocksketch_accepted():
    X, y = digits(6)
    task = Task(mlp(), classifier_loss())
    S = sketch("dense", task.n_params, 32, seed=1)
    G = task.grads((X, y))
    torch.testing.assert_close(task.sketch_grads([(X, y)], S, progress=False), S(G), atol=TOL, rtol=0)
    B = BlockSketch(task.param_sizes, 32, kind="sjlt", seed=2)
    torch.testing.assert_close(task.sketch_grads([(X, y)], B, mode="implicit", progress=False),
                               B(_blocks(task, G)), atol=TOL, rtol=0)


def _kron_expected(task: Task, S: FactoredSketch, G: torch.Tensor) -> torch.Tensor:
    """Σ over Kronecker blocks of vec(F_r G'_p F_cᵀ) placed in the block's output slice, G'_p the weight
    gradient with its folded bias as an extra last column (Linear/Conv2d) or row (Conv1D), + the rest
    BlockSketch of the exact rest gradients."""
    parts = task.unflatten(G)
    B = G.shape[0]
    out = torch.zeros(B, S.d, dtype=G.dtype)
    for name, blk in S.blocks.items():
        fr, fc = (f.to(torch.float64) for f in blk.factor_matrices(torch.float64))
        g2 = parts[name].reshape(B, *S.shapes2d[name])
        if name in S.bias_of:
            bname, side = S.bias_of[name]
            gb = parts[bname].reshape(B, -1)
            g2 = torch.cat([g2, gb[:, :, None]], 2) if side == "cols" else torch.cat([g2, gb[:, None, :]], 1)
        y = (fr @ g2 @ fc.T).reshape(B, -1)
        off = S.offsets.get(name, 0)
        out[:, off:off + y.shape[1]] += y
    if S.rest is not None:
        out += S.rest([parts[n].reshape(B, -1) for n in S.rest_names])
    return out


def test_factored_mlp_equals_kronecker_sketch_of_exact_grads():
    X, y = digits(24)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    task = Task(model, classifier_loss())
    S = task.factored_sketch(64, seed=5)
    # biases fold into their weight's Kronecker block ([rows, cols + 1]): nothing is left for the rest
    assert set(S.blocks) == {"0.weight", "2.weight"} and S.rest_names == [] and S.rest is None
    assert S.bias_of == {"0.weight": ("0.bias", "cols"), "2.weight": ("2.bias", "cols")}
    out = task.sketch_grads(batches(X, y, 10), S, mode="factored", progress=False)
    G = task.grads((X, y))
    torch.testing.assert_close(out, _kron_expected(task, S, G), atol=TOL, rtol=0)
    # explicit mode with the same FactoredSketch is the same map
    torch.testing.assert_close(task.sketch_grads([(X, y)], S, progress=False), out, atol=TOL, rtol=0)


def test_factored_cnn_conv2d_inplace_relu_and_unfactorable_weight():
    X, y = digits(10, image=True)
    model = cnn(inplace=True)
    task = Task(model, classifier_loss())
    S = task.factored_sketch(16, seed=1)
    # conv weights [4, 1*3*3], [6, 4*3*3] and the Linear [10, 24] all factor d = 16
    assert "3.weight" in S.blocks and "6.weight" in S.blocks
    out = task.sketch_grads([(X, y)], S, mode="factored", progress=False)
    G = task.grads((X, y))
    torch.testing.assert_close(out, _kron_expected(task, S, G), atol=TOL, rtol=0)


def test_factored_gpt2_tied_embeddings_layernorm_and_padding():
    model = gpt2()
    task = Task(model, causal_lm_loss(reduction="sum"))
    S = task.factored_sketch(256, seed=0)
    kron = set(S.blocks)
    assert "transformer.wte.weight" in kron and "transformer.h.0.attn.c_attn.weight" in kron
    assert "transformer.ln_f.weight" in S.rest_names
    # Conv1D biases fold in as an extra row; the LayerNorm rest (640 >= d, affd) is dense: no scatter form
    assert S.bias_of["transformer.h.0.attn.c_attn.weight"] == ("transformer.h.0.attn.c_attn.bias", "rows")
    assert S.rest_scatter(torch.float64, torch.device("cpu")) is None
    data = [token_batch(3, 9, seed=1, pad_rows={0: 5}), token_batch(2, 9, seed=2, pad_rows={1: 3})]
    out = task.sketch_grads(data, S, mode="factored", progress=False)
    G = torch.cat([task.grads(b) for b in data])
    torch.testing.assert_close(out, _kron_expected(task, S, G), atol=TOL, rtol=0)
    # every parameter (position embeddings of position_ids [1, T] included) goes through the hooks
    from gradsketch.gradients.factored import FactoredEngine
    from gradsketch.model._batch import SplitBatch

    engine = FactoredEngine(task, S)
    engine.batch(SplitBatch(data[0]))
    assert engine.generic == []


def test_factored_generic_params_take_explicit_path():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10).double()
            self.gain = torch.nn.Parameter(torch.ones(10, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) * self.gain

    X, y = digits(9)
    task = Task(Scaled(), classifier_loss())
    S = task.factored_sketch(40, seed=2, kind="sjlt")
    assert S.rest_names == ["gain"] and "lin.weight" in S.blocks and "lin.bias" not in S.rest_names
    # a 10-coordinate CountSketch rest: applied as scatter-adds of its explicit sparse columns
    rows, vals = S.rest_scatter(torch.float64, torch.device("cpu"))
    M = torch.zeros(40, 10, dtype=torch.float64)
    for k in range(rows.shape[0]):
        M[rows[k], torch.arange(10)] += vals[k]
    torch.testing.assert_close(M, S.rest.matrix(), atol=0, rtol=0)
    out = task.sketch_grads([(X, y)], S, mode="factored", progress=False)
    torch.testing.assert_close(out, _kron_expected(task, S, task.grads((X, y))), atol=TOL, rtol=0)


@pytest.mark.parametrize("d", [64, 256])
def test_factored_sketch_spec_roundtrip_and_adjoint(d):
    task = Task(mlp(hidden=32), classifier_loss())
    S = task.factored_sketch(d, seed=7)
    assert set(S.blocks) == {"0.weight", "2.weight"} and len(S.bias_of) == 2 and S.rest is None
    S2 = FactoredSketch.from_spec(S.spec)
    x = [torch.randn(3, n, dtype=torch.float64) for n in task.param_sizes]
    torch.testing.assert_close(S(x), S2(x))
    yv = torch.randn(3, d, dtype=torch.float64)
    lhs = (S(x) * yv).sum()
    rhs = sum((a * b).sum() for a, b in zip(x, S.T(yv)))
    torch.testing.assert_close(lhs, rhs)
    # S is linear and S(x) is Σ_i over coordinates: the explicit matrix from unit vectors reproduces it
    eye = torch.eye(task.n_params, dtype=torch.float64)
    M = S(list(torch.split(eye, task.param_sizes, dim=1))).T  # [d, N]
    torch.testing.assert_close(S(x), torch.cat(x, 1) @ M.T)


def test_factored_embedded_conv2d_and_conv1d_blocks_with_folded_biases():
    """Blocks small enough to embed exactly (identity at an offset) write their folded bias as its own column
    (Conv2d: Σ over positions of δ) or row (Conv1D: Σ over positions of the input) next to the weight part."""
    X, y = digits(8, image=True)
    task = Task(cnn(), classifier_loss())
    S = task.factored_sketch(256, seed=2)  # [4, 9+1], [6, 36+1], [10, 24+1]: every block is embedded
    assert all(S.blocks[n].kind == "identity" for n in S.blocks) and len(S.offsets) == 3 and S.rest is None
    assert all(side == "cols" for _, side in S.bias_of.values())
    out = task.sketch_grads(batches(X, y, 4), S, mode="factored", progress=False)
    torch.testing.assert_close(out, _kron_expected(task, S, task.grads((X, y))), atol=TOL, rtol=0)

    model = gpt2()
    task = Task(model, causal_lm_loss(reduction="sum"))
    S = task.factored_sketch(8192, seed=1)  # attn.c_proj [64+1, 64] = 4160 <= 8192 is embedded, rows side
    emb = [n for n in S.offsets if S.blocks[n].kind == "identity" and S.bias_of.get(n, ("", ""))[1] == "rows"]
    assert "transformer.h.0.attn.c_proj.weight" in emb
    data = [token_batch(3, 7, seed=3, pad_rows={2: 4})]
    out = task.sketch_grads(data, S, mode="factored", progress=False)
    torch.testing.assert_close(out, _kron_expected(task, S, task.grads(data[0])), atol=TOL, rtol=0)


def test_factored_small_layer_embedded_exactly():
    """MLP 64-16-10 at d = 256: 2.weight with its bias is [10, 17] (170 <= 256 coordinates, no factorisation
    of 256 fits): written as it is into an output slice (exact), the rest of the output sketched."""
    X, y = digits(12)
    task = Task(mlp(), classifier_loss())
    S = task.factored_sketch(256, seed=4)
    assert S.rest is None and set(S.offsets) == {"2.weight"} and S.blocks["2.weight"].kind == "identity"
    sl = S.block_slice("2.weight")
    assert sl.stop - sl.start == 170 and 0 <= sl.start <= 256 - 170
    out = task.sketch_grads(batches(X, y, 5), S, mode="factored", progress=False)
    G = task.grads((X, y))
    torch.testing.assert_close(out, _kron_expected(task, S, G), atol=TOL, rtol=0)
    # the slice holds [G | g_b] of the last layer plus the (independent) sketch of the first layer there
    parts = task.unflatten(G)
    g = torch.cat([parts["2.weight"], parts["2.bias"][:, :, None]], 2).reshape(12, -1)
    first = S([parts[n].reshape(12, -1) if n.startswith("0.") else torch.zeros(12, s)
               for n, s in zip(task.param_names, task.param_sizes)])
    torch.testing.assert_close(out[:, sl] - first[:, sl], g, atol=TOL, rtol=0)
    # explicit and implicit modes with the same FactoredSketch are the same map
    torch.testing.assert_close(task.sketch_grads([(X, y)], S, progress=False), out, atol=TOL, rtol=0)
    torch.testing.assert_close(task.sketch_grads([(X, y)], S, mode="implicit", progress=False), out,
                               atol=TOL, rtol=0)
    # a spec whose embedded block is a full qk rotation (also accepted) is an exact isometry of the block
    spec = dict(S.spec, blocks=dict(S.spec["blocks"]))
    spec["blocks"]["2.weight"] = dict(kind="qk", n=170, d=170, seed=9, in_factors=[10, 17], out_factors=[10, 17])
    R = FactoredSketch.from_spec(spec)
    out_r = task.sketch_grads(batches(X, y, 5), R, mode="factored", progress=False)
    torch.testing.assert_close(out_r, _kron_expected(task, R, G), atol=TOL, rtol=0)
    yb = R.blocks["2.weight"](g)
    torch.testing.assert_close(yb.norm(dim=1), g.norm(dim=1), atol=0, rtol=1e-6)  # float32 Haar factors
    assert not torch.allclose(yb, g)


def test_factored_version1_spec_rebuilds_unfolded_map():
    """Specs written before biases were folded (no "version" key) rebuild the old map: biases in the rest."""
    task = Task(mlp(), classifier_loss())
    S = task.factored_sketch(64, seed=1)
    old = {k: v for k, v in S.spec.items() if k not in ("version", "bias_of", "offsets")}
    from gradsketch.gradients.factored import factor_pair

    # version 1 planned every weight (without its bias) as a full-d Kronecker block by factor_pair
    old["blocks"] = {}
    for n, b in S.spec["blocks"].items():
        rows, cols = b["in_factors"][0], b["in_factors"][1] - 1
        old["blocks"][n] = dict(kind="qk", n=rows * cols, d=64, seed=b["seed"], in_factors=[rows, cols],
                                out_factors=list(factor_pair(64, rows, cols)))
    old["rest"] = dict(sizes={"0.bias": 16, "2.bias": 10}, d=64, kind="sjlt", seed=5)
    S1 = FactoredSketch.from_spec(old)
    assert S1.bias_of == {} and S1.rest_names == ["0.bias", "2.bias"] and S1.shapes2d["0.weight"] == (16, 64)
    X, y = digits(6)
    out = task.sketch_grads([(X, y)], S1, mode="factored", progress=False)
    torch.testing.assert_close(out, _kron_expected(task, S1, task.grads((X, y))), atol=TOL, rtol=0)


def test_nan_policy_skip_records_indices_and_zeroes_rows():
    X, y = digits(10)
    X = X.clone()
    X[3, 0] = float("nan")
    X[8, 5] = float("inf")
    task = Task(mlp(), classifier_loss(), nan_policy="skip")
    S = task.block_sketch(64, kind="sjlt")
    for mode in ("explicit", "implicit"):
        out = task.sketch_grads(batches(X, y, 4), S, mode=mode, progress=False)
        assert task.skipped_indices_ == [3, 8]
        assert torch.all(out[[3, 8]] == 0) and torch.isfinite(out).all()
    F = task.factored_sketch(32)
    out = task.sketch_grads(batches(X, y, 4), F, mode="factored", progress=False)
    assert task.skipped_indices_ == [3, 8] and torch.all(out[[3, 8]] == 0)
    G = task.grads((X, y))
    assert task.skipped_indices_ == [3, 8] and torch.all(G[[3, 8]] == 0)


def test_iter_sketch_grads_streams_batches():
    X, y = digits(10)
    task = Task(mlp(), classifier_loss())
    S = task.block_sketch(64, kind="sjlt")
    parts = list(task.iter_sketch_grads(batches(X, y, 4), S, progress=False))
    assert [p.shape[0] for p in parts] == [4, 4, 2]


@pytest.mark.parametrize("which", ["cnn", "gpt2"])
def test_explicit_blocksketch_on_conv_and_transformer_equals_sketch_of_exact(which):
    """Explicit mode forms each group's per-example gradients in place in a reused scratch buffer (Conv2d
    via batched matmul, Conv1D/Embedding/LayerNorm with several positions per example, tied embeddings)."""
    if which == "cnn":
        X, y = digits(10, image=True)
        task = Task(cnn(), classifier_loss())
        data = batches(X, y, 4)
        G = task.grads((X, y))
    else:
        task = Task(gpt2(), causal_lm_loss(reduction="sum"))
        data = [token_batch(3, 9, seed=1, pad_rows={0: 5}), token_batch(2, 9, seed=2)]
        G = torch.cat([task.grads(b) for b in data])
    S = task.block_sketch(64, kind="sjlt", seed=2, min_group=128)
    assert len(S.groups) > 1
    out = task.sketch_grads(data, S, progress=False, chunk_size=2)
    torch.testing.assert_close(out, S(_blocks(task, G)), atol=TOL, rtol=0)


def test_sketch_grads_batches_of_changing_size_and_iterators():
    """The result is preallocated from the first batch when len(data) is known; batches larger than the
    first and one-shot iterators take the concatenating path. All give the same rows."""
    X, y = digits(15)
    task = Task(mlp(), classifier_loss())
    S = task.factored_sketch(64, seed=3)
    ref = task.sketch_grads([(X, y)], S, mode="factored", progress=False)
    sizes = [(0, 3), (3, 10), (10, 15)]  # 3, then 7 (larger than the first), then 5
    data = [(X[a:b], y[a:b]) for a, b in sizes]
    for d in (data, iter(data)):
        for mode in ("factored", "explicit"):
            out = task.sketch_grads(d if isinstance(d, list) else iter(data), S, mode=mode, progress=False)
            assert out.shape == (15, 64)
            torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_block_plan_keeps_a_small_side_whole():
    from gradsketch.gradients.factored import block_plan, factor_pair

    # a 10-class head with its bias: ten output gradients are kept exact, the 1025 inputs go to 409
    assert factor_pair(4096, 10, 1025) == (8, 512)
    assert block_plan(4096, 10, 1025) == (10, 409)
    assert block_plan(4096, 1025, 10) == (409, 10)
    # a big square layer: the exact factorisation of d (balanced compression) is better
    assert block_plan(4096, 1024, 1025) == (64, 64)
    task = Task(mlp(hidden=32), classifier_loss())
    S = task.factored_sketch(64, seed=5)
    spec = S.spec["blocks"]["2.weight"]  # [10, 33] with the bias: (10, 6) beats (8, 8)
    assert spec["out_factors"] == [10, 6] and spec["d"] == 60 and 0 <= S.offsets["2.weight"] <= 4
    fr, _ = S.blocks["2.weight"].factor_matrices(torch.float64)  # the kept side is an exact rotation
    scale = (spec["n"] / spec["d"]) ** 0.5
    # the Haar factors are stored in float32
    torch.testing.assert_close(fr.T @ fr / scale**2, torch.eye(10, dtype=torch.float64), atol=1e-6, rtol=0)


def test_weight_also_used_outside_its_module_is_caught_by_the_self_check():
    """A Linear weight also applied with F.linear elsewhere: the hooks see only the module call, so the first
    batch's check of Σ_i G_i against the batch gradient moves it (and its bias) to the exact vmapped path.
    Explicit, implicit and factored modes still equal the sketch of the exact gradients."""

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(64, 16)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x):
            h = torch.tanh(self.lin(x)) + torch.nn.functional.linear(x.flip(1), self.lin.weight)
            return self.head(h)

    X, y = digits(10)
    for mode in ("explicit", "implicit", "factored"):
        task = Task(Shared().double(), classifier_loss())
        G = task.grads((X, y))
        S = task.factored_sketch(32, seed=1) if mode == "factored" else task.block_sketch(48, kind="qk", seed=1)
        out = task.sketch_grads(batches(X, y, 5), S, mode=mode, progress=False)
        expected = _kron_expected(task, S, G) if mode == "factored" else S(_blocks(task, G))
        if mode == "factored":  # the moved weight's block is computed from its exact per-example gradient
            from gradsketch.gradients.factored import FactoredEngine
            from gradsketch.model._batch import SplitBatch

            eng = FactoredEngine(task, S)
            eng.batch(SplitBatch((X, y)))
            assert "lin.weight" in eng.generic and "head.weight" not in eng.generic
        torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
