"""Whole-model sketches of a list of tensors without concatenating them.

A sum of independent per-block sketches, Φx = Σ_g Φ_g x_g, is itself a sketch of the concatenation:
E‖Σ_g Φ_g x_g‖² = Σ_g ‖x_g‖² because the blocks are independent and each has E‖Φ_g x_g‖² = ‖x_g‖².
This is how gradsketch avoids flattening a model's gradient and how it shards a model across devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_int
from ._random import derive_seed
from .base import BlockSketchOperator
from .kinds import KINDS, sketch

MIN_GROUP = 1 << 15


def _as_shape(name: str, s: Any) -> tuple[int, ...]:
    if isinstance(s, int | float) and not isinstance(s, bool):
        return (check_int(s, name, minimum=1),)
    if isinstance(s, Sequence | torch.Size) and not isinstance(s, str):
        return tuple(check_int(v, name, minimum=0) for v in s) or (1,)
    raise TypeError(f"{name}: expected an int or a shape tuple, got {s!r}")


class BlockSketch(BlockSketchOperator):
    """Sketch a list (or dict) of tensors ``x_i: [..., *shape_i]`` to ``[..., d]`` as Σ_g Φ_g x_g.

    Consecutive small tensors are grouped (each group ≥ max(d, min_group) inputs where possible) and
    concatenated; large tensors get a sketch of their own and are never copied. Each group's sketch is
    ``gradsketch.sketch(kind, n_g, d, seed=derive(seed, g), **options)``.

    ``regenerate=True`` keeps no group's random state between calls: every map builds each group's sketch from
    its seed just before using it and drops it afterwards, so at most one group's state is alive at a time
    (``state_bytes()`` is 0) at the price of the build time on every call. The map is the same matrix as with
    ``regenerate=False`` (same constructor, same seed), so the spec does not record it.

    As a :class:`gradsketch.linalg.LinearOperator` it is the ``(d, n)`` map of the concatenated vector
    (``B @ v`` for ``v [n]``; ``B @ H @ B.T``); ``B.T(y)`` returns the blocks (list or dict) and
    ``B.T @ w`` the concatenated ``[n]`` vector.

    >>> B = BlockSketch({"w": (4, 8), "b": 4}, d=16, kind="sjlt", seed=0)
    >>> B({"w": torch.ones(2, 4, 8), "b": torch.ones(2, 4)}).shape, B.shape
    (torch.Size([2, 16]), (16, 36))
    >>> [t.shape for t in B.T(torch.ones(16)).values()]
    [torch.Size([4, 8]), torch.Size([4])]
    """

    def __init__(self, sizes: Sequence[Any] | Mapping[str, Any], d: int, kind: str = "affd", seed: int = 0,
                 min_group: int = MIN_GROUP, regenerate: bool = False, **options: Any) -> None:
        if isinstance(sizes, Mapping):
            self.names: list[str] | None = [str(k) for k in sizes]
            raw = list(sizes.values())
        elif isinstance(sizes, Sequence) and not isinstance(sizes, str):
            self.names = None
            raw = list(sizes)
        else:
            raise TypeError(f"sizes: expected a list or dict of sizes, got {type(sizes).__name__}")
        if not raw:
            raise ValueError("sizes: expected at least one block, got none")
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        self.shapes = [_as_shape(f"sizes[{i}]", s) for i, s in enumerate(raw)]
        self.sizes = [math.prod(s) for s in self.shapes]
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"sizes: every block needs at least one element, got {self.sizes}")
        self.d = check_int(d, "d", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self.kind, self.options = kind, dict(options)
        self.min_group = check_int(min_group, "min_group", minimum=1)
        self.n = sum(self.sizes)
        allows = KINDS[kind].allows_d_greater_than_n
        if self.n < self.d and not allows:
            raise ValueError(f"d: kind {kind!r} needs d <= n, got d={self.d} > n={self.n}")
        if not isinstance(regenerate, bool):
            raise TypeError(f"regenerate: expected True or False, got {regenerate!r}")
        self.regenerate = regenerate
        self.groups = self._group(allows)
        self._init_operator(self.n, self.d, "cpu")
        built = _GroupSketches(self)
        self.sketches: Sequence[Any] = built if regenerate else list(built)

    def _group(self, allows: bool) -> list[list[int]]:
        big = max(self.d, self.min_group)
        groups: list[list[int]] = []
        cur: list[int] = []
        cur_n = 0
        for i, s in enumerate(self.sizes):
            if s >= big:
                if cur and (cur_n >= self.d or allows):
                    groups.append(cur)
                    cur, cur_n = [], 0
                groups.append([*cur, i])
                cur, cur_n = [], 0
                continue
            cur.append(i)
            cur_n += s
            if cur_n >= big:
                groups.append(cur)
                cur, cur_n = [], 0
        if cur:
            if groups and cur_n < self.d and not allows:
                groups[-1].extend(cur)
            else:
                groups.append(cur)
        return groups

    # -- spec / device ---------------------------------------------------------------------
    @property
    def spec(self) -> dict[str, Any]:
        return {"kind": "block", "inner_kind": self.kind, "sizes": [list(s) for s in self.shapes],
                "names": self.names, "d": self.d, "seed": self.seed, "min_group": self.min_group,
                "options": self.options}

    def to(self, device: torch.device | str) -> BlockSketch:
        if not self.regenerate:
            for s in self.sketches:
                s.to(device)
        self.device = torch.device(device)
        return self

    def state_bytes(self) -> int:
        """Bytes of random state held between calls (0 with ``regenerate=True``)."""
        return 0 if self.regenerate else sum(s.state_bytes() for s in self.sketches)

    # -- maps ---------------------------------------------------------------------------------
    def _as_list(self, xs: Any, what: str) -> list[Tensor]:
        if isinstance(xs, Mapping):
            if self.names is None:
                raise TypeError(f"{what}: this BlockSketch was built from a list; pass a list of tensors")
            missing = [k for k in self.names if k not in xs]
            if missing:
                raise ValueError(f"{what}: missing blocks {missing}")
            return [xs[k] for k in self.names]
        if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
            raise TypeError(f"{what}: expected a list or dict of {len(self.sizes)} tensors, got {type(xs).__name__}")
        if len(xs) != len(self.sizes):
            raise ValueError(f"{what}: expected {len(self.sizes)} tensors, got {len(xs)}")
        return list(xs)

    def __call__(self, xs: Sequence[Tensor] | Mapping[str, Tensor], out_dtype: torch.dtype | None = None,
                 nan_policy: str | None = None) -> Tensor:
        """Σ_g Φ_g x_g: tensors ``[..., *shape_i]`` (or ``[..., n_i]``) with equal leading dims -> ``[..., d]``."""
        tensors = self._as_list(xs, "xs")
        flat: list[Tensor] = []
        lead: tuple[int, ...] | None = None
        for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
            if not isinstance(t, Tensor):
                raise TypeError(f"xs[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            k = len(shape)
            if t.ndim >= k and tuple(t.shape[t.ndim - k:]) == shape:
                this_lead = tuple(t.shape[: t.ndim - k])
            elif t.ndim >= 1 and t.shape[-1] == self.sizes[i]:
                this_lead = tuple(t.shape[:-1])
            else:
                raise ValueError(f"xs[{i}]: expected shape [..., {', '.join(map(str, shape))}] or "
                                 f"[..., {self.sizes[i]}], got {tuple(t.shape)}")
            if lead is None:
                lead = this_lead
            elif this_lead != lead:
                raise ValueError(f"xs[{i}]: leading dimensions {this_lead} differ from xs[0]'s {lead}")
            flat.append(t.reshape(*this_lead, self.sizes[i]))
        out = None
        for gi, g in enumerate(self.groups):
            S = self.sketches[gi]  # indexed, not zipped: zip would hold the previous group's sketch meanwhile
            x = flat[g[0]] if len(g) == 1 else torch.cat([flat[i] for i in g], dim=-1)
            y = S(x, out_dtype=out_dtype or torch.promote_types(x.dtype, torch.float32), nan_policy=nan_policy)
            del S  # with regenerate=True: this group's state goes before the next group's is built
            out = y if out is None else out + y
        assert out is not None
        return out.to(out_dtype or tensors[0].dtype)

    def _adjoint_rows(self, y: Tensor, out_dtype: torch.dtype | None = None, nan_policy: str | None = None
                      ) -> list[Tensor] | dict[str, Tensor]:
        """Φᵀy split back into blocks: ``[..., d]`` -> list (or dict) of ``[..., *shape_i]`` (``B.T(y)``)."""
        parts: list[Tensor | None] = [None] * len(self.sizes)
        for gi, g in enumerate(self.groups):
            S = self.sketches[gi]
            z = S.T(y, out_dtype=out_dtype, nan_policy=nan_policy)
            del S
            for i, piece in zip(g, torch.split(z, [self.sizes[i] for i in g], dim=-1)):
                parts[i] = piece.reshape(*y.shape[:-1], *self.shapes[i])
        out = [p for p in parts if p is not None]
        if self.names is not None:
            return dict(zip(self.names, out))
        return out

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Explicit ``[d, n]`` matrix of the concatenated map (tests only)."""
        cols: list[Tensor | None] = [None] * len(self.sizes)
        for g, S in zip(self.groups, self.sketches):
            m = S.matrix(dtype)
            for i, piece in zip(g, torch.split(m, [self.sizes[i] for i in g], dim=1)):
                cols[i] = piece
        return torch.cat(cols, dim=1)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (f"BlockSketch(kind={self.kind!r}, blocks={len(self.sizes)}, groups={len(self.groups)}, "
                f"n={self.n}, d={self.d}{', regenerate=True' if self.regenerate else ''})")


class _GroupSketches(Sequence):
    """The groups' sketches of a :class:`BlockSketch`, each built from its seed when asked for (on the block
    sketch's current device): ``list(...)`` stores them; iterating builds one at a time."""

    def __init__(self, block: BlockSketch) -> None:
        self.block = block

    def __len__(self) -> int:
        return len(self.block.groups)

    def __getitem__(self, gi):  # type: ignore[no-untyped-def,override]
        b = self.block
        if isinstance(gi, slice):
            return [self[i] for i in range(*gi.indices(len(self)))]
        g = b.groups[gi]
        S = sketch(b.kind, sum(b.sizes[i] for i in g), b.d, seed=derive_seed(b.seed, "block", gi % len(self)),
                   **b.options)
        return S if b.device == torch.device("cpu") else S.to(b.device)

    def __iter__(self):  # type: ignore[no-untyped-def]
        for gi in range(len(self)):
            yield self[gi]
