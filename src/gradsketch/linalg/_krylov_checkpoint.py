"""A resumable on-disk record of an Arnoldi run: the Krylov basis rows, the Hessenberg matrix and the state
needed to continue exactly where a killed run stopped.

Layout of the directory: ``basis.bin`` (rows of the basis, raw, in the basis dtype, row ``i`` at byte
``i · n · itemsize``), ``H.bin`` (the ``[m+1, m]`` Hessenberg matrix of the last save, raw float64) and
``manifest.json`` (what the run is and how far it got). Rows are written and synced before the manifest is
replaced atomically, so the manifest never claims rows that are not on disk; rows past ``steps`` are
ignored. Everything read back is treated as untrusted: sizes, dtypes, finiteness and the run's identity
(dimension, dtypes, start vector) are checked against the call that resumes it.

Rows move between the file and the run's preallocated basis a block of about ``BLOCK_BYTES`` at a time
(``readinto`` straight into the basis's memory, and writes from it), so neither saving nor resuming holds a
second copy of the basis: a resumed process needs the basis plus one block, like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

FORMAT = "gradsketch.arnoldi-checkpoint/1"
BLOCK_BYTES = 1 << 24  # rows are read and written about this many bytes at a time
_CHECK_ELEMS = 1 << 21  # finiteness is checked this many entries at a time (isfinite's temporaries ~ 3 bytes each)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _f64_bytes(t: Tensor) -> bytes:
    return t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()


def _f64_from_bytes(buf: bytes, shape: tuple[int, ...]) -> Tensor:
    return torch.from_numpy(np.frombuffer(buf, dtype=np.float64).copy()).reshape(shape)


def _blocks(n_rows: int, row_bytes: int):
    """``(start, stop)`` row ranges of about ``BLOCK_BYTES`` each (at least one row)."""
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    for i in range(0, n_rows, step):
        yield i, min(n_rows, i + step)


def _all_finite(t: Tensor) -> bool:
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + _CHECK_ELEMS]).all()) for i in range(0, flat.numel(), _CHECK_ELEMS))


def _host_bytes(t: Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a (writable) uint8 array sharing its memory: no copy."""
    return t.view(-1).view(torch.uint8).numpy()


