"""Featurisation: per-example feature rows φ(z) = P g(z) streamed to memory or to a resumable GradientStore.

``P`` is any "sketch-like" object accepted by :meth:`gradsketch.Task.sketch_grads` (a BlockSketch, a plain
sketch with ``n = task.n_params``, a FactoredSketch, the identity or a projection onto Arnoldi eigenvectors).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..model._batch import SplitBatch, data_len
from ..sketch.base import SketchOperator

_END = object()


class StoreMismatchError(ValueError):
    """An existing feature store holds other rows than this fit needs; the message names what differs."""


class DataMismatchError(ValueError):
    """Data that the task cannot evaluate (e.g. test batches not structured like the training batches)."""


class IdentitySketch(SketchOperator):
    """The identity map R^N -> R^N as a sketch operator (``n = d = N``): unsketched gradients."""

    kind = "identity"

    def __init__(self, n: int) -> None:
        self.n = self.d = int(n)
        self._init_operator(self.n, self.d, "cpu")

    @property
    def spec(self) -> dict:
        return {"kind": "identity", "n": self.n}

    def __call__(self, x: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return x if out_dtype is None else x.to(out_dtype)

    def _adjoint_rows(self, y: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        return y if out_dtype is None else y.to(out_dtype)

    def to(self, device: Any) -> IdentitySketch:
        return self


class ProjectionSketch(SketchOperator):
    """x ↦ Vᵀx for a fixed basis ``V [N, k]`` (e.g. Arnoldi eigenvectors): ``p_i(z) = ⟨v_i, g(z)⟩``.
    ``append_identity``: x ↦ [Vᵀx, x] (``d = k + N``), the projections followed by the gradient itself (Arnoldi
    influence's tail on a small model)."""

    def __init__(self, V: Tensor, tag: str = "projection", append_identity: bool = False) -> None:
        self.V = V
        self.append_identity = bool(append_identity)
        self.k = int(V.shape[1])
        self.n, self.d = int(V.shape[0]), self.k + (int(V.shape[0]) if self.append_identity else 0)
        self.kind = tag
        h = hashlib.sha256(V.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()).hexdigest()
        self._spec = {"kind": tag, "n": self.n, "d": self.d, "sha256": h[:32]}
        if self.append_identity:
            self._spec["identity"] = True
        self._init_operator(self.n, self.d, V.device)

    @property
    def spec(self) -> dict:
        return dict(self._spec)

    def __call__(self, x: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        p = x @ self.V.to(x.dtype)
        return torch.cat([p, x], dim=-1) if self.append_identity else p

    def _adjoint_rows(self, y: Tensor, out_dtype: Any = None, nan_policy: Any = None) -> Tensor:
        x = y[..., :self.k] @ self.V.to(y.dtype).T
        return x + y[..., self.k:] if self.append_identity else x

    def to(self, device: Any) -> ProjectionSketch:
        self.V = self.V.to(device)
        self.device = torch.device(device)
        return self


def sketch_spec(sketch: Any) -> dict:
    spec = getattr(sketch, "spec", None)
    if isinstance(spec, dict):
        return spec
    return {"kind": type(sketch).__name__, "n": int(sketch.n), "d": int(sketch.d)}


def count_examples(data: Iterable, name: str) -> int:
    """Number of examples in ``data`` (one pass over the batches, no computation)."""
    n = 0
    for batch in data:
        n += SplitBatch(batch).size
    if n == 0:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")
    return n


def _rows(task: Any, batch: Any, sketch: Any, mode: str, nan_policy: str, offset: int, name: str,
          skipped: list[int] | None = None) -> Tensor:
    """Sketched rows of one batch; non-finite examples raise naming their index in the whole dataset (or, with
    ``nan_policy="skip"``, their rows are zeroed and their dataset indices appended to ``skipped``)."""
    rows = task.sketch_grads([batch], sketch, mode=mode, progress=False, nan_policy="skip")
    bad = [offset + i for i in task.skipped_indices_]
    if skipped is not None:
        skipped.extend(bad)
    if bad and nan_policy == "raise":
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise FloatingPointError(
            f"{name}: non-finite loss or gradient for example index(es) {shown}; everything computed "
            "before this batch is kept (in the store, when one is used). Fix the data/model, or pass "
            "nan_policy='skip' to the Attributor to zero these rows")
    return rows.detach()


def featurise_memory(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                     name: str, desc: str, skipped: list[int] | None = None) -> Tensor:
    """``[n, d]`` feature rows in the task's dtype (indices of skipped examples appended to ``skipped``)."""
    from tqdm.auto import tqdm

    parts, offset = [], 0
    for batch in tqdm(data, desc=desc, total=data_len(data), disable=not progress, leave=False):
        r = _rows(task, batch, sketch, mode, nan_policy, offset, name, skipped)
        parts.append(r)
        offset += r.shape[0]
    if not parts:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")
    return torch.cat(parts, 0)


def _first_batch_error(name: str, e: BaseException) -> DataMismatchError:
    return DataMismatchError(
        f"{name}: the first test batch failed in the model's forward/loss ({type(e).__name__}: {e}); test "
        "batches must have the same structure as the training batches (the same tuple/dict layout, input "
        "feature shapes and dtypes as the model's parameters, labels in the range the loss accepts)")


def iter_feature_chunks(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                        name: str, desc: str, rows_per_chunk: int) -> Iterator[tuple[int, Tensor]]:
    """Yields ``(row_start, [m, d])`` groups of at least ``rows_per_chunk`` rows (the last may be smaller):
    test features computed a group at a time, so memory stays O(rows_per_chunk · d).

    The first batch is checked once (no per-batch cost): if the task cannot evaluate it (a batch not
    structured like the training batches: other feature width, dict instead of tuple, float64 inputs to a
    float32 model, labels out of range), :class:`DataMismatchError` names ``name`` and chains the original
    exception. Non-finite gradients keep their own error (FloatingPointError naming the example)."""
    from tqdm.auto import tqdm

    it = iter(tqdm(data, desc=desc, total=data_len(data), disable=not progress, leave=False))
    first = next(it, _END)
    if first is _END:
        raise ValueError(f"{name}: expected at least one example, got an empty dataset")
    try:
        SplitBatch(first)
    except (TypeError, ValueError) as e:
        raise DataMismatchError(f"{name}: the first test batch is not a batch of examples ({e}); test "
                                "batches must have the same structure as the training batches") from e
    try:
        r = _rows(task, first, sketch, mode, nan_policy, 0, name)
    except (FloatingPointError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:
        raise _first_batch_error(name, e) from e
    buf, start, offset = [r], 0, r.shape[0]
    if offset >= rows_per_chunk:
        yield start, torch.cat(buf, 0)
        buf, start = [], offset
    for batch in it:
        r = _rows(task, batch, sketch, mode, nan_policy, offset, name)
        buf.append(r)
        offset += r.shape[0]
        if offset - start >= rows_per_chunk:
            yield start, torch.cat(buf, 0)
            buf, start = [], offset
    if buf:
        yield start, torch.cat(buf, 0)


# ------------------------------------------------------------------------------------------- feature stores
FEATURE_KINDS = {
    "loss-gradient": "per-example gradients of the loss (used by grad-dot, grad-cos, tracin, influence, arnoldi "
                     "with a sketch, and trak without margin_fn)",
    "output-gradient": "per-example gradients of TRAK's margin_fn (used by trak with margin_fn)",
    "arnoldi-projection": "projections of exact loss gradients on Arnoldi eigenvectors (used by arnoldi with "
                          "sketch=None)",
    "arnoldi-projection+gradient": "projections of exact loss gradients on Arnoldi eigenvectors followed by the "
                                   "gradients (used by arnoldi with sketch=None and the tail on a small model)",
}


def _describe_kind(kind: Any) -> str:
    return f"{kind!r}: {FEATURE_KINDS[kind]}" if kind in FEATURE_KINDS else repr(kind)


def row_option_mismatches(recorded: Any, wanted: dict | None) -> list[str]:
    """The row-relevant options (``Attributor.row_options()``) recorded in a store's manifest (``extra``)
    against this fit's: one message per option that differs, naming both values and the fix. Options the
    store did not record (older stores) are not compared.

    >>> row_option_mismatches({"nan_policy": "skip"}, {"nan_policy": "raise"})  # doctest: +ELLIPSIS
    ["option nan_policy: the rows were computed with nan_policy='skip', this fit uses nan_policy='raise' ..."]
    """
    if not isinstance(recorded, dict) or not wanted:
        return []
    out = []
    for k in sorted(set(recorded) & set(wanted)):
        if recorded[k] != wanted[k]:
            out.append(f"option {k}: the rows were computed with {k}={recorded[k]!r}, this fit uses {k}="
                       f"{wanted[k]!r} (to reuse these rows pass the {k} they were computed with; otherwise use "
                       "another store path)")
    return out


def _store_mismatches(path: Any, n_rows: int, d: int, spec: dict, fingerprint: str, dtype: str,
                      chunk_rows: int | None, metadata: dict | None, row_options: dict | None = None) -> list[str]:
    """The store's own identity check (:meth:`GradientStore.differences`), phrased for attribution: what the
    rows on disk at ``path`` are, against what this fit needs (empty: it matches); then the row-relevant
    options recorded in the manifest's ``extra`` (:func:`row_option_mismatches`)."""
    from ..store import GradientStore

    st = GradientStore.open(path)
    try:
        diff = st.differences(n_rows=n_rows, d=d, spec=spec, fingerprint=fingerprint, dtype=dtype,
                              chunk_rows=chunk_rows, metadata=metadata)
        recorded = st.extra.get("attribution", {}).get("row_options")
    finally:
        st.close()
    out = row_option_mismatches(recorded, row_options)
    if "spec" in diff:
        want, found = diff["spec"]
        if want.get("features") != found.get("features"):
            out.append(f"rows: the store holds {_describe_kind(found.get('features', '<unrecorded>'))}, "
                       f"this fit needs {_describe_kind(want.get('features'))}")
        if want.get("sketch") != found.get("sketch"):
            a, b = want.get("sketch"), found.get("sketch")
            if isinstance(a, dict) and isinstance(b, dict):
                parts = [f"{k}: expected {a.get(k, '<absent>')!r}, found {b.get(k, '<absent>')!r}"
                         for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
                out.append(f"sketch spec differs ({'; '.join(parts)})")
            else:
                out.append(f"sketch spec differs (expected {a!r}, found {b!r})")
        if want.get("mode") != found.get("mode"):
            out.append(f"mode: the rows were computed with mode={found.get('mode', '<unrecorded>')!r}, this "
                       f"fit uses mode={want.get('mode')!r}")
        for k in sorted((set(want) | set(found)) - {"features", "sketch", "mode"}):
            if want.get(k) != found.get(k):
                out.append(f"spec {k}: expected {want.get(k, '<absent>')!r}, found {found.get(k, '<absent>')!r}")
    if "fingerprint" in diff:
        want_fp, found_fp = diff["fingerprint"]
        out.append(f"model fingerprint: the rows were computed with other model parameters (expected "
                   f"{want_fp[:19]}..., found {found_fp[:19]}...): the model or checkpoint changed")
    if "n_rows" in diff:
        out.append(f"dataset size: the store has {diff['n_rows'][1]} rows, train_data has {n_rows} examples")
    if "d" in diff:
        out.append(f"feature dimension d: expected {d}, found {diff['d'][1]}")
    if "dtype" in diff:
        out.append(f"store_dtype: expected {diff['dtype'][0]!r}, found {diff['dtype'][1]!r}")
    if "chunk_rows" in diff:
        out.append(f"chunk_rows: expected {chunk_rows}, found {diff['chunk_rows'][1]}")
    if "metadata" in diff:
        want_meta, found_meta = diff["metadata"]
        old = " (a store written by an older gradsketch that recorded the method)" \
            if "method" in found_meta else ""
        out.append(f"metadata: expected {want_meta!r}, found {found_meta!r}{old}")
    return out


def featurise_store(task: Any, data: Iterable, sketch: Any, mode: str, nan_policy: str, progress: bool,
                    path: Any, spec: dict, fingerprint: str, dtype: str, chunk_rows: int | None,
                    metadata: dict | None, name: str, desc: str, rank: int | None = None,
                    world_size: int | None = None, extra: dict | None = None, on_data_change: str = "raise") -> Any:
    """Fill a :class:`GradientStore` at ``path`` with the feature rows of ``data`` (resumable, multi-writer).

    The data are iterated once in order; a batch is differentiated only if it overlaps a chunk that is
    still missing, and a chunk is written as soon as all its rows are computed, so a process killed at any
    point loses at most the chunks it had not finished. With ``rank``/``world_size`` only the rows of
    ``store.row_range_for_rank(rank, world_size)`` are computed (batches before that share are skipped
    without any computation, iteration stops after it), and the store may be returned incomplete.

    Several processes may featurise one store at once (disjoint ranks or not): the store's fill loop
    (:func:`gradsketch.store.fill.fill_stream`) re-checks completion before each batch and, under its file
    lock, before each write; a chunk that another writer completed meanwhile is treated as done and never
    overwritten. A store on disk that holds other rows
    (another feature kind, sketch spec, mode, model fingerprint, row count, dtype) is refused with
    :class:`StoreMismatchError` naming what differs. ``extra`` is written into a new store's manifest
    (``{"attribution": {"method", "options", "row_options"}}``); a reused store's recorded ``row_options``
    must equal this fit's. Completed chunks whose examples changed since they were written (per-chunk data
    fingerprints) raise :class:`gradsketch.store.DataChangedError` naming them, or are recomputed with
    ``on_data_change="refeaturise"``; skipped examples are recorded in the chunk markers
    (:meth:`GradientStore.skipped_rows`).
    """
    from ..store import GradientStore
    from ..store.fill import fill_stream

    n_rows = count_examples(data, name)
    d = int(sketch.d)
    path = Path(path)
    rows = (extra or {}).get("attribution", {}).get("row_options")
    if (path / "manifest.json").is_file():
        diffs = _store_mismatches(path, n_rows, d, spec, fingerprint, dtype, chunk_rows, metadata, rows)
        if diffs:
            raise StoreMismatchError(
                f"store: the feature store at {str(path)!r} holds other rows than this fit needs and cannot be "
                f"reused: {'; '.join(diffs)}. Methods share a store only when they featurise the same rows "
                "(same output function, sketch, mode, model and data); use another store path or delete this one")
    try:
        store = GradientStore.create_or_open(path, n_rows, d, spec, fingerprint, dtype=dtype,
                                             chunk_rows=chunk_rows, metadata=metadata, extra=extra)
    except ValueError as e:
        raise StoreMismatchError(f"store: the feature store at {str(path)!r} holds other rows than this fit "
                                 f"needs and cannot be reused (use another store path or delete it): {e}") from e
    late = row_option_mismatches(store.extra.get("attribution", {}).get("row_options"), rows)
    if late:  # another process created the store between our check and create_or_open
        store.close()
        raise StoreMismatchError(f"store: the feature store at {str(path)!r} holds other rows than this fit needs "
                                 f"and cannot be reused: {'; '.join(late)}")
    if store.completed_chunks():  # reopened: never build on corrupt rows (CorruptChunkError names them)
        store.verify()
    if rank is None:
        row_range = (0, n_rows)
    else:
        if world_size is None:
            raise ValueError(f"world_size: expected an integer >= 1 with rank={rank!r}, got None")
        row_range = store.row_range_for_rank(rank, world_size)

    def rows_fn(split: SplitBatch, lo: int, hi: int, row0: int) -> Tensor:
        return _rows(task, split.slice(lo, hi).rebuild(), sketch, mode, nan_policy, row0, name, skipped)

    skipped: list[int] = []
    fill_stream(store, (SplitBatch(batch) for batch in data), lambda sp: sp.size, rows_fn, row_range=row_range,
                progress=progress, desc=desc, name=name, on_data_change=on_data_change, skipped=skipped)
    return store
