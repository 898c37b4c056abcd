"""Weight trajectories on disk: a recorder callback for a training loop and a reader for CMD.

A trajectory of ``E`` snapshots of an ``N``-element weight vector is a :class:`gradsketch.store.GradientStore`
of ``E`` rows × ``N`` columns in float32, one chunk per snapshot: row ``k`` is snapshot ``k``. The store gives
what the recorder needs — preallocated memory-mapped data, a checksummed completion marker per
snapshot, atomic creation, and resume (a snapshot is complete iff its marker exists; a writer killed
mid-snapshot leaves it missing and it is rewritten in full). The layout (names, shapes, offsets), the
schedule (every ``c`` epochs or steps) and the snapshot count are written into the store manifest.

Reading for CMD goes by column blocks ``[:, j0:j1]`` (all snapshots of a range of weights) through a memory
map that is dropped after every block, so the resident memory of a pass over ``N × E`` stays at one block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..store import GradientStore
from ._layout import Layout

SPEC_KIND = "gradsketch.dynamics.trajectory"


def _spec(unit: str, every: int) -> dict:
    return {"kind": SPEC_KIND, "version": 1, "unit": unit, "every": every}


class Trajectory:
    """Read-only view of a recorded trajectory (snapshots ``0 .. n_snapshots-1`` that are complete).

    ``n``: weights per snapshot; ``n_snapshots``: the complete prefix (a trajectory whose later snapshots
    were never written can still be analysed); ``layout``: the :class:`Layout`.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> m = nn.Linear(2, 1)
    >>> d = tempfile.mkdtemp()
    >>> rec = TrajectoryRecorder(d + "/traj", m, n_snapshots=3)
    >>> for epoch in range(3):
    ...     with torch.no_grad():
    ...         _ = m.weight.add_(1.0)
    ...     _ = rec.on_epoch_end(m, epoch)
    >>> tr = Trajectory.open(d + "/traj")
    >>> tr.n, tr.n_snapshots, tr.columns([0]).shape
    (3, 3, (1, 3))
    """

    def __init__(self, path, store: GradientStore):
        self.path = Path(path)
        meta = store.metadata
        if store.spec.get("kind") != SPEC_KIND:
            store.close()
            raise ValueError(f"path: {str(path)!r} is a gradsketch store but not a trajectory "
                             f"(spec kind {store.spec.get('kind')!r})")
        self.layout = Layout.from_json(meta["layout"])
        self.unit = str(store.spec["unit"])
        self.every = int(store.spec["every"])
        self.capacity = store.n_rows
        done = set(store.completed_chunks())
        k = 0
        while k in done:
            k += 1
        self.n_snapshots = k
        self.n = store.d
        store.close()

    @classmethod
    def open(cls, path) -> Trajectory:
        """Open the trajectory at ``path`` (written by :class:`TrajectoryRecorder`)."""
        return cls(path, GradientStore.open(path))

    def __repr__(self) -> str:
        return f"Trajectory({str(self.path)!r}, n={self.n}, snapshots={self.n_snapshots}/{self.capacity})"

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, E)``: weights × complete snapshots (the orientation CMD uses)."""
        return (self.n, self.n_snapshots)

    def _read(self, fn):
        st = GradientStore.open(self.path)
        try:
            return fn(st.array((0, self.n_snapshots)))
        finally:
            st.close()

    def snapshot(self, t: int) -> np.ndarray:
        """Weights ``[N]`` (float32 copy) of snapshot ``t`` (negative counts from the end)."""
        t = _snapshot_index(t, self.n_snapshots)
        return self._read(lambda a: np.array(a[t], dtype=np.float32))

    def columns(self, index) -> np.ndarray:
        """Trajectories ``[len(index), E]`` (float64) of the weights at ``index``."""
        idx = np.asarray(index, dtype=np.int64)
        order = np.argsort(idx)
        out = np.empty((len(idx), self.n_snapshots), dtype=np.float64)
        out[order] = self._read(lambda a: np.array(a[:, idx[order]], dtype=np.float64).T)
        return out

    def blocks(self, block: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, X)`` with ``X = trajectories[start:stop]`` of shape ``[stop-start, E]`` (float64),
        reopening the memory map per block so pages read are released."""
        for s in range(0, self.n, block):
            e = min(s + block, self.n)
            yield s, e, self._read(lambda a, s=s, e=e: np.array(a[:, s:e], dtype=np.float64).T)


def _snapshot_index(t, e: int) -> int:
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise TypeError(f"t: expected an int snapshot index, got {type(t).__name__}")
    t = int(t)
    if not -e <= t < e:
        raise IndexError(f"t: snapshot {t} out of range for {e} snapshots")
    return t % e


class TrajectoryRecorder:
    """Callback for a plain training loop: store ``model``'s weights every ``every`` epochs or steps.

    Snapshot ``k`` is taken after epoch (or step) ``(k + 1) * every - 1`` (0-based), so the schedule — and
    hence the file — depends only on the training run. ``n_snapshots`` fixes the capacity (the file is
    preallocated on disk, float32, ``n_snapshots × N × 4`` bytes). Call :meth:`on_epoch_end` (``unit="epoch"``)
    or :meth:`on_step` (``unit="step"``) from the loop; :meth:`record` writes a snapshot by index.

    Resume: re-create the recorder with the same arguments on the same ``path`` after a crash; snapshots
    already complete are skipped (with ``verify=True`` their bytes are compared to the model's), the one
    being written when the process died is rewritten in full. ``params`` / ``buffers`` choose the tensors
    (see :meth:`Layout.from_model`). Never holds more than one snapshot in memory.
    """

    def __init__(self, path, model: nn.Module, n_snapshots: int, *, every: int = 1, unit: str = "epoch",
                 params: Iterable[str] | Callable[[str], bool] | None = None, buffers: bool = True,
                 verify: bool = False):
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit: expected 'epoch' or 'step', got {unit!r}")
        for name, v in (("n_snapshots", n_snapshots), ("every", every)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        self.layout = Layout.from_model(model, params=params, buffers=buffers)
        self.unit, self.every, self.verify = unit, int(every), bool(verify)
        self.path = Path(path)
        self._store = GradientStore.create_or_open(
            self.path, n_rows=int(n_snapshots), d=self.layout.n, spec=_spec(unit, self.every),
            fingerprint=self.layout.digest(), dtype="float32", chunk_rows=1,
            metadata={"layout": self.layout.to_json()})
        self._done = set(self._store.completed_chunks())

    @property
    def n_snapshots(self) -> int:
        return self._store.n_rows

    def completed(self) -> list[int]:
        """Indices of the complete snapshots."""
        return sorted(self._done)

    def record(self, model: nn.Module, index: int) -> bool:
        """Write snapshot ``index`` from ``model``; returns False if it was already complete (skipped)."""
        if not 0 <= index < self.n_snapshots:
            raise IndexError(f"index: snapshot {index} out of range for capacity {self.n_snapshots}")
        if index in self._done:
            if self.verify:
                have = self._store.array((index, index + 1))[0]
                new = self.layout.flatten(model).numpy()
                if not np.array_equal(np.asarray(have), new):
                    raise ValueError(f"model: snapshot {index} on disk differs from the model's weights now; "
                                     "the resumed run does not replay the recorded one")
            return False
        vec = self.layout.flatten(model)
        if not torch.isfinite(vec).all():
            raise ValueError(f"model: non-finite weights at snapshot {index}; refusing to record them")
        self._store.write_chunk(index, vec.reshape(1, -1))
        self._done.add(index)
        return True

    def _tick(self, model: nn.Module, count: int) -> bool:
        if (count + 1) % self.every:
            return False
        k = (count + 1) // self.every - 1
        if k >= self.n_snapshots:
            return False
        return self.record(model, k)

    def on_epoch_end(self, model: nn.Module, epoch: int) -> bool:
        """Call after epoch ``epoch`` (0-based) finished; records when ``(epoch + 1) % every == 0``."""
        if self.unit != "epoch":
            raise ValueError("unit: this recorder counts steps; call on_step")
        return self._tick(model, int(epoch))

    def on_step(self, model: nn.Module, step: int) -> bool:
        """Call after optimiser step ``step`` (0-based); records when ``(step + 1) % every == 0``."""
        if self.unit != "step":
            raise ValueError("unit: this recorder counts epochs; call on_epoch_end")
        return self._tick(model, int(step))

    def trajectory(self) -> Trajectory:
        """A read-only :class:`Trajectory` of the snapshots complete so far."""
        return Trajectory.open(self.path)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
