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
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
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


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` and return its descriptor only if it is a regular file reached without following a
    symlink in its last component: ``O_NOFOLLOW`` (a symlink fails to open), ``O_NONBLOCK`` (a FIFO or
    device in its place cannot block the open), then ``fstat`` on the open descriptor (so the file checked
    is the file used). Raises OSError naming the path and what it found."""
    import stat

    extra = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | extra)
    except OSError as e:
        if os.path.islink(path):
            raise OSError(e.errno, f"{path}: is a symbolic link; store files must be regular files "
                                   "inside the store directory") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) \
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file"
            raise OSError(0, f"{path}: is {kind}, expected a regular file")
        if getattr(os, "O_NONBLOCK", 0):  # back to blocking I/O for a regular file
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path, max_bytes: int = 1 << 24) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`); OSError when larger than
    ``max_bytes`` (a store's JSON files are small: a huge one is not ours)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise OSError(0, f"{path}: {size} bytes, expected at most {max_bytes}")
        parts, left = [], size + 1
        while left > 0:
            b = os.read(fd, left)
            if not b:
                break
            parts.append(b)
            left -= len(b)
        return b"".join(parts)
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this host); True when we cannot tell."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True
