"""Checking and repairing a store on disk: what ``gradsketch store verify`` and ``store repair`` run.

:func:`check_store` reads every file of a store and classifies the damage: store-level (the manifest, the
data file or chunks/ unusable: no row can be vouched for) or chunk-level (markers that are unreadable, bound
to another store or chunk, or whose bytes fail their sha256). :func:`repair_store` makes chunk-level damage
cheap to recover: it removes the markers of the failing chunks, so the next fit (the same command as before)
recomputes exactly those chunks. A lost chunks/ directory or data file is recreated empty (every chunk is then
recomputed); a damaged manifest cannot be repaired (the store's identity is lost): delete the store and refit.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from . import _io
from .gradient_store import CHUNKS, DATA, DTYPES, CorruptChunkError, GradientStore, StoreFileError

__all__ = ["StoreReport", "check_store", "repair_store"]


@dataclasses.dataclass
class StoreReport:
    """Result of :func:`check_store` / :func:`repair_store`.

    Attributes:
        path: the store directory.
        store_error: why the store-level files are unusable (``None``: they are fine).
        n_chunks: chunks of the store (0 when the manifest is unusable).
        complete: chunks whose marker vouches for their bytes.
        missing: chunks not written yet (a fit computes them).
        corrupt: ``{chunk: reason}`` for chunks whose marker or bytes fail.
        actions: what :func:`repair_store` did (empty for :func:`check_store`).
    """

    path: Path
    store_error: str | None = None
    n_chunks: int = 0
    complete: list[int] = dataclasses.field(default_factory=list)
    missing: list[int] = dataclasses.field(default_factory=list)
    corrupt: dict[int, str] = dataclasses.field(default_factory=dict)
    actions: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage found (missing chunks are not damage: a fit computes them)."""
        return self.store_error is None and not self.corrupt

    def lines(self) -> list[str]:
        """A human-readable summary, one finding per line."""
        out = [f"store {self.path}"]
        if self.store_error is not None:
            out.append(f"store-level damage: {self.store_error}")
        else:
            out.append(f"{self.n_chunks} chunks: {len(self.complete)} complete and verified, {len(self.missing)} "
                       f"missing, {len(self.corrupt)} corrupt")
            out += [f"chunk {c}: {why}" for c, why in sorted(self.corrupt.items())]
        out += self.actions
        return out


def check_store(path: str | Path) -> StoreReport:
    """Verify every file of the store at ``path``; never modifies anything.

    >>> import tempfile, numpy as np
    >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 4, 2, {"kind": "x"}, "fp", chunk_rows=2)
    >>> _ = st.write_chunk(0, np.ones((2, 2)))
    >>> r = check_store(st.path)
    >>> r.ok, r.complete, r.missing
    (True, [0], [1])
    """
    path = Path(path)
    report = StoreReport(path)
    if not os.path.lexists(path / "manifest.json"):
        inner = sorted(str(p.parent) for p in path.glob("*/manifest.json")) if path.is_dir() else []
        hint = f"; the stores inside it are {', '.join(inner)}" if inner else ""
        raise FileNotFoundError(f"path: no gradsketch store at {str(path)!r} (manifest.json not found){hint}")
    try:
        st = GradientStore.open(path)
    except (StoreFileError, OSError) as e:
        report.store_error = str(e)
        return report
    try:
        report.n_chunks = st.n_chunks
        done = set(st.completed_chunks())
        report.missing = [i for i in range(st.n_chunks) if i not in done]
        for i in sorted(done):
            try:
                st.verify(st.chunk_range(i))
            except CorruptChunkError as e:
                report.corrupt[i] = e.reasons.get(i, str(e))
            else:
                report.complete.append(i)
    finally:
        st.close()
    return report


def repair_store(path: str | Path) -> StoreReport:
    """Make the store at ``path`` usable again at the smallest recomputation: the markers of corrupt chunks
    are removed (the next fit recomputes only those), a missing chunks/ directory or an unusable data file is
    recreated empty (every chunk is recomputed). A damaged manifest is not repairable: ``store_error`` stays
    set and nothing is changed. Returns the report of the store after repair, with ``actions`` filled.

    >>> import tempfile, numpy as np
    >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 4, 2, {"kind": "x"}, "fp", chunk_rows=2)
    >>> _ = st.write_chunk(1, np.ones((2, 2)))
    >>> with open(st.path / "data.npy", "r+b") as f:  # damage one byte of chunk 1
    ...     _ = f.seek(-1, 2); _ = f.write(b"\\x01")
    >>> repair_store(st.path).actions
    ['chunk 1: marker removed (the next fit recomputes it)']
    """
    from .fill import ChunkLock

    path = Path(path)
    before = check_store(path)
    actions: list[str] = []
    if before.store_error is not None:
        try:
            header = GradientStore._read_header(path)
        except (StoreFileError, OSError):
            after = dataclasses.replace(before, actions=[
                f"not repairable: the manifest is damaged, so what the rows are is unknown; delete {path} and rerun "
                "the fit (it recreates the store)"])
            return after
        with ChunkLock(path):
            chunks = path / CHUNKS
            if not os.path.isdir(chunks) or os.path.islink(chunks):
                if os.path.lexists(chunks):
                    os.unlink(chunks)
                chunks.mkdir()
                _io.fsync_dir(path)
                actions.append("chunks/: recreated empty (the next fit recomputes every chunk)")
            try:
                GradientStore.open(path).close()
            except StoreFileError:  # the data file: recreate it, and drop every marker (no row is vouched for)
                data = path / header["data_file"]
                if os.path.lexists(data):
                    if os.path.isdir(data) and not os.path.islink(data):
                        shutil.rmtree(data)
                    else:
                        os.unlink(data)  # a symlink is removed, never its target
                tmp = path / f".{DATA}.{os.getpid()}.repair.tmp"
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[header["dtype"]],
                                               shape=(header["n_rows"], header["d"]))
                del mm
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                for name in os.listdir(chunks):
                    os.unlink(chunks / name)
                os.replace(tmp, data)
                _io.fsync_dir(path)
                _io.fsync_dir(chunks)
                actions.append(f"{header['data_file']}: recreated empty and every marker removed (the next fit "
                               "recomputes every chunk)")
        before = check_store(path)
    if before.corrupt:
        with ChunkLock(path):
            for c in sorted(before.corrupt):
                marker = path / CHUNKS / f"{c:06d}.json"
                if os.path.lexists(marker):
                    if os.path.isdir(marker) and not os.path.islink(marker):
                        shutil.rmtree(marker)
                    else:
                        os.unlink(marker)
                actions.append(f"chunk {c}: marker removed (the next fit recomputes it)")
            _io.fsync_dir(path / CHUNKS)
    after = check_store(path)
    after.actions = actions
    return after
