"""A resumable on-disk record of an Arnoldi run: the Krylov basis rows, the Hessenberg matrix and the state
needed to continue exactly where a killed run stopped.

Layout of the directory: ``basis.bin`` (rows of the basis, raw, in the basis dtype, row ``i`` at byte
``i · n · itemsize``), ``H.bin`` (the ``[m+1, m]`` Hessenberg matrix of the last save, raw float64) and
``manifest.json`` (what the run is and how far it got). Rows are written and synced before the manifest is
replaced atomically, so the manifest never claims rows that are not on disk; rows past ``steps`` are
ignored. Everything read back is treated as untrusted: sizes, dtypes, finiteness and the run's identity
(dimension, dtypes, start vector) are checked against the call that resumes it.
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
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _raw(t: Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: keep the bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _from_raw(buf: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(buf, dtype=np.int16).copy()).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(buf, dtype=np_dtype).copy()).reshape(shape)


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
    def load(self) -> dict[str, Any] | None:
        """The saved state ``{steps, rows [steps+1, n], H [m+1, m], anorm, restarts, generator}`` truncated or
        padded to this run's ``m``, or ``None`` if the directory holds no checkpoint yet."""
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
        use = min(steps, self.m)  # Arnoldi's prefix property: the first m steps of a longer run are this run
        with bpath.open("rb") as f:
            rows = _from_raw(f.read((use + 1) * row_bytes), self.basis, (use + 1, self.n))
        Hs = _from_raw(hpath.read_bytes(), torch.float64, (m_saved + 1, m_saved))
        if not (torch.isfinite(rows.float()).all() and torch.isfinite(Hs).all()):
            raise ValueError(f"{where}: the saved basis or Hessenberg matrix holds NaN or Inf")
        H = torch.zeros(self.m + 1, self.m, dtype=torch.float64)
        H[: use + 1, :use] = Hs[: use + 1, :use]
        gen = meta.get("generator")
        if use == steps and not (isinstance(gen, list) and all(isinstance(b, int) and 0 <= b < 256 for b in gen)):
            raise ValueError(f"{where}: manifest field 'generator': expected a list of bytes")
        return {"steps": use, "rows": rows, "H": H, "anorm": float(anorm), "restarts": restarts,
                "generator": torch.tensor(gen, dtype=torch.uint8) if use == steps else None}

    # -- writing ----------------------------------------------------------------------------------------
    def save(self, Qr: Tensor, H: Tensor, steps: int, first_new_row: int, anorm: float, restarts: int,
             gen: torch.Generator) -> None:
        """Write rows ``first_new_row … steps`` of ``Qr``, then ``H``, then the manifest (atomically)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        bpath = self.dir / "basis.bin"
        mode = "r+b" if bpath.exists() else "w+b"
        with bpath.open(mode) as f:
            f.seek(first_new_row * self.n * self.itemsize)
            f.write(_raw(Qr[first_new_row: steps + 1]))
            f.flush()
            os.fsync(f.fileno())
        tmp = self.dir / "H.bin.tmp"
        tmp.write_bytes(_raw(H.to(torch.float64)))
        os.replace(tmp, self.dir / "H.bin")
        meta = {"format": FORMAT, "n": self.n, "m": self.m, "steps": steps, "work_dtype": _name(self.work),
                "basis_dtype": _name(self.basis), "anorm": anorm, "restarts": restarts,
                "generator": gen.get_state().tolist()}
        tmp = self.dir / "manifest.json.tmp"
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, self.dir / "manifest.json")
