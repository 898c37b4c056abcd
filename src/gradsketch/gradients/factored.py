"""Factored (LoGra) sketches of per-example gradients from forward/backward hooks.

For a weight used as y_t = W a_t (Linear; Conv1D, Conv2d and Embedding are the same after a reshape), the
per-example gradient is G = Σ_t δ_t a_tᵀ with δ_t = ∂ℓ/∂y_t. With a Kronecker sketch Φ = F_r ⊗ F_c (a ``qk``
sketch with factors [rows, cols] -> [d_r, d_c], overall scale folded into the factors),
Φ vec(G) = vec(F_r G F_cᵀ) = vec(Σ_t (F_r δ_t)(F_c a_t)ᵀ) (LoGra, Choe et al. 2024, arXiv 2405.13954):
one forward pass, one backward pass to the layer outputs, and two small projections per layer, never the
[B, rows, cols] gradient. A :class:`FactoredSketch` is a whole-model sketch: the sum over parameters of
independent per-block sketches (Kronecker ones for supported weights, a BlockSketch of ``kind`` for the
rest), valid because a sum of independent JL sketches of disjoint blocks is a JL sketch of the whole.

Supported weights: ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding`` (no ``max_norm``, no
``scale_grad_by_freq``), ``nn.Conv2d`` (``groups=1``, zero padding given as numbers). Their biases and
``nn.LayerNorm`` parameters are differentiated per example from the same hooks (exact, then sketched).
Any other parameter (BatchNorm, custom modules, weights whose [rows, cols] admit no factorisation of d)
takes the explicit path: a second, vmapped pass over those parameters only.

A layer called on a batch-1 input whose output is broadcast over the batch (GPT-2's and BERT's position
embeddings of ``position_ids [1, T]``) has its output expanded to [B, ...] by the hook, so each example gets
its own δ. Should a hooked layer still see a leading size other than B, its parameters move to the explicit
path (their Kronecker block, if any, is applied to the exact per-example gradient).

Assumption: a supported layer's weight is used only through that module's ``forward`` (a functional use
elsewhere, e.g. ``F.linear(x, emb.weight)`` outside a module, is invisible to hooks). Tied weights used by
several supported modules (GPT-2's ``wte``/``lm_head``) are fine: contributions add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sketch._random import derive_seed
from ..sketch.factored import REST_MATRIX_DENSITY, REST_MATRIX_MAX, FactoredSketch, _Identity  # noqa: F401

if TYPE_CHECKING:
    from ..model.task import Task


def _conv1d_type() -> type | None:
    import sys

    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers layout changed
        return None
    return Conv1D


def layer_type(module: nn.Module) -> str | None:
    """``"linear" | "conv1d" | "embedding" | "conv2d" | "layernorm"`` for modules the hooks support."""
    c1 = _conv1d_type()
    if c1 is not None and isinstance(module, c1):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        ok = module.max_norm is None and not module.scale_grad_by_freq
        return "embedding" if ok else None
    if isinstance(module, nn.Conv2d):
        ok = module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        return "conv2d" if ok else None
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    return None


FACTORABLE = ("linear", "conv1d", "embedding", "conv2d")


@dataclass
class ParamPlan:
    name: str
    shape: tuple[int, ...]
    uses: list[tuple[nn.Module, str, str]] = field(default_factory=list)  # (module, layer type, role)
    generic: bool = False

    @property
    def weight_like(self) -> bool:
        return not self.generic and bool(self.uses) and all(
            t in FACTORABLE and r == "weight" for _, t, r in self.uses)


def plan_task(task: Task) -> dict[str, ParamPlan]:
    """Which hook rule (if any) computes each selected parameter's per-example gradient."""
    by_id = {id(p): n for n, p in task.named_params}
    plans = {n: ParamPlan(n, tuple(p.shape)) for n, p in task.named_params}
    for mod in task.model.modules():
        kind = layer_type(mod)
        for role, p in mod._parameters.items():
            if p is None or id(p) not in by_id:
                continue
            plan = plans[by_id[id(p)]]
            if kind is None or role not in ("weight", "bias"):
                plan.generic = True
            else:
                plan.uses.append((mod, kind, role))
    for plan in plans.values():
        if not plan.uses:
            plan.generic = True
    return plans


