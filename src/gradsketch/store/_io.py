"""Durable file primitives for the store: fsync'd writes, atomic JSON files, positional writes."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename/creation inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dumps(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def write_tmp(directory: Path, stem: str, data: bytes) -> Path:
    """Write ``data`` to a fresh hidden temporary file in ``directory`` and fsync it; return its path."""
    tmp = directory / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Atomically make ``path`` hold ``data``: temp file + fsync + rename + fsync of the directory.

    With ``exclusive=True`` the final step is a hard link, which fails with FileExistsError when
    ``path`` already exists (so two writers cannot both claim it); filesystems without hard links
    fall back to ``os.replace``.
    """
    directory = path.parent
    tmp = write_tmp(directory, path.name, data)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            os.unlink(tmp)
    fsync_dir(directory)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at byte ``offset`` of the open file ``fd`` (no shared file position)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    if hasattr(os, "pwrite"):
        while data:
            n = os.pwrite(fd, data, offset)
            data = data[n:]
            offset += n
    else:  # pragma: no cover - platforms without pwrite (Windows)
        os.lseek(fd, offset, os.SEEK_SET)
        while data:
            n = os.write(fd, data)
            data = data[n:]
