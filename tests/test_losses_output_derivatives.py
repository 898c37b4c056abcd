"""Closed-form output derivatives of the classifier losses (``gradsketch.losses.OutputLoss``, what TRAK's
``kernel="ggn_trace"`` reads): against autograd's gradient and Hessian trace in float64, for class and token
outputs with ignored targets, at confidence where 1 − p_y is below float64's resolution, and for MSE."""

from __future__ import annotations

import pytest
import torch

from gradsketch.curvature.kfac import output_loss_derivatives
from gradsketch.model.losses import (
    OutputLoss,
    cross_entropy_output_derivatives,
    cross_entropy_per_example,
    mse_output_derivatives,
    mse_per_example,
)


def autograd_parts(loss, z, t):
    """(∂ℓ/∂z flattened, tr ∂²ℓ/∂z²) by autograd: one backward per output."""
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(zz, t).sum(), zz, create_graph=True)
    g = g.reshape(z.shape[0], -1)
    tr = torch.zeros(z.shape[0], dtype=torch.float64)
    for j in range(g.shape[1]):
        (h,) = torch.autograd.grad(g[:, j].sum(), zz, retain_graph=True)
        tr += h.reshape(z.shape[0], -1)[:, j]
    return g.detach(), tr


@pytest.mark.parametrize("shape", [(7, 5), (4, 3, 6)])
def test_cross_entropy_closed_form_equals_autograd(shape):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    y.view(-1)[1] = -100                       # an ignored target
    if len(shape) == 3:
        y[2] = -100                            # an example with no valid token: loss 0, derivatives 0
    e, t = cross_entropy_output_derivatives(z, y)
    e_ref, t_ref = autograd_parts(cross_entropy_per_example, z, y)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-15)
    if len(shape) == 3:
        assert float(e[2].abs().max()) == 0.0 and float(t[2]) == 0.0


def test_cross_entropy_closed_form_keeps_precision_when_confident():
    """z = (60, 0, −5): 1 − p_y ≈ 8.8e-27 is below float64's resolution at 1 (p_y rounds to 1), yet the y entry of
    the gradient is −ε and the trace 2ε − ε² − Σ_{c≠y} p_c² to full relative precision (ε = e⁻⁶⁰ + e⁻⁶⁵)."""
    z = torch.tensor([[60.0, 0.0, -5.0]], dtype=torch.float64)
    e, t = cross_entropy_output_derivatives(z, torch.tensor([0]))
    a, b = torch.exp(torch.tensor(-60.0, dtype=torch.float64)), torch.exp(torch.tensor(-65.0, dtype=torch.float64))
    eps = a + b   # p_c = e^{z_c − 60}/(1 + a + b) for c ≠ y, to relative 1e-26
    torch.testing.assert_close(e, torch.stack([-eps, a, b])[None], rtol=1e-14, atol=0)
    torch.testing.assert_close(t, (2 * eps - a * a - b * b)[None], rtol=1e-14, atol=0)
    assert float(torch.softmax(z, -1)[0, 0]) == 1.0   # the naive 1 − p_y would be 0


def test_mse_closed_form_equals_autograd():
    g = torch.Generator().manual_seed(1)
    o = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    t = torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    e, tr = mse_output_derivatives(o, t)
    e_ref, tr_ref = autograd_parts(mse_per_example, o, t)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tr, tr_ref, rtol=1e-12, atol=1e-15)


def test_output_loss_is_the_loss_and_matches_the_hessian_roots():
    g = torch.Generator().manual_seed(2)
    z, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    batch = (None, y)
    lo = OutputLoss("cross_entropy", target_key=1)
    torch.testing.assert_close(lo(z, batch), cross_entropy_per_example(z, y), rtol=0, atol=0)
    e, t = lo.gradient_and_hessian_trace(z, batch)
    e_ref, L = output_loss_derivatives(lo, z, batch)     # the autograd path the kernels use otherwise
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(t, L.pow(2).sum((1, 2)), rtol=1e-10, atol=1e-14)


def test_output_loss_errors():
    with pytest.raises(ValueError, match="loss: expected 'cross_entropy' or 'mse', got 'hinge'"):
        OutputLoss("hinge")
    with pytest.raises(ValueError, match="target_key: key 'y' not found"):
        OutputLoss(target_key="y").gradient_and_hessian_trace(torch.zeros(2, 3), (None, torch.zeros(2)))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2,\)"):
        cross_entropy_output_derivatives(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 3\)"):
        mse_output_derivatives(torch.zeros(2, 3), torch.zeros(2))


def test_output_loss_reads_its_target_key_from_dict_batches():
    """Task.from_classifier(..., target_key="labels") on dict batches: the closed form reads the same targets as the
    loss."""
    g = torch.Generator().manual_seed(3)
    z, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    lo = OutputLoss("cross_entropy", target_key="labels")
    batch = {"pixels": None, "labels": y}
    torch.testing.assert_close(lo(z, batch), cross_entropy_per_example(z, y), rtol=0, atol=0)
    e, t = lo.gradient_and_hessian_trace(z, batch)
    torch.testing.assert_close(e, (torch.softmax(z, -1) - torch.nn.functional.one_hot(y, 4)), rtol=1e-12, atol=1e-15)
    assert repr(lo) == "OutputLoss('cross_entropy', target_key='labels')"
