"""Layout of a flat weight vector: which named tensors of a model, in which order, at which offsets.

CMD treats a model as one vector ``w ∈ R^N`` (the concatenation of the chosen parameters and, optionally,
floating-point buffers such as BatchNorm running statistics). :class:`Layout` maps between that vector
and the model's named tensors; it is JSON-serialisable so that a trajectory on disk can describe itself.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    """One named tensor inside the flat vector: ``vector[offset : offset + numel]`` is it, flattened."""

    name: str
    shape: tuple[int, ...]
    offset: int
    kind: str  # "param" or "buffer"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def stop(self) -> int:
        return self.offset + self.numel


class Layout:
    """An ordered list of named tensors forming a flat vector of length ``n``.

    Build it with :meth:`from_model`. ``entries[i].kind`` is ``"param"`` or ``"buffer"``.

    >>> from torch import nn
    >>> lay = Layout.from_model(nn.Linear(3, 2))
    >>> lay.n, [e.name for e in lay.entries]
    (8, ['weight', 'bias'])
    """

    def __init__(self, entries: Sequence[Entry]):
        self.entries = list(entries)
        off = 0
        for e in self.entries:
            if e.offset != off:
                raise ValueError(f"entries: expected contiguous offsets, {e.name!r} starts at {e.offset}, "
                                 f"expected {off}")
            off = e.stop
        self.n = off
        if self.n == 0:
            raise ValueError("params: the selection holds no tensors with elements")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: nn.Module, params: Iterable[str] | Callable[[str], bool] | None = None,
                   buffers: bool = True) -> Layout:
        """Layout of ``model``'s trainable parameters (``params=None``), or of the named ones / those for
        which ``params(name)`` is true; ``buffers=True`` also includes the floating-point buffers of the
        selected modules (BatchNorm running mean/var), which CMD can model or keep (see ``cmd(bn=...)``).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        named = dict(model.named_parameters())
        if params is None:
            chosen = [n for n, p in named.items() if p.requires_grad]
        elif callable(params):
            chosen = [n for n in named if params(n)]
        else:
            wanted = list(params)
            if isinstance(params, str):
                raise TypeError("params: expected an iterable of parameter names or a predicate, got a str")
            unknown = [n for n in wanted if n not in named]
            if unknown:
                raise ValueError(f"params: unknown parameter name(s) {unknown[:5]}; the model has "
                                 f"{list(named)[:8]}{' ...' if len(named) > 8 else ''}")
            chosen = [n for n in named if n in set(wanted)]
        entries: list[Entry] = []
        off = 0
        for n in chosen:
            t = named[n]
            if not t.is_floating_point():
                continue
            e = Entry(n, tuple(t.shape), off, "param")
            if e.numel:
                entries.append(e)
                off = e.stop
        if buffers:
            prefixes = {n.rsplit(".", 1)[0] if "." in n else "" for n in chosen}
            for n, b in model.named_buffers():
                owner = n.rsplit(".", 1)[0] if "." in n else ""
                if owner in prefixes and b.is_floating_point() and b.numel():
                    e = Entry(n, tuple(b.shape), off, "buffer")
                    entries.append(e)
                    off = e.stop
        if not entries:
            raise ValueError("params: the selection holds no floating-point tensors with elements")
        return cls(entries)

    # ----------------------------------------------------------------- (de)serialisation
    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset, "kind": e.kind} for e in self.entries]

    @classmethod
    def from_json(cls, obj: Sequence[Mapping[str, Any]]) -> Layout:
        return cls([Entry(str(d["name"]), tuple(int(s) for s in d["shape"]), int(d["offset"]), str(d["kind"]))
                    for d in obj])

    def digest(self) -> str:
        """``"sha256:<hex>"`` of the names, shapes and kinds (not the values)."""
        return "sha256:" + hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Layout(n={self.n}, tensors={len(self.entries)})"

    # ----------------------------------------------------------------- groups
    def layers(self) -> list[tuple[str, int, int]]:
        """``(name, start, stop)`` per tensor."""
        return [(e.name, e.offset, e.stop) for e in self.entries]

    def buffer_mask(self) -> np.ndarray:
        """Boolean ``[n]``: True where the element belongs to a buffer."""
        m = np.zeros(self.n, dtype=bool)
        for e in self.entries:
            if e.kind == "buffer":
                m[e.offset:e.stop] = True
        return m

    # ----------------------------------------------------------------- model <-> vector
    def check_model(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
        tensors.update(dict(model.named_buffers()))
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            t = tensors.get(e.name)
            if t is None or tuple(t.shape) != e.shape:
                found = "absent" if t is None else f"shape {tuple(t.shape)}"
                raise ValueError(f"model: tensor {e.name!r} expected with shape {e.shape}, found {found}")
            out[e.name] = t
        return out

    def flatten(self, model: nn.Module, dtype=torch.float32) -> torch.Tensor:
        """The flat vector ``[n]`` (CPU, ``dtype``) of ``model``'s tensors in this layout (a copy)."""
        tensors = self.check_model(model)
        with torch.no_grad():
            return torch.cat([tensors[e.name].detach().reshape(-1).to("cpu", dtype) for e in self.entries])

    def unflatten(self, vector, like: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Named tensors (views into ``vector``, reshaped) for ``vector`` of shape ``[n]``; with ``like`` they take
        that model's dtype and device."""
        v = torch.as_tensor(vector)
        if v.dim() != 1 or v.numel() != self.n:
            raise ValueError(f"vector: expected shape [{self.n}], got {tuple(v.shape)}")
        ref = self.check_model(like) if like is not None else None
        out = {}
        for e in self.entries:
            t = v[e.offset:e.stop].reshape(e.shape)
            if ref is not None:
                t = t.to(ref[e.name].device, ref[e.name].dtype)
            out[e.name] = t
        return out


def model_with_weights(model: nn.Module, layout: Layout, vector) -> nn.Module:
    """A deep COPY of ``model`` whose tensors in ``layout`` are set from ``vector`` ``[n]``; ``model`` is untouched.

    >>> from torch import nn
    >>> m = nn.Linear(2, 1)
    >>> lay = Layout.from_model(m)
    >>> m2 = model_with_weights(m, lay, torch.arange(3.0))
    >>> m2.weight.tolist(), bool(m.weight.data.eq(m2.weight.data).all())
    ([[0.0, 1.0]], False)
    """
    clone = copy.deepcopy(model)
    load_weights_(clone, layout, vector)
    return clone


def load_weights_(model: nn.Module, layout: Layout, vector) -> None:
    """Write ``vector`` ``[n]`` into ``model``'s tensors in place (used on copies this package owns)."""
    tensors = layout.check_model(model)
    values = layout.unflatten(vector)
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(values[name].to(t.device, t.dtype))
