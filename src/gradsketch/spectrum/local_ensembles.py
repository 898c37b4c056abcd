"""Local ensembles (Madras, Atwood & D'Amour, ICLR 2020): an extrapolation score from the curvature.

Perturbing a trained model's parameters along directions of low training-loss curvature leaves the training
loss (almost) unchanged, so an ensemble of such perturbations agrees on the training data; a test input on
which these equally good models disagree is one the data did not pin down. To first order the spread of the
ensemble's prediction f(x; θ + ε) is the norm of the prediction gradient g(x) = ∇_θ f(x; θ) projected onto the
low-curvature subspace, the complement of the top-m eigenvectors U_m of the Hessian (or GGN) of the mean
training loss:

    score(x) = ‖(I − U_m U_mᵀ) g(x)‖₂

U_m comes from Lanczos (:func:`gradsketch.linalg.lanczos`) on the curvature operator; m trades the ensemble's
fidelity (a larger m removes more of the directions the training data constrains) against cost.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_choice, check_int
from ..linalg.lanczos import lanczos
from ..model._batch import SplitBatch, data_len, progress_iter

if TYPE_CHECKING:
    from ..model.task import Task

CURVATURES = ("ggn", "hessian")
OUTPUTS = ("logprob", "loss", "logits")
#: largest number of outputs per example for ``output="logits"`` (one gradient pass per output)
MAX_LOGITS = 64


class LocalEnsemble:
    """The top-m curvature eigenspace of a task's training loss and the extrapolation score of test inputs.

    Args:
        task: a :class:`gradsketch.Task` (``output="logprob"``/``"logits"`` need its ``output_fn``, e.g.
            :meth:`Task.from_classifier`).
        train_data: re-iterable of training batches (the curvature's data).
        m: number of top eigenvectors removed, ``1 ≤ m < N``.
        curvature: ``"ggn"`` (positive semi-definite; default) or ``"hessian"`` (top by largest value).
        output: the prediction whose gradient is projected: ``"logprob"`` log p_ŷ(x) of the predicted class
            ŷ = argmax f(x) (labels not needed), ``"loss"`` the task's loss (needs labels),
            ``"logits"`` every output f_c(x), score = (Σ_c ‖(I − U Uᵀ) ∇f_c‖²)^½.
        n_iter, seed, tol: Lanczos's Krylov dimension (default ``min(N, max(3m, m + 60))``), start vector
            seed and tolerance.

    Attributes after :meth:`fit`: ``eigenvalues_ [m]`` (descending), ``eigenvectors_ [N, m]``,
    ``lanczos_`` (the :class:`~gradsketch.linalg.lanczos.EigResult`).

    >>> import torch
    >>> from torch import nn
    >>> from gradsketch import Task
    >>> _ = torch.manual_seed(0)
    >>> task = Task.from_classifier(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
    >>> train = [(torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,)))]
    >>> le = LocalEnsemble(task, train, m=5).fit()
    >>> le.score([(torch.randn(3, 3, dtype=torch.float64),)]).shape
    torch.Size([3])
    """

    def __init__(self, task: Task, train_data: Iterable, m: int = 10, *, curvature: str = "ggn",
                 output: str = "logprob", n_iter: int | None = None, seed: int = 0, tol: float | None = None,
                 progress: bool = False) -> None:
        self.task = task
        self.train_data = train_data
        self.m = check_int(m, "m", minimum=1)
        if self.m >= task.n_params:
            raise ValueError(f"m: expected fewer eigenvectors than parameters (N = {task.n_params}), got {m}")
        self.curvature = check_choice(curvature, "curvature", CURVATURES)
        self.output = check_choice(output, "output", OUTPUTS)
        if self.output != "loss" and task.output_fn is None:
            raise ValueError(f"output: {self.output!r} needs the task's output_fn (Task.from_classifier or "
                             "Task(model, output_fn=..., loss_on_output=...)); got a task with only loss_fn "
                             "(use output='loss')")
        self.n_iter, self.seed, self.tol, self.progress = n_iter, seed, tol, progress

    def fit(self) -> LocalEnsemble:
        """Lanczos on the curvature of the mean training loss: the top-m eigenpairs."""
        task = self.task
        op = task.ggn(self.train_data) if self.curvature == "ggn" else task.hessian(self.train_data)
        r = lanczos(op, self.m, which="LA", n_iter=self.n_iter, tol=self.tol, seed=self.seed,
                    progress=self.progress)
        order = torch.argsort(r.eigenvalues, descending=True)
        self.lanczos_ = r
        self.eigenvalues_ = r.eigenvalues[order]
        self.eigenvectors_ = r.eigenvectors[:, order]
        return self

    def _prediction_grads(self, split: SplitBatch, c: int | None) -> Tensor:
        """``[B, N]`` per-example gradients of the prediction (class ``c`` for ``output="logits"``)."""
        from ..model.task import Task

        task = self.task
        if self.output == "loss":
            return task.grads(split.rebuild())
        out_fn = task.output_fn
        assert out_fn is not None

        def pred(model: Any, batch: Any) -> Tensor:
            z = out_fn(model, batch)
            z = z.reshape(z.shape[0], -1)
            if self.output == "logits":
                return z[:, c]
            lp = F.log_softmax(z, dim=1)
            return lp.gather(1, lp.detach().argmax(1, keepdim=True))[:, 0]

        ptask = Task(task.model, pred, params=[p for _, p in task.named_params], validate=False)
        return ptask.grads(split.rebuild())

    def score(self, test_data: Iterable) -> Tensor:
        """``[n_test]`` float64 extrapolation scores ‖(I − U_m U_mᵀ) g(x)‖ of the test batches, in order."""
        if not hasattr(self, "eigenvectors_"):
            raise RuntimeError("LocalEnsemble: call fit() before score()")
        U = self.eigenvectors_.to(torch.float64)
        out = []
        for batch in progress_iter(test_data, self.progress, "local ensemble scores", data_len(test_data)):
            split = self.task.split(batch)
            if self.output == "logits":
                with torch.no_grad():
                    z = self.task.call(self.task.output_fn, self.task.params_dict(), split.rebuild())  # type: ignore[arg-type]
                C = z[0].numel()
                if C > MAX_LOGITS:
                    raise ValueError(f"output: 'logits' takes one gradient pass per output and the model has "
                                     f"{C} (more than {MAX_LOGITS}); use output='logprob'")
                classes: list[int | None] = list(range(C))
            else:
                classes = [None]
            sq = torch.zeros(split.size, dtype=torch.float64)
            for c in classes:
                g = self._prediction_grads(split, c).to(torch.float64)
                res = g - (g @ U) @ U.T
                sq += res.square().sum(1).cpu()
            out.append(sq.sqrt())
        if not out:
            raise ValueError("test_data: expected at least one batch, got an empty iterable")
        return torch.cat(out)


def local_ensemble_score(task: Task, train_data: Iterable, test_data: Iterable, m: int = 10, **options: Any
                         ) -> Tensor:
    """``[n_test]`` local-ensemble extrapolation scores (Madras et al. 2020): the norm of each test
    prediction's gradient outside the top-``m`` eigenspace of the training loss's GGN (or Hessian);
    ``options`` go to :class:`LocalEnsemble` (``curvature``, ``output``, ``n_iter``, ``seed``, ``tol``,
    ``progress``). Larger means less constrained by the training data.

    >>> import torch
    >>> from torch import nn
    >>> from gradsketch import Task
    >>> _ = torch.manual_seed(0)
    >>> task = Task.from_classifier(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double())
    >>> train = [(torch.randn(30, 2, dtype=torch.float64), torch.randint(0, 2, (30,)))]
    >>> s = local_ensemble_score(task, train, [(torch.randn(4, 2, dtype=torch.float64),)], m=3)
    >>> s.shape, bool((s >= 0).all())
    (torch.Size([4]), True)
    """
    return LocalEnsemble(task, train_data, m, **options).fit().score(test_data)