def factor_pair(d: int, rows: int, cols: int) -> tuple[int, int] | None:
    """d = d_r·d_c with d_r ≤ rows, d_c ≤ cols and balanced compression: min |log d_r/rows − log d_c/cols|."""
    best, score = None, math.inf
    for dr in range(1, d + 1):
        if d % dr:
            continue
        dc = d // dr
        if dr <= rows and dc <= cols:
            s = abs(math.log(dr / rows) - math.log(dc / cols))
            if s < score:
                best, score = (dr, dc), s
    return best


def block_plan(d: int, rows: int, cols: int) -> tuple[int, int] | None:
    """Output sizes (d_r, d_c) of the Kronecker block F_r ⊗ F_c for a [rows, cols] weight, d_r·d_c ≤ d.

    Candidates: :func:`factor_pair` (d_r·d_c = d exactly), and keeping a small side whole (d_r = rows with
    d_c = ⌊d/rows⌋, or the same for cols), which then makes that factor an exact rotation and the block an
    embedded slice of R^d. Each is scored by the relative variance of a sketched inner product of rank-one
    gradients δaᵀ, ≈ Σ_side 1/d_side over the sides that are compressed (0 for a side kept whole); the
    smallest wins, the exact factorisation on ties. E.g. a 10-class head [10, 1025] at d = 4096 gets
    (10, 409) (variance ≈ 0.002) instead of (8, 512) (≈ 0.13: ten output gradients squeezed into eight).
    """
    def var(k: int, m: int) -> float:
        return 0.0 if k >= m else 1.0 / k

    cands = []
    pair = factor_pair(d, rows, cols)
    if pair is not None:
        cands.append((var(pair[0], rows) + var(pair[1], cols), 0, pair))
    if rows <= d // 2 and cols > d // rows:
        cands.append((var(d // rows, cols), 1, (rows, d // rows)))
    if cols <= d // 2 and rows > d // cols:
        cands.append((var(d // cols, rows), 1, (d // cols, cols)))
    return min(cands)[2] if cands else None


def factored_sketch_for(task: Task, d: int, kind: str = "affd", seed: int = 0, **options: Any) -> FactoredSketch:
    """The :class:`~gradsketch.sketch.FactoredSketch` of ``task``'s parameters (what
    ``task.factored_sketch(d, kind, seed)`` returns): a Kronecker ``qk`` block per supported weight (bias
    folded in, small layers embedded), a ``kind`` BlockSketch over the rest; see the class docstring."""
    if int(d) != d or d < 1:
        raise ValueError(f"d: expected a positive integer, got {d!r}")
    d = int(d)
    plans = plan_task(task)
    shapes = dict(zip(task.param_names, task.param_shapes))
    # a bias rides along with its weight when both are selected and each is used by that module alone
    bias_for: dict[str, tuple[str, str]] = {}
    for n, plan in plans.items():
        if plan.generic or len(plan.uses) != 1 or plan.uses[0][2] != "weight":
            continue
        mod, kind_w, _ = plan.uses[0]
        if kind_w not in ("linear", "conv2d", "conv1d"):
            continue
        bias = [b for b, pb in plans.items() if not pb.generic and pb.uses == [(mod, kind_w, "bias")]]
        if bias:
            bias_for[n] = (bias[0], "rows" if kind_w == "conv1d" else "cols")
    fac: dict[str, dict[str, Any]] = {}
    bias_of: dict[str, list[str]] = {}
    offsets: dict[str, int] = {}
    for n, shape in zip(task.param_names, task.param_shapes):
        if not (plans[n].weight_like and len(shape) >= 2):
            continue
        rows, cols = shape[0], math.prod(shape[1:])
        b = bias_for.get(n)
        if b is not None:
            rows, cols = (rows + 1, cols) if b[1] == "rows" else (rows, cols + 1)
            if shapes[b[0]] != ((cols if b[1] == "rows" else rows),):
                b = None  # a bias of an unexpected shape: leave it to the rest
                rows, cols = shape[0], math.prod(shape[1:])
        pair = block_plan(d, rows, cols) if rows * cols > d else factor_pair(d, rows, cols)
        if pair is not None:
            dp = pair[0] * pair[1]
            fac[n] = dict(kind="qk", n=rows * cols, d=dp, seed=derive_seed(seed, "factored", n),
                          in_factors=[rows, cols], out_factors=list(pair))
            if dp < d:  # a side kept whole: the block fills a seeded slice of the output
                offsets[n] = derive_seed(seed, "factored-offset", n) % (d - dp + 1)
        elif rows * cols <= d and all(k != "embedding" for _, k, _ in plans[n].uses):
            # small: the block itself, unprojected, in rows·cols coordinates of the output
            fac[n] = dict(kind="identity", n=rows * cols, d=rows * cols, in_factors=[rows, cols])
            offsets[n] = derive_seed(seed, "factored-offset", n) % (d - rows * cols + 1)
        else:
            continue
        if b is not None:
            bias_of[n] = [b[0], b[1]]
    folded = {b[0] for b in bias_of.values()}
    rest = [(n, s) for n, s in zip(task.param_names, task.param_sizes) if n not in fac and n not in folded]
    rest_kind = kind
    if rest and sum(s for _, s in rest) < d:
        from ..sketch import KINDS

        if not KINDS[kind].allows_d_greater_than_n:
            rest_kind = "sjlt"  # fewer leftover coordinates than d: a CountSketch block (d > n allowed)
    spec = {"type": "FactoredSketch", "version": 2, "d": d, "seed": int(seed), "kind": kind,
            "options": options, "names": list(task.param_names), "sizes": list(task.param_sizes),
            "blocks": fac, "bias_of": bias_of, "offsets": offsets,
            "rest": None if not rest else dict(sizes=dict(rest), d=d, kind=rest_kind,
                                               seed=derive_seed(seed, "factored-rest"), **options)}
    return FactoredSketch.from_spec(spec)

# -- per-layer row/column vectors ----------------------------------------------------------------------
def _rows_cols(kind: str, mod: Any, x: Tensor, dy: Tensor) -> tuple[Tensor, Tensor]:
    """(r [m, T, rows] or ids [m, T] for embeddings, c [m, T, cols]) with G = Σ_t r_t c_tᵀ per example."""
    m = x.shape[0]
    if kind == "linear":
        return dy.reshape(m, -1, dy.shape[-1]), x.reshape(m, -1, x.shape[-1])
    if kind == "conv1d":
        return x.reshape(m, -1, x.shape[-1]), dy.reshape(m, -1, dy.shape[-1])
    if kind == "conv2d":
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        return dy.reshape(m, dy.shape[1], -1).transpose(1, 2), cols.transpose(1, 2)
    # embedding
    ids = x.reshape(m, -1)
    c = dy.reshape(m, -1, dy.shape[-1])
    if mod.padding_idx is not None:
        c = c * (ids != mod.padding_idx).unsqueeze(-1).to(c.dtype)
    return ids, c


def _bias_grad(kind: str, dy: Tensor) -> Tensor:
    m = dy.shape[0]
    if kind == "conv2d":
        return dy.reshape(m, dy.shape[1], -1).sum(2)
    return dy.reshape(m, -1, dy.shape[-1]).sum(1)


class HookEngine:
    """Exact per-example gradients of the hooked parameters from one forward and one backward pass of the
    whole batch (the LoGra hooks, without a sketch): for a supported weight G_i = Σ_t δ_{i,t} a_{i,t}ᵀ, for
    biases and LayerNorm parameters the matching sums. Parameters the hooks cannot see take the vmapped
    per-example path (:meth:`Task.per_example_grads` with ``names``).

    On the first batch with finite losses it also computes the ordinary batch gradient of the hooked
    parameters (one extra backward to the weights) and checks Σ_i G_i against it; a parameter that fails
    (e.g. a weight also used functionally outside its module, invisible to hooks) moves to the vmapped path.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.plans = plan_task(task)
        self.clone_outputs = False
        self.checked = False
        self.hooked = {n for n, p in self.plans.items() if not p.generic}
        self.generic = [n for n in task.param_names if n not in self.hooked]
        mods: dict[int, tuple[nn.Module, str]] = {}
        for n in self.hooked:
            for mod, kind, _ in self.plans[n].uses:
                mods[id(mod)] = (mod, kind)
        self.modules = list(mods.values())
        # the model can be called as it is when every selected parameter requires grad (the usual case)
        self.direct = all(t.requires_grad for _, t in task.named_params)
        self._scratch: Tensor | None = None

    def scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer of at least ``numel`` elements, reused from call to call (grown when needed). Its
        contents are overwritten by every user: take a view, fill it, consume it before the next call."""
        buf = self._scratch
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = self._scratch = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def _capture(self, split: Any, param_grads: bool = False
                 ) -> tuple[Tensor, dict[int, list[tuple[Tensor, Tensor]]], dict[str, Tensor]]:
        """One forward pass with hooks, one backward pass to the hooked layers' outputs: (losses, inputs
        and output-gradients per module call, and the batch gradients of the hooked parameters when
        ``param_grads``)."""
        task, m = self.task, split.size
        while True:
            caps: dict[int, list[Any]] = {id(mod): [] for mod, _ in self.modules}
            clone = self.clone_outputs

            def make_hook(key: int, clone: bool = clone, caps: dict = caps):
                def hook(mod: nn.Module, inp: tuple, out: Tensor) -> Tensor | None:
                    x = inp[0].detach()
                    if m > 1 and x.ndim >= 1 and x.shape[0] == 1 and out.ndim >= 1 and out.shape[0] == 1:
                        # one input broadcast over the batch (position embeddings of position_ids [1, T]):
                        # expand it so that each example gets its own output and output-gradient
                        x = x.expand(m, *x.shape[1:])
                        out = out.expand(m, *out.shape[1:])
                        caps[key].append((x, out, out._version))
                        return out.clone() if clone else out
                    # keep the layer's own output; in clone mode the rest of the model gets a copy, so
                    # in-place ops downstream cannot change the tensor we differentiate against
                    caps[key].append((x, out, out._version))
                    return out.clone() if clone else None
                return hook

            handles = [mod.register_forward_hook(make_hook(id(mod))) for mod, _ in self.modules]
            try:
                if self.direct:
                    # every selected parameter already requires grad: call the model itself (no
                    # functional_call); autograd.grad below differentiates only towards the captured
                    # outputs (and the hooked parameters for the check), never writes .grad
                    p: dict[str, Tensor] = dict(task.named_params)
                    with torch.enable_grad():
                        losses = task.losses_at(None, split.rebuild(), split.size)
                else:
                    p = {n: t.requires_grad_(n in self.hooked) for n, t in
                         ((n, t.detach()) for n, t in task.params_dict().items())}
                    with torch.enable_grad():
                        losses = task.losses_at(p, split.rebuild(), split.size)
            finally:
                for h in handles:
                    h.remove()
            if not clone and any(o._version != v for lst in caps.values() for _, o, v in lst):
                self.clone_outputs = True  # a layer output was modified in place (e.g. ReLU(inplace=True))
                continue
            break
        outs = [o for lst in caps.values() for _, o, _ in lst if o.requires_grad]
        pnames = [n for n in task.param_names if n in self.hooked] if param_grads else []
        targets = outs + [p[n] for n in pnames]
        grads = torch.autograd.grad(losses.sum(), targets, allow_unused=True) if targets else ()
        it = iter(grads[:len(outs)])
        pg = {n: (torch.zeros_like(p[n]) if g is None else g.detach())
              for n, g in zip(pnames, grads[len(outs):])}
        result: dict[int, list[tuple[Tensor, Tensor]]] = {}
        for key, lst in caps.items():
            pairs = []
            for x, o, _ in lst:
                g = next(it) if o.requires_grad else None
                pairs.append((x, torch.zeros_like(o) if g is None else g.detach()))
            result[key] = pairs
        return losses.detach(), result, pg

    def prepare(self, split: Any) -> tuple[Tensor, dict[int, list[tuple[Tensor, Tensor]]], dict[str, Tensor]]:
        """(losses, captures, exact per-example gradients ``name -> [m, *shape]`` of the non-hooked
        parameters) for one batch."""
        m = split.size
        check = not self.checked and bool(self.hooked)
        losses, caps, pg = self._capture(split, param_grads=check)
        if m > 1:  # a layer run on a batch-1 input broadcast over the batch (GPT-2's position embedding)
            for n in list(self.hooked):
                if any(x.shape[0] != m for mod, _, _ in self.plans[n].uses for x, _ in caps[id(mod)]):
                    self.hooked.discard(n)
                    self.generic.append(n)
        if check:
            self._check(caps, pg, losses)
        gd: dict[str, Tensor] = {}
        if self.generic:
            gd, _ = self.task.per_example_grads(split, names=self.generic)
        return losses, caps, gd

    def _check(self, caps: dict[int, list[tuple[Tensor, Tensor]]], pg: dict[str, Tensor], losses: Tensor) -> None:
        if not bool(torch.isfinite(losses).all()):
            return  # decide on a batch with finite losses
        bad = []
        for n, g in pg.items():
            if n not in self.hooked:
                continue
            if not bool(torch.isfinite(g).all()):
                return
            plan = self.plans[n]
            s = torch.zeros(plan.shape, dtype=g.dtype, device=g.device)
            scale = torch.zeros(plan.shape, dtype=g.dtype, device=g.device)
            for mod, kind, role in plan.uses:
                for x, dy in caps[id(mod)]:
                    s += self._exact_sum(kind, role, mod, x, dy, plan.shape).to(g.dtype)
                    # Σ of |terms|: the size of the rounding error of both sums (a gradient that cancels
                    # to ~0, like attention key biases, is then not a mismatch)
                    scale += self._exact_sum(kind, role, mod, x.abs() if x.is_floating_point() else x,
                                             dy.abs(), plan.shape).abs().to(g.dtype)
            tol = 1e-2 if g.dtype in (torch.float16, torch.bfloat16) else 1e-4
            if float((s - g).norm()) > tol * float(scale.norm()) + 1e-30:
                bad.append(n)
        for n in bad:
            self.hooked.discard(n)
            self.generic.append(n)
        self.checked = True

    def grad(self, caps: dict[int, list[tuple[Tensor, Tensor]]], gd: dict[str, Tensor], name: str,
             lo: int, hi: int) -> Tensor:
        """Exact per-example gradient of ``name`` for examples ``lo:hi``, ``[hi - lo, numel]``."""
        if name not in self.hooked:
            return gd[name][lo:hi].reshape(hi - lo, -1)
        plan = self.plans[name]
        g = None
        for mod, kind, role in plan.uses:
            for x, dy in caps[id(mod)]:
                e = self._exact(kind, role, mod, x[lo:hi], dy[lo:hi], plan.shape)
                g = e if g is None else g + e
        return cast(Tensor, g).reshape(hi - lo, -1)

    def grad_into(self, caps: dict[int, list[tuple[Tensor, Tensor]]], gd: dict[str, Tensor], name: str,
                  lo: int, hi: int, out: Tensor) -> Tensor:
        """:meth:`grad` written into ``out`` ``[hi - lo, numel]`` (any row stride, e.g. a column slice of a
        reused scratch buffer): weights of Linear/Conv1D/Conv2d layers are formed in place (broadcast outer
        product for one position per example, batched matmul otherwise), so no fresh [m, numel] tensor is
        allocated (on CPU, large fresh allocations cost page faults every batch)."""
        m = hi - lo
        if name not in self.hooked:
            return out.copy_(gd[name][lo:hi].reshape(m, -1))
        plan = self.plans[name]
        first = True
        for mod, kind, role in plan.uses:
            for x, dy in caps[id(mod)]:
                if role == "weight" and kind in ("linear", "conv1d", "conv2d"):
                    r, c = _rows_cols(kind, mod, x[lo:hi], dy[lo:hi])
                    v3 = out.view(m, r.shape[-1], c.shape[-1])
                    if r.shape[1] == 1:
                        a, b = r[:, 0, :, None], c[:, 0, None, :]
                        if first:
                            torch.mul(a, b, out=v3)
                        else:
                            v3.addcmul_(a, b)
                    elif first:
                        torch.bmm(r.transpose(1, 2), c, out=v3)
                    else:
                        v3.baddbmm_(r.transpose(1, 2), c)
                elif role == "weight" and kind == "embedding":
                    # rows of the used ids only, scattered straight into the (zeroed) output: no fresh
                    # [m, vocab, dim] tensor (375 MB per batch of 8 for MiniLM's word embeddings)
                    ids, cc = _rows_cols(kind, mod, x[lo:hi], dy[lo:hi])
                    v3 = out.view(m, plan.shape[0], cc.shape[-1])
                    if first:
                        v3.zero_()
                    v3.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, cc.shape[-1]), cc.to(v3.dtype))
                else:
                    e = self._exact(kind, role, mod, x[lo:hi], dy[lo:hi], plan.shape).reshape(m, -1)
                    if first:
                        out.copy_(e)
                    else:
                        out.add_(e)
                first = False
        return out

    @staticmethod
    def _exact_sum(kind: str, role: str, mod: nn.Module, x: Tensor, dy: Tensor,
                   shape: tuple[int, ...]) -> Tensor:
        """Σ over the batch of :meth:`_exact` without the per-example tensor where cheap."""
        if role == "weight" and kind in ("linear", "conv1d", "conv2d"):
            r, c = _rows_cols(kind, mod, x, dy)
            return torch.einsum("mtr,mtc->rc", r, c).reshape(shape)
        if role == "weight" and kind == "embedding":
            ids, c = _rows_cols(kind, mod, x, dy)
            out = torch.zeros(shape[0], c.shape[-1], dtype=c.dtype, device=c.device)
            return out.index_add_(0, ids.reshape(-1), c.reshape(-1, c.shape[-1])).reshape(shape)
        return HookEngine._exact(kind, role, mod, x, dy, shape).sum(0)

    @staticmethod
    def _exact(kind: str, role: str, mod: Any, x: Tensor, dy: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Exact per-example gradient [m, *shape] of one use of a hooked parameter."""
        m = x.shape[0]
        if kind == "layernorm":
            ns = tuple(mod.normalized_shape)
            dyr = dy.reshape(m, -1, *ns)
            if role == "bias":
                return dyr.sum(1)
            xhat = F.layer_norm(x, ns, eps=mod.eps).reshape(m, -1, *ns)
            return (dyr * xhat).sum(1)
        if role == "bias":
            return _bias_grad(kind, dy)
        r, c = _rows_cols(kind, mod, x, dy)
        if kind == "embedding":
            g = torch.zeros(m, shape[0], c.shape[-1], dtype=c.dtype, device=c.device)
            g.scatter_add_(1, r.unsqueeze(-1).expand(-1, -1, c.shape[-1]), c)
        elif r.shape[1] == 1:  # one position per example: a broadcast outer product (faster than einsum)
            g = r[:, 0, :, None] * c[:, 0, None, :]
        else:
            g = torch.einsum("mtr,mtc->mrc", r, c)
        return g.reshape(m, *shape)


class FactoredEngine(HookEngine):
    """Runs ``sketch_grads(mode="factored")`` for one task and one :class:`FactoredSketch`."""

    def __init__(self, task: Task, sketch: FactoredSketch) -> None:
        super().__init__(task)
        self.sketch = sketch

    def batch(self, split: Any, chunk: int | None = None, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``([m, d] sketched rows, [m] losses)`` of one batch, ``chunk`` examples per capture (default: all),
        written into ``out`` when given."""
        self.task.validate_batch(split)
        if chunk is None or chunk >= split.size:
            return self._one(split, out)
        rows, losses = [], []
        for lo, sub in split.chunks(chunk):
            r, li = self._one(sub, None if out is None else out[lo:lo + sub.size])
            rows.append(r)
            losses.append(li)
        return (torch.cat(rows) if out is None else out), torch.cat(losses)

    def _one(self, split: Any, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        task, S = self.task, self.sketch
        dtype, device, m = task.dtype, task.device, split.size
        losses, caps, gd = self.prepare(split)
        total = torch.empty(m, S.d, dtype=dtype, device=device) if out is None else out
        # full-width blocks first: the first one writes `total` (no zero fill), embedded blocks add later
        order = sorted(S.blocks, key=lambda n: n in S.offsets)
        filled = False
        done: set[str] = set()
        for n in order:
            bias = S.bias_of.get(n)
            bname = None if bias is None else bias[0]
            if n not in self.hooked or (bname is not None and bname not in self.hooked):
                continue  # exact per-example gradient path below
            if not filled and n in S.offsets:
                total.zero_()
                filled = True
            ident = isinstance(S.blocks[n], _Identity)
            rows, cols = S.shapes2d[n]
            sl = S.block_slice(n)
            if ident:  # an embedded small layer: Σ_t r'_t c'_tᵀ itself, no projection
                blk = S.blocks[n]
                t3 = total[:, sl].view(m, blk.rows, blk.cols)
            else:
                fr, fc = S.factors(n, dtype, device)
                t3 = (total if sl.stop - sl.start == S.d else total[:, sl]).view(m, fr.shape[0], fc.shape[0])
                # the folded bias is the last input column (Linear, Conv2d) or row (Conv1D) of ones
                fr_w, fr_b = (fr[:, :rows], fr[:, rows]) if bias is not None and bias[1] == "rows" else (fr, None)
                fc_w, fc_b = (fc[:, :cols], fc[:, cols]) if bias is not None and bias[1] == "cols" else (fc, None)
            for mod, kind, _ in self.plans[n].uses:
                for x, dy in caps[id(mod)]:
                    r, c = _rows_cols(kind, mod, x, dy)
                    if ident:
                        pr, pc = r.to(dtype), c.to(dtype)
                        if bias is not None:
                            # the folded bias (the column, or row, of ones) is Σ_t δ_t (Σ_t x_t for Conv1D):
                            # write it into its own column (row) of the block and the weight part into the
                            # rest, instead of concatenating ones to the [m, T, ·] inputs (a full copy)
                            # (an identity block is embedded at an offset: `total` was zero-filled before it)
                            cols_side = bias[1] == "cols"
                            (t3[:, :, -1] if cols_side else t3[:, -1, :]).add_((pr if cols_side else pc).sum(1))
                            tw = t3[:, :, :-1] if cols_side else t3[:, :-1, :]
                            if pr.shape[1] == 1:  # one position (an MLP): a broadcast outer product
                                tw.addcmul_(pr[:, 0, :, None], pc[:, 0, None, :])
                            else:
                                tw.baddbmm_(pr.transpose(1, 2), pc)
                            continue
                    else:
                        pr = fr_w.T[r] if kind == "embedding" else r.to(dtype) @ fr_w.T   # [m, T, d_r]
                        pc = c.to(dtype) @ fc_w.T                                          # [m, T, d_c]
                        if fr_b is not None:
                            pr += fr_b
                        if fc_b is not None:
                            pc += fc_b
                    if pr.shape[1] == 1:
                        # one position per example (an MLP): the outer product (F_r δ)(F_c a)ᵀ, one
                        # broadcast multiply into the [m, d] result (bmm with k = 1 is slower)
                        a, b = pr[:, 0, :, None], pc[:, 0, None, :]
                        if filled:
                            t3.addcmul_(a, b)
                        else:
                            torch.mul(a, b, out=t3)
                    elif filled:
                        # Σ_t (F_r δ_t)(F_c a_t)ᵀ: a batched [d_r, T] @ [T, d_c] product per example,
                        # accumulated in place into the [m, d] result
                        t3.baddbmm_(pr.transpose(1, 2), pc)
                    else:
                        torch.bmm(pr.transpose(1, 2), pc, out=t3)
                    filled = True
            done.add(n)
            if bname is not None:
                done.add(bname)
        if not filled:
            total.zero_()

        def exact(name: str) -> Tensor:
            if name not in self.hooked:
                return gd[name].reshape(m, -1)
            plan, g = self.plans[name], None
            for mod, kind, role in plan.uses:
                for x, dy in caps[id(mod)]:
                    e = self._exact(kind, role, mod, x, dy, plan.shape)
                    g = e if g is None else g + e
            return cast(Tensor, g).reshape(m, -1)

        for n in order:  # Kronecker blocks whose weight (or bias) the hooks cannot see: the exact gradient
            if n in done:
                continue
            bias = S.bias_of.get(n)
            xb = S.block_input(n, exact(n), None if bias is None else exact(bias[0]))
            total[:, S.block_slice(n)] += S.blocks[n](xb, nan_policy="propagate").to(dtype)
        if S.rest is not None:
            xs = [exact(n) for n in S.rest_names]
            sc = S.rest_scatter(dtype, device)
            if sc is not None:  # small sparse leftover block: scatter-add its columns into the rows
                xr = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)).to(dtype)
                rows_k, vals_k = sc
                for k in range(rows_k.shape[0]):
                    total.scatter_add_(1, rows_k[k].expand(m, -1), xr * vals_k[k])
            else:
                total += S.rest(xs, nan_policy="propagate").to(dtype)
        return total, losses
