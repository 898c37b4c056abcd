"""Every documented error path of gradsketch.model names the argument, what was expected and what arrived."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import batches, digits, mlp

from gradsketch.model import Task, classifier_loss
from gradsketch.sketch import sketch


def test_scalar_loss_is_rejected():
    X, y = digits(4)
    task = Task(mlp(), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    msg = r"loss_fn: expected per-example losses of shape \[B\] = \[4\], got a scalar"
    with pytest.raises(ValueError, match=msg):
        task.grads((X, y))
    with pytest.raises(ValueError, match="got a scalar"):
        Task(mlp(), lambda m, b: F.cross_entropy(m(b[0]), b[1]), validate=False).grads((X, y))


def test_wrong_loss_shape_and_mismatched_batch_sizes():
    X, y = digits(4)
    task = Task(mlp(), lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:2])
    with pytest.raises(ValueError, match=r"shape \[4\].*got shape \(2,\)"):
        task.grads((X, y))
    with pytest.raises(ValueError, match=r"same leading \(batch\) dimension.*batch\[0\]: 4, batch\[1\]: 3"):
        Task(mlp(), classifier_loss()).grads((X, y[:3]))
    with pytest.raises(TypeError, match="batch: expected a tensor"):
        Task(mlp(), classifier_loss()).grads(["a", "b"])


def test_parameters_without_gradient_are_named():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used = torch.nn.Linear(64, 10).double()
            self.unused = torch.nn.Linear(3, 3).double()

        def forward(self, x):
            return self.used(x)

    X, y = digits(3)
    with pytest.raises(ValueError, match="receive no gradient.*unused.weight, unused.bias"):
        Task(Net(), classifier_loss()).grads((X, y))
    assert Task(Net(), classifier_loss(), params=["used.*"]).grads((X, y)).shape == (3, 650)


def test_nonfinite_raises_naming_the_example_index():
    X, y = digits(10)
    X = X.clone()
    X[6, 2] = float("nan")
    task = Task(mlp(), classifier_loss())
    with pytest.raises(FloatingPointError, match="example index 6"):
        task.sketch_grads(batches(X, y, 4), task.block_sketch(32, kind="sjlt"), progress=False)
    with pytest.raises(FloatingPointError, match="example index 6"):
        task.sketch_grads(batches(X, y, 4), task.factored_sketch(32), mode="factored", progress=False)
    with pytest.raises(FloatingPointError, match="example index 6"):
        task.grads((X, y))
    with pytest.raises(ValueError, match="nan_policy: expected one of"):
        Task(mlp(), classifier_loss(), nan_policy="ignore")


def test_param_selection_errors():
    with pytest.raises(ValueError, match="pattern 'enc.*' matches no parameter name"):
        Task(mlp(), classifier_loss(), params=["enc.*"])
    with pytest.raises(TypeError, match="params: expected None or a list"):
        Task(mlp(), classifier_loss(), params=[3])
    with pytest.raises(ValueError, match="not a parameter of the model"):
        Task(mlp(), classifier_loss(), params=[torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        Task(lambda x: x, classifier_loss())
    with pytest.raises(ValueError, match="loss_fn: expected a callable"):
        Task(mlp())


def test_sketch_mismatch_and_mode_errors():
    X, y = digits(4)
    task = Task(mlp(), classifier_loss())
    with pytest.raises(ValueError, match=f"n = task.n_params = {task.n_params}, got n = 100"):
        task.sketch_grads([(X, y)], sketch("sjlt", 100, 8), progress=False)
    other = Task(mlp(hidden=8), classifier_loss()).block_sketch(16, kind="sjlt")
    with pytest.raises(ValueError, match="n = task.n_params"):
        task.sketch_grads([(X, y)], other, progress=False)
    from gradsketch.sketch import BlockSketch

    shuffled = BlockSketch(list(reversed(task.param_sizes)), 16, kind="sjlt")
    with pytest.raises(ValueError, match="expected BlockSketch blocks of sizes"):
        task.sketch_grads([(X, y)], shuffled, progress=False)
    with pytest.raises(TypeError, match="mode='factored' needs a FactoredSketch"):
        task.sketch_grads([(X, y)], task.block_sketch(16, kind="sjlt"), mode="factored", progress=False)
    with pytest.raises(ValueError, match="mode: expected one of"):
        task.sketch_grads([(X, y)], task.block_sketch(16, kind="sjlt"), mode="fast", progress=False)
    with pytest.raises(TypeError, match="sketch: expected a gradsketch sketch"):
        task.sketch_grads([(X, y)], torch.zeros(3), progress=False)
    with pytest.raises(ValueError, match="data: expected at least one batch"):
        task.sketch_grads([], task.block_sketch(16, kind="sjlt"), progress=False)


def test_curvature_errors():
    X, y = digits(4)
    task = Task(mlp(), classifier_loss())
    with pytest.raises(ValueError, match="the GGN needs output_fn and loss_on_output"):
        task.ggn([(X, y)])
    with pytest.raises(ValueError, match="sampling: expected one of"):  # the curvature's data choice (was mode=)
        task.hessian([(X, y)], sampling="exact")
    with pytest.raises(ValueError, match="damping: expected a number >= 0"):
        task.hessian([(X, y)], damping=-1)
    with pytest.raises(TypeError, match="expected a re-iterable"):
        task.hessian(iter([(X, y)]))
    with pytest.raises(ValueError, match="method: expected one of"):
        task.hessian([(X, y)], method="magic")
    with pytest.raises(ValueError, match=r"v: expected a tensor of shape"):
        task.hessian([(X, y)]).matvec(torch.zeros(3, dtype=torch.float64))
