"""Train a network in a random d-dimensional affine subspace of its parameter space.

θ = θ0 + c·Φᵀω, ω ∈ R^d, ω0 = 0 (Li et al. 2018, "Measuring the Intrinsic Dimension of Objective
Landscapes", arXiv 1804.08838). SAID (Aghajanyan et al. 2021, arXiv 2012.13255): per parameter tensor i,
θ_i = θ0_i + λ_i·c·(Φᵀω)_i with λ ∈ R^{#tensors} trained as well and counted in the budget.

Φ is ONE whole-model sketch (a :class:`gradsketch.sketch.BlockSketch` over the selected parameter
shapes: a sum of independent per-block sketches is a sketch of the concatenation), so Φᵀω is split per
tensor without concatenating, with no per-tensor rescaling and no cropping of ω. With
``normalize=True`` (default) c = √(d/n), so E‖c·Φᵀω‖² = ‖ω‖², the unit-column convention of Li et al.;
with ``normalize=False`` c = 1 and E‖Φᵀω‖² = (n/d)‖ω‖².
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..sketch import BlockSketch
from ..sketch.kinds import KINDS


def _select(model: nn.Module, params: Any) -> list[str]:
    named = dict(model.named_parameters())
    if params is None:
        names = list(named)
    elif callable(params):
        names = [k for k, p in named.items() if params(k, p)]
    elif isinstance(params, str):
        raise TypeError(f"params: expected a list of parameter names, a predicate or None, got the string {params!r}")
    elif isinstance(params, Iterable):
        items = list(params)
        names = []
        by_id = {id(p): k for k, p in named.items()}
        for it in items:
            if isinstance(it, str):
                if it not in named:
                    raise ValueError(f"params: {it!r} is not a parameter of the model; "
                                     f"expected one of {list(named)[:8]}{'...' if len(named) > 8 else ''}")
                names.append(it)
            elif isinstance(it, Tensor):
                if id(it) not in by_id:
                    raise ValueError("params: a tensor passed is not a parameter of the model")
                names.append(by_id[id(it)])
            else:
                raise TypeError(f"params: expected names or parameter tensors, got {type(it).__name__}")
        names = list(dict.fromkeys(names))
    else:
        raise TypeError(f"params: expected a list of parameter names, a predicate or None, got {type(params).__name__}")
    names = [k for k in names if named[k].numel() > 0]
    if not names:
        raise ValueError("params: no trainable parameter selected (expected at least one non-empty parameter "
                         f"of the model, got {0 if params is None else 'a selection matching none'})")
    return names


class SubspaceModel(nn.Module):
    """Wrap ``model`` so that only ω ∈ R^d (and, with ``said=True``, λ ∈ R^{#tensors}) is trainable.

    forward(*args, **kwargs) = model(*args, **kwargs) evaluated at θ = θ0 + c·Φᵀ(m ⊙ ω) through
    ``torch.func.functional_call`` (m is the active-coordinate mask of the one-run search, all ones by
    default). θ0 are the wrapped model's own parameters, kept in ``self.model`` and used as constants
    (detached): the caller's model is never modified (its ``requires_grad`` flags stay as they were and no
    gradient reaches its ``.grad``), and :meth:`parameters` lists only ω (and λ), so an optimiser built
    on it trains nothing else. The extra memory per forward is O(n) (Φᵀω and θ0 + Φᵀω).

    Parameters
    ----------
    model : nn.Module whose selected parameters become θ0 (the unselected ones stay fixed at their values).
    d : subspace dimension (ω's length).
    kind, seed, **sketch_options : the sketch, ``BlockSketch(shapes, d, kind, seed, **sketch_options)``;
        ``regenerate=True`` keeps none of the sketch's random state between steps (each group's state is
        rebuilt from its seed for Φᵀ in forward and Φ in backward: less memory, one sketch build per map).
    said : per-tensor scales λ (initialised to 1) trained and counted in ``n_trainable``.
    params : None (all parameters), a list of names or parameter tensors, or ``predicate(name, p) -> bool``.
    normalize : c = √(d/n) if True (E‖cΦᵀω‖² = ‖ω‖²), c = 1 otherwise.

    Attributes: ``omega`` [d], ``said_lambda`` [#tensors] (SAID only), ``sketch`` (BlockSketch),
    ``param_names``, ``n`` (subspace ambient size), ``d``, ``n_trainable``, ``active_dim``.
    """

    omega_mask: Tensor  # registered buffer (declared for the type checker)
    said_lambda: nn.Parameter | None

    def __init__(self, model: nn.Module, d: int, kind: str = "affd", seed: int = 0, said: bool = False,
                 params: Any = None, normalize: bool = True, **sketch_options: Any) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"d: expected a positive integer, got {d!r}")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        self.model = model
        self.param_names = _select(model, params)
        named = dict(model.named_parameters())
        shapes = {k: tuple(named[k].shape) or (1,) for k in self.param_names}
        self.n = sum(named[k].numel() for k in self.param_names)
        if d > self.n and not KINDS[kind].allows_d_greater_than_n:
            raise ValueError(f"d: kind {kind!r} needs d <= n (the number of selected parameters), got d={d} > "
                             f"n={self.n}; use a smaller d or kind 'dense'/'sjlt'")
        self.d, self.kind, self.seed, self.said, self.normalize = d, kind, seed, bool(said), bool(normalize)
        ref = named[self.param_names[0]]
        self.sketch = BlockSketch(shapes, d, kind=kind, seed=seed, **sketch_options).to(ref.device)
        self.scale = math.sqrt(d / self.n) if normalize else 1.0
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        self.omega = nn.Parameter(torch.zeros(d, dtype=dtype, device=ref.device))
        if self.said:
            self.said_lambda = nn.Parameter(torch.ones(len(self.param_names), dtype=dtype, device=ref.device))
        else:
            self.said_lambda = None
        self.register_buffer("omega_mask", torch.ones(d, dtype=dtype, device=ref.device))
        self._active = d

    def named_parameters(self, prefix: str = "", recurse: bool = True,  # type: ignore[no-untyped-def,override]
                         remove_duplicate: bool = True):
        """Only the subspace's own parameters (ω, and λ for SAID): θ0 belongs to the wrapped model."""
        for name, p in super().named_parameters(prefix, recurse, remove_duplicate):
            if not name[len(prefix):].lstrip(".").startswith("model."):
                yield name, p

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def n_trainable(self) -> int:
        """Trainable budget: active coordinates of ω, plus #tensors for SAID's λ."""
        return self.active_dim + (len(self.param_names) if self.said else 0)

    @property
    def active_dim(self) -> int:
        return self._active

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description (the sketch spec + wrapper options)."""
        return {"d": self.d, "n": self.n, "kind": self.kind, "seed": self.seed, "said": self.said,
                "normalize": self.normalize, "params": list(self.param_names), "sketch": self.sketch.spec}

    def set_active_dim(self, k: int) -> None:
        """Keep only ω[:k] trainable and nonzero (value and gradient masked): the one-run search's mask."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.d:
            raise ValueError(f"k: expected an integer in [1, {self.d}], got {k!r}")
        with torch.no_grad():
            self.omega_mask.zero_()
            self.omega_mask[:k] = 1
            self.omega[k:] = 0
        self._active = k

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._active = int(self.omega_mask.sum().item())

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, *args, **kwargs)
        self.sketch.to(self.omega.device)
        return out

    # -- the map ω -> θ ------------------------------------------------------------------------
    def _coords(self) -> Tensor:
        w = self.omega * self.omega_mask if self._active < self.d else self.omega
        return w * self.scale

    def deltas(self) -> dict[str, Tensor]:
        """θ − θ0 per selected tensor: c·(Φᵀ(m ⊙ ω))_i (times λ_i for SAID), shaped like the parameters."""
        named = dict(self.model.named_parameters())
        parts = _AdjointFn.apply(self._coords(), self.sketch, [named[k].detach() for k in self.param_names], False)
        out = {}
        for i, (k, delta) in enumerate(zip(self.param_names, parts)):
            if self.said_lambda is not None:
                delta = delta * self.said_lambda[i].to(delta.dtype)
            out[k] = delta
        return out

    def current_params(self) -> dict[str, Tensor]:
        """θ0 + Δθ for the selected tensors (differentiable in ω and λ only; θ0 is a constant).

        Without SAID this is one fused step (:class:`_AdjointFn`): θ_i = θ0_i + c·(Φᵀw)_i is written group by
        group into fresh tensors, so besides θ0 and θ only one sketch group's padded buffer is alive at a
        time, and nothing of the padded length is kept for backward (Φ is applied to ∂L/∂θ there)."""
        named = dict(self.model.named_parameters())
        if self.said_lambda is not None:
            return {k: named[k].detach() + v for k, v in self.deltas().items()}
        base = [named[k].detach() for k in self.param_names]
        return dict(zip(self.param_names, _AdjointFn.apply(self._coords(), self.sketch, base, True)))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {k: p.detach() for k, p in self.model.named_parameters()}
        params.update(self.current_params())
        return functional_call(self.model, params, args, kwargs)

    # -- export --------------------------------------------------------------------------------
    def merged_model(self) -> nn.Module:
        """A deep copy of the wrapped model with θ = θ0 + Δθ written into its parameters."""
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            named = dict(m.named_parameters())
            for k, v in self.current_params().items():
                named[k].copy_(v)
        return m

    def subspace_state_dict(self) -> dict[str, Any]:
        """Just the trained state (ω, mask, λ) and the spec; θ0 must come from the same model."""
        out: dict[str, Any] = {"omega": self.omega.detach().clone(), "omega_mask": self.omega_mask.clone(),
                               "spec": self.spec}
        if self.said_lambda is not None:
            out["said_lambda"] = self.said_lambda.detach().clone()
        return out

    def load_subspace_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`subspace_state_dict`; checks that the spec matches."""
        spec = state.get("spec")
        if spec is not None and spec != self.spec:
            diff = sorted(k for k in spec if spec.get(k) != self.spec.get(k))
            raise ValueError(f"state: expected a state saved from the same subspace spec, differing keys {diff}")
        with torch.no_grad():
            self.omega.copy_(state["omega"])
            if "omega_mask" in state:
                self.omega_mask.copy_(state["omega_mask"])
            if self.said_lambda is not None:
                if "said_lambda" not in state:
                    raise ValueError("state: expected 'said_lambda' for a SAID model, got none")
                self.said_lambda.copy_(state["said_lambda"])
        self._active = int(self.omega_mask.sum().item())

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, d={self.d}, n={self.n}, tensors={len(self.param_names)}, said={self.said}, "
                f"active_dim={self._active}, n_trainable={self.n_trainable}")


def _adjoint_parts(sketch: BlockSketch, y: Tensor, base: list[Tensor], add_base: bool) -> list[Tensor]:
    """Per selected tensor i: (Φᵀy)_i (+ base_i), shaped and typed like base_i, computed one sketch group at a
    time (the group's padded Φᵀ buffer is released before the next group starts)."""
    out: list[Tensor | None] = [None] * len(base)
    for gi, g in enumerate(sketch.groups):
        S = sketch.sketches[gi]  # built here with regenerate=True (and released below, before the next group's)
        z = S.T(y)
        del S
        for i, piece in zip(g, torch.split(z, [sketch.sizes[i] for i in g], dim=-1)):
            b = base[i]
            piece = piece.reshape(b.shape)
            out[i] = piece.to(b.dtype) + b if add_base else piece.to(b.dtype, copy=True)
        del z
    return out  # type: ignore[return-value]


class _AdjointFn(torch.autograd.Function):
    """(θ0_i + (Φᵀy)_i)_i (``add_base``) or ((Φᵀy)_i)_i for a :class:`BlockSketch` Φ, without autograd records
    inside: Φᵀ is linear, so its vector-Jacobian product is Φ, applied in backward to the incoming
    ∂L/∂θ_i (the sketch's no-autograd fast path when no higher-order graph is asked for; differentiable
    torch ops under ``create_graph``). Forward-mode: the tangent is Φᵀ applied to y's tangent."""

    @staticmethod
    def forward(y, sketch, base, add_base):  # type: ignore[no-untyped-def,override]
        with torch.no_grad():
            return tuple(_adjoint_parts(sketch, y, base, add_base))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def,override]
        y, sketch, base, _add = inputs
        ctx.sketch, ctx.y_dtype = sketch, y.dtype
        # shape/dtype stand-ins for jvp (stride-0 views of one scalar: no memory)
        ctx.like = [torch.zeros((), dtype=b.dtype, device=b.device).expand(b.shape) for b in base]

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[no-untyped-def,override]
        sk = ctx.sketch
        gy = sk([g.reshape(-1) for g in grads] if sk.names is None else dict(zip(sk.names, grads)),
                out_dtype=ctx.y_dtype)
        return gy, None, None, None

    @staticmethod
    def jvp(ctx, ty, *_):  # type: ignore[no-untyped-def,override]
        with torch.no_grad():
            return tuple(_adjoint_parts(ctx.sketch, ty, ctx.like, False))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


ModelFn = Callable[[], nn.Module]
