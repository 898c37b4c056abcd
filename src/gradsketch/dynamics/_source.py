"""Uniform access to a trajectory ``[N, E]``: an in-memory array/tensor or a :class:`Trajectory` on disk."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ._layout import Layout
from .trajectory import Trajectory


class Source:
    """Weights × snapshots, read as float64 blocks. ``layers``: ``(name, start, stop)`` groups of weights."""

    def __init__(self, data, layers: list[tuple[str, int, int]] | None = None, layout: Layout | None = None):
        self.layout = layout
        if isinstance(data, Trajectory):
            self.traj: Trajectory | None = data
            self.mem: np.ndarray | None = None
            self.n, self.e = data.shape
            self.layout = data.layout
            self.exact64 = False
        else:
            if isinstance(data, torch.Tensor):
                arr = data.detach().cpu().numpy()
            elif isinstance(data, np.ndarray):
                arr = data
            else:
                raise TypeError("trajectory: expected a Trajectory, a torch.Tensor or a numpy array [N, E], "
                                f"got {type(data).__name__}")
            if arr.ndim != 2:
                raise ValueError(f"trajectory: expected a 2-D [N weights, E snapshots] array, got shape "
                                 f"{tuple(arr.shape)}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(f"trajectory: expected a floating-point array, got dtype {arr.dtype}")
            self.traj = None
            self.mem = arr
            self.n, self.e = arr.shape
            self.exact64 = arr.dtype == np.float64
        if layers is None:
            layers = self.layout.layers() if self.layout is not None else [("all", 0, self.n)]
        if self.layout is not None and self.layout.n != self.n:
            raise ValueError(f"layout: describes {self.layout.n} weights, the trajectory has {self.n}")
        self.layers = layers
        cover = 0
        for name, s, e in layers:
            if s != cover or e < s:
                raise ValueError(f"layers: expected contiguous (name, start, stop) groups covering 0..{self.n}; "
                                 f"group {name!r} is ({s}, {e})")
            cover = e
        if cover != self.n:
            raise ValueError(f"layers: groups cover 0..{cover}, the trajectory has {self.n} weights")

    @property
    def out_dtype(self):
        return np.float64 if self.exact64 else np.float32

    def columns(self, index: np.ndarray, block: int = 2**16) -> np.ndarray:
        """Trajectories ``[len(index), E]`` (float64) of the weights at ``index`` (sorted, unique)."""
        if self.traj is not None:
            # one streaming pass: random columns through a memory map would fault in (and keep resident)
            # the pages around every sampled column, i.e. most of the file
            index = np.asarray(index, dtype=np.int64)
            out = np.empty((len(index), self.e), dtype=np.float64)
            for s, e, x in self.traj.blocks(block):
                lo, hi = np.searchsorted(index, [s, e])
                if hi > lo:
                    out[lo:hi] = x[index[lo:hi] - s]
            return out
        assert self.mem is not None
        return np.asarray(self.mem[np.asarray(index)], dtype=np.float64)

    def blocks(self, block: int) -> Iterator[tuple[int, int, np.ndarray]]:
        if self.traj is not None:
            yield from self.traj.blocks(block)
            return
        assert self.mem is not None
        for s in range(0, self.n, block):
            e = min(s + block, self.n)
            yield s, e, np.array(self.mem[s:e], dtype=np.float64)  # a copy: callers may modify it

    def snapshot(self, t: int) -> np.ndarray:
        if self.traj is not None:
            return self.traj.snapshot(t)
        assert self.mem is not None
        return np.asarray(self.mem[:, t])
