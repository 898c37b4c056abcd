"""Evaluate reconstructed (CMD) or recorded weights in a COPY of the user's model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ._layout import Layout, load_weights_, model_with_weights
from .posthoc import CMDResult
from .trajectory import Trajectory


def cmd_model(model: nn.Module, result: CMDResult, t: int = -1, layout: Layout | None = None) -> nn.Module:
    """A deep copy of ``model`` carrying the CMD reconstruction of snapshot ``t`` (``model`` is not modified).

    >>> import torch
    >>> from torch import nn
    >>> from gradsketch.dynamics import Layout, cmd
    >>> net = nn.Linear(2, 1)
    >>> lay = Layout.from_model(net)
    >>> X = torch.stack([lay.flatten(net, torch.float64) * (1 + 0.1 * k) for k in range(4)], dim=1)
    >>> net2 = cmd_model(net, cmd(X, n_modes=1, n_samples=3, layout=lay), t=0)
    >>> bool(torch.allclose(net2.weight.double(), net.weight.double()))
    True
    """
    lay = layout or result.layout
    if lay is None:
        raise ValueError("layout: the result has no layout (in-memory input); pass layout=Layout.from_model(model)")
    return model_with_weights(model, lay, result.reconstruct(t))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Fraction of ``argmax(model(x)) == y`` with the model in eval mode (its train/eval flags are restored).

    >>> from torch import nn
    >>> accuracy(nn.Identity(), torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([1, 1]))
    0.5
    """
    if len(x) != len(y):
        raise ValueError(f"y: expected {len(x)} labels to match x, got {len(y)}")
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        correct = 0
        for s in range(0, len(x), batch_size):
            out = model(x[s:s + batch_size].to(dev))
            correct += int((out.argmax(dim=1).cpu() == y[s:s + batch_size]).sum())
    finally:
        for m, f in flags:
            m.training = f
    return correct / max(len(x), 1)


def evaluate_snapshots(model: nn.Module, source, metric: Callable[[nn.Module], float], *,
                       snapshots: Sequence[int] | None = None, layout: Layout | None = None,
                       progress: bool = False) -> list[float]:
    """``metric(copy)`` for every snapshot, where the copy of ``model`` carries that snapshot's weights.

    ``source``: a :class:`CMDResult` (reconstructed weights), a :class:`Trajectory` (recorded weights) or a
    tensor ``[N, E]``; ``layout`` defaults to the source's. One deep copy is made and reloaded per snapshot;
    ``model`` is never modified. Example: ``evaluate_snapshots(net, res, lambda m: accuracy(m, x, y))``.
    """
    get: Callable[[int], torch.Tensor]
    if isinstance(source, CMDResult):
        e, get, lay = source.n_snapshots, source.reconstruct, layout or source.layout
    elif isinstance(source, Trajectory):
        e, lay = source.n_snapshots, layout or source.layout
        traj = source
        get = lambda t: torch.from_numpy(traj.snapshot(t))  # noqa: E731
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        arr = torch.as_tensor(source)
        if arr.dim() != 2:
            raise ValueError(f"source: expected [N, E], got shape {tuple(arr.shape)}")
        e, lay = arr.shape[1], layout
        get = lambda t: arr[:, t]  # noqa: E731
    else:
        raise TypeError(f"source: expected a CMDResult, Trajectory or [N, E] tensor, got {type(source).__name__}")
    if lay is None:
        raise ValueError("layout: needed for an in-memory source; pass layout=Layout.from_model(model)")
    idx = range(e) if snapshots is None else snapshots
    clone = copy.deepcopy(model)
    if progress:
        from tqdm.auto import tqdm
        idx = tqdm(idx, desc="evaluate snapshots")
    out = []
    for t in idx:
        load_weights_(clone, lay, get(t))
        out.append(float(metric(clone)))
    return out
