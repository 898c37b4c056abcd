"""Derived results kept next to a store (e.g. Arnoldi eigenpairs): written atomically and durably, read back
only when intact, and optional: a damaged file is named and recomputed, an unwritable directory (read-only
filesystem, full disk) only costs the recomputation next time."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from . import _io

__all__ = ["load_cached", "save_cached"]


def load_cached(path: str | Path, key: str) -> tuple[bool, Any]:
    """``(True, value)`` if ``path`` holds a cache written by :func:`save_cached` with this ``key``, else
    ``(False, None)``. A file that cannot be read (truncated, not a regular file, not a torch file) gives a
    RuntimeWarning naming it and ``(False, None)``, so the caller recomputes and overwrites it.

    >>> import tempfile, torch
    >>> p = Path(tempfile.mkdtemp()) / "c.pt"
    >>> save_cached(p, "k1", torch.ones(2))
    True
    >>> load_cached(p, "k1")
    (True, tensor([1., 1.]))
    >>> load_cached(p, "k2")
    (False, None)
    """
    import torch

    path = Path(path)
    if not os.path.lexists(path):
        return False, None
    try:
        fd = _io.open_regular(path)
        with os.fdopen(fd, "rb") as f:
            blob = torch.load(f, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError (zip reader), EOFError, UnpicklingError...
        why = " ".join(str(e).split())[:200]
        warnings.warn(f"{path}: unreadable cache file ({type(e).__name__}: {why}); recomputing it and replacing "
                      "the file", RuntimeWarning, stacklevel=2)
        return False, None
    if not isinstance(blob, dict) or blob.get("config") != key or "value" not in blob:
        return False, None
    return True, blob["value"]


def save_cached(path: str | Path, key: str, value: Any) -> bool:
    """Write ``{"config": key, "value": value}`` to ``path`` atomically (temporary file, fsync, rename, fsync
    of the directory); ``True`` on success. When the directory cannot be written (read-only filesystem, no
    permission, full disk) a RuntimeWarning says so and ``False`` is returned: the cache is optional."""
    import torch

    path = Path(path)
    try:
        buf = io.BytesIO()
        torch.save({"config": key, "value": value}, buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        _io.atomic_write(path, buf.getvalue())
    except OSError as e:
        warnings.warn(f"{path}: could not write the cache ({e.strerror or e}); continuing without it (the next "
                      "run recomputes it)", RuntimeWarning, stacklevel=2)
        return False
    return True
