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

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .task import Task


def _derive_seed(seed: int, tag: str) -> int:
    h = hashlib.sha256(f"gradsketch.factored:{int(seed)}:{tag}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


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


class FactoredSketch:
    """Whole-model sketch R^N -> R^d: Σ_p Φ_p(g_p) over the task's parameters p (independent blocks).

    Supported weights of shape [rows, cols] (2-D view: first dimension × the rest) get a Kronecker ``qk``
    sketch F_r ⊗ F_c with d = d_r·d_c (:func:`factor_pair`); the others share one BlockSketch of ``kind``.
    Build with :meth:`gradsketch.Task.factored_sketch`. ``S(xs)``: list of [..., n_p] -> [..., d];
    ``S.T(y)``: [..., d] -> list of [..., n_p]; ``S.spec`` rebuilds it with :meth:`from_spec`.
    """

    def __init__(self, names: list[str], sizes: list[int], d: int, blocks: dict[str, Any],
                 shapes2d: dict[str, tuple[int, int]], rest: Any, spec: dict[str, Any]) -> None:
        self.names, self.sizes, self.d = list(names), [int(s) for s in sizes], int(d)
        self.n = int(sum(self.sizes))
        self.blocks = blocks                   # name -> qk Sketch (Kronecker)
        self.shapes2d = shapes2d               # name -> (rows, cols)
        self.rest = rest                       # BlockSketch over rest_names, or None
        self.rest_names = [n for n in self.names if n not in blocks]
        self.spec = spec
        self._factors: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    @classmethod
    def for_task(cls, task: Task, d: int, seed: int = 0, kind: str = "affd",
                 **options: Any) -> FactoredSketch:
        if int(d) != d or d < 1:
            raise ValueError(f"d: expected a positive integer, got {d!r}")
        plans = plan_task(task)
        fac: dict[str, dict[str, Any]] = {}
        for n, shape in zip(task.param_names, task.param_shapes):
            if plans[n].weight_like and len(shape) >= 2:
                rows, cols = shape[0], math.prod(shape[1:])
                pair = factor_pair(int(d), rows, cols)
                if pair is not None:
                    fac[n] = dict(kind="qk", n=rows * cols, d=int(d), seed=_derive_seed(seed, n),
                                  in_factors=[rows, cols], out_factors=list(pair))
        rest = [(n, s) for n, s in zip(task.param_names, task.param_sizes) if n not in fac]
        rest_kind = kind
        if rest and sum(s for _, s in rest) < d:
            from ..sketch import KINDS

            if not KINDS[kind].allows_d_greater_than_n:
                rest_kind = "sjlt"  # fewer leftover coordinates than d: a CountSketch block (d > n allowed)
        spec = {"type": "FactoredSketch", "d": int(d), "seed": int(seed), "kind": kind, "options": options,
                "names": list(task.param_names), "sizes": list(task.param_sizes), "blocks": fac,
                "rest": None if not rest else dict(sizes=dict(rest), d=int(d), kind=rest_kind,
                                                   seed=_derive_seed(seed, "rest"), **options)}
        return cls.from_spec(spec)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FactoredSketch:
        from ..sketch import BlockSketch, sketch

        blocks = {n: sketch(**s) for n, s in spec["blocks"].items()}
        shapes2d = {n: tuple(s["in_factors"]) for n, s in spec["blocks"].items()}
        rest = None if spec["rest"] is None else BlockSketch(**spec["rest"])
        return cls(spec["names"], spec["sizes"], spec["d"], blocks, shapes2d, rest, spec)

    def to(self, device: torch.device | str) -> FactoredSketch:
        for s in self.blocks.values():
            s.to(device)
        if self.rest is not None:
            self.rest.to(device)
        self._factors.clear()
        return self

    def factors(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(F_r [d_r, rows], F_c [d_c, cols]) of a Kronecker block, scale folded in (cached)."""
        key = (name, dtype, device)
        if key not in self._factors:
            fr, fc = self.blocks[name].factor_matrices(torch.float64)
            self._factors[key] = (fr.to(device, dtype), fc.to(device, dtype))
        return self._factors[key]

    def _split(self, xs: Any) -> list[Tensor]:
        xs = list(xs.values()) if isinstance(xs, dict) else list(xs)
        if len(xs) != len(self.names):
            raise ValueError(f"xs: expected {len(self.names)} tensors (one per parameter), got {len(xs)}")
        return xs

    def __call__(self, xs: Any, nan_policy: str | None = None) -> Tensor:
        xs = self._split(xs)
        out = None
        byname = dict(zip(self.names, xs))
        for n, s in self.blocks.items():
            y = s(byname[n], nan_policy=nan_policy)
            out = y if out is None else out + y
        if self.rest is not None:
            y = self.rest([byname[n] for n in self.rest_names], nan_policy=nan_policy)
            out = y if out is None else out + y
        return cast(Tensor, out)  # at least one block (a sketch covers n >= 1 parameters)

    def T(self, y: Tensor, nan_policy: str | None = None) -> list[Tensor]:
        res: dict[str, Tensor] = {n: s.T(y, nan_policy=nan_policy) for n, s in self.blocks.items()}
        if self.rest is not None:
            r = self.rest.T(y, nan_policy=nan_policy)
            r = list(r.values()) if isinstance(r, dict) else list(r)
            res.update(zip(self.rest_names, r))
        return [res[n] for n in self.names]

    def __repr__(self) -> str:
        return (f"FactoredSketch(n={self.n}, d={self.d}, kronecker_blocks={len(self.blocks)}, "
                f"other_blocks={len(self.rest_names)})")


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
                p = {n: t.requires_grad_(n in self.hooked) for n, t in
                     ((n, t.detach()) for n, t in task.params_dict().items())}
                with torch.enable_grad():
                    losses = task._losses(p, split.rebuild(), split.size)
            finally:
                for h in handles:
                    h.remove()
            if not clone and any(o._version != v for lst in caps.values() for _, o, v in lst):
                self.clone_outputs = True  # a layer output was modified in place (e.g. ReLU(inplace=True))
                continue
            break
        outs = [o for lst in caps.values() for _, o, _ in lst if o.requires_grad]
        pnames = [n for n in task.param_names if n in self.hooked and p[n].requires_grad] if param_grads else []
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
        else:
            g = torch.einsum("mtr,mtc->mrc", r, c)
        return g.reshape(m, *shape)


class FactoredEngine(HookEngine):
    """Runs ``sketch_grads(mode="factored")`` for one task and one :class:`FactoredSketch`."""

    def __init__(self, task: Task, sketch: FactoredSketch) -> None:
        super().__init__(task)
        self.sketch = sketch

    def batch(self, split: Any, chunk: int | None = None) -> tuple[Tensor, Tensor]:
        rows, losses = [], []
        self.task._check_once(split)
        step = split.size if chunk is None else chunk
        for _, sub in split.chunks(step):
            r, li = self._one(sub)
            rows.append(r)
            losses.append(li)
        return torch.cat(rows), torch.cat(losses)

    def _one(self, split: Any) -> tuple[Tensor, Tensor]:
        task, S = self.task, self.sketch
        dtype, device, m = task.dtype, task.device, split.size
        losses, caps, gd = self.prepare(split)
        total = None
        explicit: dict[str, Tensor] = {}
        for n in self.task.param_names:
            if n not in self.hooked:
                continue
            plan = self.plans[n]
            if n in S.blocks:
                fr, fc = S.factors(n, dtype, device)
                for mod, kind, _ in plan.uses:
                    for x, dy in caps[id(mod)]:
                        r, c = _rows_cols(kind, mod, x, dy)
                        pr = fr.T[r] if kind == "embedding" else r.to(dtype) @ fr.T   # [m, T, d_r]
                        pc = c.to(dtype) @ fc.T                                        # [m, T, d_c]
                        # Σ_t (F_r δ_t)(F_c a_t)ᵀ: a batched [d_r, T] @ [T, d_c] product per example,
                        # accumulated in place into the [m, d] result
                        if total is None:
                            total = torch.bmm(pr.transpose(1, 2), pc).reshape(m, -1)
                        else:
                            total.view(m, fr.shape[0], fc.shape[0]).baddbmm_(pr.transpose(1, 2), pc)
                continue
            g = None
            for mod, kind, role in plan.uses:
                for x, dy in caps[id(mod)]:
                    e = self._exact(kind, role, mod, x, dy, plan.shape)
                    g = e if g is None else g + e
            explicit[n] = cast(Tensor, g).reshape(m, -1)
        if total is None:
            total = torch.zeros(m, S.d, dtype=dtype, device=device)
        for n in self.generic:
            if n in S.blocks:  # Kronecker block fed with the exact per-example gradient
                total += S.blocks[n](gd[n].reshape(m, -1), nan_policy="propagate").to(dtype)
            else:
                explicit[n] = gd[n].reshape(m, -1)
        if S.rest is not None:
            total += S.rest([explicit[n] for n in S.rest_names], nan_policy="propagate").to(dtype)
        return total, losses

