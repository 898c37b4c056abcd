"""GGNOperator(frozen=True): the products of the plain operator (float64, to rounding) with the outputs, vjps and
output Hessian blocks kept between products; a loss coupling the examples keeps the full output HVP."""

from __future__ import annotations

import pytest
import torch
from test_attribution import tiny

from gradsketch.attribution import batches
from gradsketch.curvature import GGNOperator
from gradsketch.model import Task


def _V(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("max_batch_columns", [None, 6])
def test_frozen_products_equal_the_plain_ones(max_batch_columns):
    task, (X, y), _ = tiny()
    data = batches(X, y, batch_size=4)
    plain = GGNOperator(task, data, max_batch_columns=max_batch_columns)
    frozen = GGNOperator(task, data, max_batch_columns=max_batch_columns, frozen=True)
    N = task.n_params
    for k, seed in [(3, 0), (1, 1), (5, 2), (3, 3)]:  # widths change the pieces when max_batch_columns is set
        V = _V(N, k, seed)
        torch.testing.assert_close(frozen @ V, plain @ V, rtol=1e-12, atol=1e-14)
    assert frozen._states and all(st[4] is not None for st in frozen._states.values())  # CE: blocks kept
    torch.testing.assert_close(frozen.to_dense(), plain.to_dense(), rtol=1e-12, atol=1e-14)


def test_loss_coupling_the_examples_keeps_the_full_output_hvp():
    """ℓ_i = (z_i − mean_j z_j)²: the output Hessian is not block diagonal over examples, so per-example blocks
    would be wrong; the frozen operator notices (random-direction check) and keeps the full HVP."""
    task, (X, y), _ = tiny()

    def coupled(z, b):
        return ((z - z.mean(0, keepdim=True)) ** 2).sum(1)

    t = Task(task.model, output_fn=lambda m, b: m(b[0]), loss_on_output=coupled)
    data = batches(X, y, batch_size=6)
    plain, frozen = GGNOperator(t, data), GGNOperator(t, data, frozen=True)
    V = _V(t.n_params, 4, 5)
    torch.testing.assert_close(frozen @ V, plain @ V, rtol=1e-12, atol=1e-14)
    assert all(st[4] is None for st in frozen._states.values())


def test_frozen_options_are_checked():
    task, (X, y), _ = tiny()
    data = batches(X, y, batch_size=4)
    with pytest.raises(ValueError, match="frozen"):
        GGNOperator(task, data, sampling="batch", frozen=True)
    with pytest.raises(TypeError, match="frozen"):
        GGNOperator(task, data, frozen=1)


def test_loss_gradient_start_equals_the_explicit_gradient_combinations():
    """Σ_i r_ij ∇ℓ_i through the frozen vjps equals the per-example gradients formed explicitly, with r drawn
    per batch in order (the Arnoldi start block), for whole batches and for pieces of them."""
    from test_attribution_arnoldi_defaults import _explicit_start

    from gradsketch.attribution.methods import gradient_start

    task, (X, y), _ = tiny()
    data = batches(X, y, batch_size=4)
    want = _explicit_start(task, data, 3, seed=7)
    for mbc in (None, 6):
        op = GGNOperator(task, data, max_batch_columns=mbc, frozen=True)
        got = op.loss_gradient_start(3, torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gradient_start(task, data, 3, 7), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="frozen"):
        GGNOperator(task, data).loss_gradient_start(3, torch.Generator())
