"""Sketched per-example gradients: explicit, implicit and factored modes equal Φ(exact gradients)."""

from __future__ import annotations

import pytest
import torch
from test_model_common import batches, cnn, digits, gpt2, mlp, token_batch

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
    """Σ_p over Kronecker blocks vec(F_r G_p F_cᵀ) + rest BlockSketch of the exact rest gradients."""
    parts = task.unflatten(G)
    out = torch.zeros(G.shape[0], S.d, dtype=G.dtype)
    for name, blk in S.blocks.items():
        fr, fc = (f.to(torch.float64) for f in blk.factor_matrices(torch.float64))
        g2 = parts[name].reshape(G.shape[0], *S.shapes2d[name])
        out += (fr @ g2 @ fc.T).reshape(G.shape[0], -1)
    if S.rest is not None:
        out += S.rest([parts[n].reshape(G.shape[0], -1) for n in S.rest_names])
    return out


def test_factored_mlp_equals_kronecker_sketch_of_exact_grads():
    X, y = digits(24)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()
    task = Task(model, classifier_loss())
    S = task.factored_sketch(64, seed=5)
    assert set(S.blocks) == {"0.weight", "2.weight"} and S.rest_names == ["0.bias", "2.bias"]
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
    data = [token_batch(3, 9, seed=1, pad_rows={0: 5}), token_batch(2, 9, seed=2, pad_rows={1: 3})]
    out = task.sketch_grads(data, S, mode="factored", progress=False)
    G = torch.cat([task.grads(b) for b in data])
    torch.testing.assert_close(out, _kron_expected(task, S, G), atol=TOL, rtol=0)
    # every parameter (position embeddings of position_ids [1, T] included) goes through the hooks
    from gradsketch.model._batch import SplitBatch
    from gradsketch.model.factored import FactoredEngine

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
    assert "gain" in S.rest_names and "lin.weight" in S.blocks
    out = task.sketch_grads([(X, y)], S, mode="factored", progress=False)
    torch.testing.assert_close(out, _kron_expected(task, S, task.grads((X, y))), atol=TOL, rtol=0)


def test_factored_sketch_spec_roundtrip_and_adjoint():
    task = Task(mlp(hidden=32), classifier_loss())
    S = task.factored_sketch(64, seed=7)
    S2 = FactoredSketch.from_spec(S.spec)
    x = [torch.randn(3, n, dtype=torch.float64) for n in task.param_sizes]
    torch.testing.assert_close(S(x), S2(x))
    yv = torch.randn(3, 64, dtype=torch.float64)
    lhs = (S(x) * yv).sum()
    rhs = sum((a * b).sum() for a, b in zip(x, S.T(yv)))
    torch.testing.assert_close(lhs, rhs)


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