class ArnoldiCheckpoint:
    """The checkpoint directory of one Arnoldi run (see the module docstring)."""

    def __init__(self, path: Any, n: int, m: int, work: torch.dtype, basis: torch.dtype) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint: expected a directory path (str or os.PathLike), got {type(path).__name__}")
        self.dir = Path(path)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"checkpoint: expected a directory, got the file {str(self.dir)!r}")
        self.n, self.m, self.work, self.basis = n, m, work, basis
        self.itemsize = torch.empty((), dtype=basis).element_size()

    # -- reading ----------------------------------------------------------------------------------------
    def load(self, into: Tensor) -> dict[str, Any] | None:
        """Read the saved rows ``0 … steps`` into ``into[: steps + 1]`` (the run's basis ``[m+1, n]``, any
        device) and return the rest of the state ``{steps, H [m+1, m], anorm, restarts, generator}``, truncated
        or padded to this run's ``m``; ``None`` (``into`` untouched) if the directory holds no checkpoint yet.
        The rows are read and checked for finiteness a block at a time; on an error ``into`` may hold part
        of them."""
        mf = self.dir / "manifest.json"
        if not mf.exists():
            return None
        where = f"checkpoint {str(self.dir)!r}"
        try:
            meta = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: manifest.json is not readable JSON ({e}); delete the directory to "
                             "start afresh") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{where}: expected a manifest of format {FORMAT!r}, got "
                             f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}")
        want = {"n": self.n, "work_dtype": _name(self.work), "basis_dtype": _name(self.basis)}
        for key, value in want.items():
            if meta.get(key) != value:
                raise ValueError(f"{where}: it was written by a run with {key} = {meta.get(key)!r}, this run has "
                                 f"{key} = {value!r}; use another directory or the same settings")
        steps, m_saved, restarts = meta.get("steps"), meta.get("m"), meta.get("restarts")
        for key, value in (("steps", steps), ("m", m_saved), ("restarts", restarts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: manifest field {key!r}: expected a non-negative integer, got {value!r}")
        if not 1 <= steps <= m_saved:
            raise ValueError(f"{where}: manifest claims {steps} steps of a run of {m_saved}")
        anorm = meta.get("anorm")
        if isinstance(anorm, bool) or not isinstance(anorm, (int, float)) or not np.isfinite(anorm) or anorm < 0:
            raise ValueError(f"{where}: manifest field 'anorm': expected a finite number >= 0, got {anorm!r}")
        row_bytes = self.n * self.itemsize
        bpath, hpath = self.dir / "basis.bin", self.dir / "H.bin"
        have = bpath.stat().st_size if bpath.exists() else -1
        if have < (steps + 1) * row_bytes:
            raise ValueError(f"{where}: basis.bin holds {max(have, 0)} bytes, the manifest needs "
                             f"{(steps + 1) * row_bytes} ({steps + 1} rows of {self.n} {_name(self.basis)})")
        h_bytes = (m_saved + 1) * m_saved * 8
        if not hpath.exists() or hpath.stat().st_size != h_bytes:
            raise ValueError(f"{where}: H.bin: expected {h_bytes} bytes ([{m_saved + 1}, {m_saved}] float64), got "
                             f"{hpath.stat().st_size if hpath.exists() else 'no file'}")
        if (into.dtype != self.basis or into.ndim != 2 or into.shape[1] != self.n
                or into.shape[0] < self.m + 1):
            raise ValueError(f"into: expected a basis [{self.m + 1}, {self.n}] of {_name(self.basis)}, got "
                             f"{tuple(into.shape)} of {_name(into.dtype)}")
        use = min(steps, self.m)  # Arnoldi's prefix property: the first m steps of a longer run are this run
        Hs = _f64_from_bytes(hpath.read_bytes(), (m_saved + 1, m_saved))
        if not torch.isfinite(Hs).all():
            raise ValueError(f"{where}: the saved Hessenberg matrix holds NaN or Inf")
        direct = into.device.type == "cpu" and into.is_contiguous()
        with bpath.open("rb", buffering=0) as f:
            for i, j in _blocks(use + 1, row_bytes):
                block = into[i:j] if direct else torch.empty(j - i, self.n, dtype=self.basis)
                _read_exactly(f, _host_bytes(block), where)
                if not _all_finite(block):
                    raise ValueError(f"{where}: the saved basis holds NaN or Inf (rows {i} to {j - 1})")
                if not direct:
                    into[i:j].copy_(block)
        H = torch.zeros(self.m + 1, self.m, dtype=torch.float64)
        H[: use + 1, :use] = Hs[: use + 1, :use]
        gen = meta.get("generator")
        if use == steps and not (isinstance(gen, list) and all(isinstance(b, int) and 0 <= b < 256 for b in gen)):
            raise ValueError(f"{where}: manifest field 'generator': expected a list of bytes")
        return {"steps": use, "H": H, "anorm": float(anorm), "restarts": restarts,
                "generator": torch.tensor(gen, dtype=torch.uint8) if use == steps else None}

    # -- writing ----------------------------------------------------------------------------------------
    def save(self, Qr: Tensor, H: Tensor, steps: int, first_new_row: int, anorm: float, restarts: int,
             gen: torch.Generator) -> None:
        """Write rows ``first_new_row … steps`` of ``Qr``, then ``H``, then the manifest (atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        bpath = self.dir / "basis.bin"
        mode = "r+b" if bpath.exists() else "w+b"
        rows = Qr[first_new_row: steps + 1].detach()
        with bpath.open(mode) as f:
            f.seek(first_new_row * self.n * self.itemsize)
            for i, j in _blocks(rows.shape[0], self.n * self.itemsize):  # no whole copy of the new rows
                f.write(_host_bytes(rows[i:j].to("cpu").contiguous()))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.dir / "H.bin.tmp"
        tmp.write_bytes(_f64_bytes(H))
        os.replace(tmp, self.dir / "H.bin")
        meta = {"format": FORMAT, "n": self.n, "m": self.m, "steps": steps, "work_dtype": _name(self.work),
                "basis_dtype": _name(self.basis), "anorm": anorm, "restarts": restarts,
                "generator": gen.get_state().tolist()}
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, self.dir / "manifest.json")


def _read_exactly(f: Any, buf: np.ndarray, where: str) -> None:
    """Fill ``buf`` from the unbuffered file ``f`` (``readinto`` may return short counts)."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise ValueError(f"{where}: basis.bin ended while reading (it changed during the read?)")
        got += k
