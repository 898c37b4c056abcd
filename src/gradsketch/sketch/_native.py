"""Optional native CPU kernels (``_native.c``): a cache-blocked fast Walsh–Hadamard transform and the
CountSketch scatter.

The C file is compiled on first use with the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native``)
into a per-user cache (``$GRADSKETCH_CACHE`` or ``~/.cache/gradsketch``) keyed by the source, the
compiler and the CPU, and loaded with :mod:`ctypes` (no Python headers, no torch headers: compiling takes
well under a second). A cached library is loaded only when nobody but the user (or root) could have
written or swapped it: every directory on its path, the directory itself and the file are checked, the
file is opened without following links and checked through its descriptor, and that descriptor is what is
loaded (/proc/self/fd). Otherwise a warning names the path and the reason, and the kernels are built in a
fresh private directory (see :func:`library`). Calls release the GIL, so rows are split across
``torch.get_num_threads()`` Python threads. On load the kernels are checked against the pure-torch
transforms on small inputs.

Everything here is optional: without a compiler, with ``GRADSKETCH_NATIVE=0``, or for tensors that are
not contiguous float32/float64 CPU tensors, callers fall back to the pure-torch formulation, which
computes the same linear map.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("_native.c")
_L = 1 << 12  # block length of the kernel's first phase (GS_L_LOG in _native.c)
_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-fno-math-errno"]
#: below this many elements a call is not split across threads
_PARALLEL_MIN = 1 << 16

_status: dict[str, str] = {"state": "not loaded"}
_off = False  # set by disabled(): benchmarks compare against the pure-torch formulation in one process
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("GRADSKETCH_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradsketch"


class Untrusted(Exception):
    """A file or directory that code must not be loaded from; the message names it and says why."""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _check_dir_stat(path: str, st: os.stat_result, last: bool) -> None:
    """A directory on the way to the library: it, and what it holds, can only be changed by this user or
    root. Ancestors may be writable by others when the sticky bit is set (as /tmp): then only the owner
    of an entry can rename or remove it, and the next component is checked in turn. The cache directory
    itself must be this user's and writable by nobody else."""
    uid = _uid()
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"{path} is not a directory")
    if st.st_uid not in (uid, 0):
        raise Untrusted(f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid}) or root")
    if last:
        if st.st_uid != uid:
            raise Untrusted(f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})")
        if st.st_mode & 0o022:
            raise Untrusted(f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o})")
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise Untrusted(f"{path} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o}) "
                        "without the sticky bit, so its entries can be swapped")


def _open_trusted_dir(place: Path) -> int:
    """An ``O_DIRECTORY`` descriptor of ``place`` (made 0700 if missing) after checking every component from
    the root down, each opened relative to its parent's descriptor with ``O_NOFOLLOW`` (symbolic links in
    the path are resolved first, so the components checked are the ones used). Raises :class:`Untrusted`,
    or OSError when the directory cannot be made."""
    place.mkdir(mode=0o700, parents=True, exist_ok=True)
    real = os.path.realpath(place)
    parts = [p for p in real.split(os.sep) if p]
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(os.sep, flags)
    try:
        _check_dir_stat(os.sep, os.fstat(fd), last=not parts)
        path = ""
        for i, name in enumerate(parts):
            path += os.sep + name
            try:
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as e:  # ELOOP/ENOTDIR: a component turned into a symlink or a file meanwhile
                raise Untrusted(f"{path} cannot be opened as a directory without following links ({e.strerror})") \
                    from None
            os.close(fd)
            fd = nfd
            _check_dir_stat(path, os.fstat(fd), last=i == len(parts) - 1)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_trusted_lib(dir_fd: int, name: str, where: str) -> int:
    """A read-only descriptor of the library ``name`` inside the checked directory, opened without following
    a symbolic link and checked through that descriptor (a regular file of this user's that nobody else
    can write); the caller loads this very file through /proc/self/fd. Raises :class:`Untrusted`, or
    FileNotFoundError when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Untrusted(f"{where} is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        uid = _uid()
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(f"{where} is not a regular file")
        if st.st_uid != uid:
            raise Untrusted(f"{where} is owned by uid {st.st_uid}, not by this user (uid {uid})")
        if st.st_mode & 0o022:
            raise Untrusted(f"{where} is writable by its group or by others (mode {stat.S_IMODE(st.st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_dir(place: Path) -> bool:
    """``place`` exists (made if needed) and it and every directory above it are safe to load code from
    (see :func:`_open_trusted_dir`); the reason otherwise is in ``status()["cache_refused"]``."""
    try:
        os.close(_open_trusted_dir(place))
    except (OSError, Untrusted) as e:
        _status["cache_refused"] = str(e)
        return False
    return True


def _compile(cc: str, dir_fd: int, place: Path, name: str, flags: list[str]) -> bool:
    """Compile into ``place/name`` (``place`` open as ``dir_fd``): into a fresh 0600 file, then an atomic
    rename, so concurrent processes never load a half-written library."""
    try:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=place)
        os.close(fd)
    except OSError as e:  # an unwritable cache: the caller builds privately
        _status["compile_error"] = f"cannot write to {place}: {e!r}"
        return False
    try:
        r = subprocess.run([cc, *flags, str(_SRC), "-o", tmp], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            _status["compile_error"] = r.stderr[-2000:]
            return False
        os.chmod(tmp, 0o600)
        os.replace(os.path.basename(tmp), name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        _status["compile_error"] = repr(e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_fd(fd: int, where: str) -> ctypes.CDLL:
    """dlopen the file open as ``fd`` (the one that was checked, whatever its path now names), or ``where``
    where /proc/self/fd does not exist (not Linux: the check and the load are then not atomic)."""
    proc = f"/proc/self/fd/{fd}"
    lib = ctypes.CDLL(proc if os.path.exists(proc) else where)
    _declare(lib)
    return lib


def _refuse(reason: str) -> None:
    msg = (f"gradsketch: not loading the cached native kernels: {reason}; building them in a private "
           "temporary directory instead (remove the file or fix the permissions to use the cache)")
    _status["cache_refused"] = reason
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _try_place(cc: str, place: Path, name: str, flags: list[str], build: bool) -> ctypes.CDLL | None:
    """Load ``place/name``, compiling it first when missing (and ``build``). Raises :class:`Untrusted`."""
    dfd = _open_trusted_dir(place)
    try:
        where = str(Path(os.path.realpath(place)) / name)
        try:
            fd = _open_trusted_lib(dfd, name, where)
        except FileNotFoundError:
            if not build or not _compile(cc, dfd, place, name, flags):
                return None
            fd = _open_trusted_lib(dfd, name, where)
        try:
            lib = _load_fd(fd, where)
        except (OSError, AttributeError) as e:
            _status["load_error"] = repr(e)
            return None
        finally:
            os.close(fd)
        _status["path"] = where
        return lib
    finally:
        os.close(dfd)


def _build_private(cc: str, name: str, flags: list[str]) -> ctypes.CDLL | None:
    """Compile into a fresh 0700 directory of this process (mkdtemp), load it through its descriptor and
    remove the directory (the mapping stays)."""
    try:
        place = Path(tempfile.mkdtemp(prefix="gradsketch-native-"))
    except OSError as e:
        _status["compile_error"] = f"cannot make a private directory: {e!r}"
        return None
    try:
        lib = _try_place(cc, place, name, flags, build=True)
        if lib is not None:
            _status["path"] = f"{_status['path']} (private build, removed after loading)"
        return lib
    except (OSError, Untrusted) as e:
        _status["compile_error"] = f"private build in {place} refused: {e}"
        return None
    finally:
        shutil.rmtree(place, ignore_errors=True)


def _declare(lib: ctypes.CDLL) -> None:
    i64, dbl, ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    for suf in ("f32", "f64"):
        getattr(lib, f"gs_fwht_{suf}").argtypes = [ptr, i64, i64, i64, i64, dbl]
        getattr(lib, f"gs_fwht_phase1_{suf}").argtypes = [ptr, i64, i64, i64]
        getattr(lib, f"gs_fwht_phase2_{suf}").argtypes = [ptr, i64, i64, i64, dbl]
        getattr(lib, f"gs_signs_{suf}").argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64]
        getattr(lib, f"gs_signs_{suf}").restype = None
        for name in ("gs_sjlt_", "gs_sjlt_i16_", "gs_gather_", "gs_gather_i16_"):
            getattr(lib, name + suf).argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64]
            getattr(lib, name + suf).restype = None
        getattr(lib, f"gs_whtsel_{suf}").argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, dbl, ptr, i64, i64]
        getattr(lib, f"gs_whtsel_t_{suf}").argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, dbl, ptr, i64, i64]
        for name in ("gs_fwht_", "gs_fwht_phase2_", "gs_whtsel_", "gs_whtsel_t_"):
            getattr(lib, name + suf).restype = ctypes.c_int
        for name in ("gs_fwht_phase1_",):
            getattr(lib, name + suf).restype = None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or ``None`` when they are switched off or cannot be built (see :func:`status`).

    The library is loaded from the cache only when it can be vouched for: every directory from the root
    down can be changed only by this user or root (or is sticky, as /tmp), the cache directory is this
    user's and writable by nobody else, and the file, opened without following a symbolic link, is a
    regular file of this user's that nobody else can write. The checks are made on the open descriptors
    and that same file is loaded (through /proc/self/fd), so nothing can be swapped in between. Otherwise
    a warning names the path and the reason, and the kernels are compiled into a fresh private directory.
    """
    if os.environ.get("GRADSKETCH_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _status["state"] = "disabled by GRADSKETCH_NATIVE"
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        _status["state"] = "no C compiler found (set CC); using the pure-torch transforms"
        return None
    src = _SRC.read_bytes()
    lib = None
    place = _cache_dir()
    for flags in (_FLAGS + ["-march=native"], _FLAGS):
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(), _cpu_id().encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        name = f"native-{key}.so"
        try:
            lib = _try_place(cc, place, name, flags, build=True)
        except Untrusted as e:
            _refuse(str(e))
            lib = _build_private(cc, name, flags)
        except OSError as e:  # the cache cannot be made or opened (a read-only home, say): build privately
            _status["cache_error"] = f"cannot use {place}: {e!r}"
            lib = _build_private(cc, name, flags)
        if lib is not None:
            _status["flags"] = " ".join(flags)
            break
    if lib is None:
        _status["state"] = "could not build the native kernels; using the pure-torch transforms"
        log.info("gradsketch native kernels unavailable: %s", _status)
        return None
    _status["state"] = "loaded"
    if not _self_check(lib):
        _status["state"] = "self-check failed; using the pure-torch transforms"
        log.warning("gradsketch native kernels failed their self-check and are disabled")
        return None
    return lib


def status() -> dict[str, str]:
    """Where the native kernels stand (compiled path, flags, or why they are not used)."""
    library()
    return dict(_status)


def _executor(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_size < n or _pool_pid != os.getpid():
            if _pool is not None and _pool_pid == os.getpid():
                _pool.shutdown(wait=False)
            # a pool inherited through fork() has no threads in the child: always make a fresh one there
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gradsketch-native")
            _pool_size, _pool_pid = n, os.getpid()
        return _pool


def _parallel(calls: list) -> None:
    if len(calls) == 1:
        results = [calls[0]()]
    else:
        results = [f.result() for f in [_executor(len(calls)).submit(c) for c in calls]]
    if any(r is not None and r != 0 for r in results):
        raise MemoryError("gradsketch native kernel: could not allocate its scratch buffer")


def _split(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    units = -(-total // align)
    parts = max(1, min(parts, units))
    bounds = [min(total, (units * i // parts) * align) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _suffix(x: Tensor) -> str | None:
    return {torch.float32: "f32", torch.float64: "f64"}.get(x.dtype)


@contextmanager
def disabled() -> Iterator[None]:
    """Within this block every sketch uses the pure-torch formulation (for benchmarks and tests)."""
    global _off
    old, _off = _off, True
    try:
        yield
    finally:
        _off = old


def usable(x: Tensor, contiguous: bool = True) -> bool:
    """``x`` is a tensor the kernels take (CPU, contiguous, float32/float64, no autograd or torch.func
    wrapper) and the kernels are available. ``contiguous=False``: a 2-D ``x`` whose rows are contiguous (any
    row stride) will do (:func:`signs_mul`)."""
    if contiguous:
        laid_out = x.is_contiguous()
    else:
        laid_out = x.dim() == 2 and (x.stride(1) == 1 or x.shape[1] <= 1)
    if _off or x.device.type != "cpu" or _suffix(x) is None or not laid_out:
        return False
    try:
        if torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False
    except AttributeError:  # pragma: no cover - private API moved: be conservative
        return False
    try:
        x.data_ptr()  # batched gradients (autograd.grad(is_grads_batched=True)) have no storage
    except RuntimeError:
        return False
    return library() is not None


def fwht_(x: Tensor, scale: float = 1.0, threads: int | None = None) -> Tensor:
    """In place: every row of the contiguous ``[M, n]`` tensor ``x`` (n a power of two) becomes
    ``scale · H_n x`` with the unnormalised Sylvester–Hadamard matrix ``H_n`` (entries ±1). Requires
    :func:`usable` (x). Returns ``x``."""
    lib = library()
    assert lib is not None and usable(x) and x.dim() == 2
    m, n = x.shape
    if n & (n - 1):
        raise ValueError(f"fwht_: the row length must be a power of two, got {n}")
    suf = _suffix(x)
    ptr = x.data_ptr()
    nt = max(1, threads if threads is not None else torch.get_num_threads())
    if m * n < _PARALLEL_MIN or nt == 1 or (m >= nt) or n <= _L:
        fn = getattr(lib, f"gs_fwht_{suf}")
        _parallel([lambda a=a, b=b: fn(ptr, m, n, a, b, scale)
                   for a, b in _split(m, nt if m * n >= _PARALLEL_MIN else 1)])
        return x
    # fewer rows than threads and long rows: share each row between threads, phase by phase
    p1, p2 = getattr(lib, f"gs_fwht_phase1_{suf}"), getattr(lib, f"gs_fwht_phase2_{suf}")
    es = x.element_size()
    for r in range(m):
        rp = ptr + r * n * es
        _parallel([lambda a=a, b=b, rp=rp: p1(rp, n, a, b) for a, b in _split(n // _L, nt)])
        _parallel([lambda a=a, b=b, rp=rp: p2(rp, n, a, b, scale) for a, b in _split(_L, nt, align=16)])
    return x


_INDEX = {torch.int32: "", torch.int16: "_i16"}


def _hashed_args(name: str, rows: Tensor, vals: Tensor, n: int, dtype: torch.dtype) -> tuple[str, Tensor, Tensor]:
    s = rows.shape[0] if rows.dim() == 2 else -1
    rows = rows.contiguous()
    vals = vals.to(dtype).contiguous()
    if rows.dtype not in _INDEX or rows.dim() != 2 or rows.shape != (s, n) or vals.shape != (s, n):
        raise ValueError(f"{name}: expected int32 or int16 rows and vals of shape [s, {n}], got {rows.dtype} "
                         f"{tuple(rows.shape)} and {tuple(vals.shape)}")
    return _INDEX[rows.dtype], rows, vals


def sjlt(x: Tensor, rows: Tensor, vals: Tensor, d: int, threads: int | None = None) -> Tensor:
    """``y[b, rows[k, j]] += vals[k, j] · x[b, j]`` for a contiguous ``[M, n]`` ``x``; ``rows`` int32 (or int16)
    ``[s, n]`` in ``[0, d)``, ``vals`` ``[s, n]`` of x's dtype. Requires :func:`usable` (x). Returns ``[M, d]``."""
    lib = library()
    assert lib is not None and usable(x) and x.dim() == 2
    m, n = x.shape
    isuf, rows, vals = _hashed_args("sjlt", rows, vals, n, x.dtype)
    y = x.new_zeros(m, d)
    fn = getattr(lib, f"gs_sjlt{isuf}_{_suffix(x)}")
    nt = max(1, threads if threads is not None else torch.get_num_threads())
    xp, yp, ip, vp = x.data_ptr(), y.data_ptr(), rows.data_ptr(), vals.data_ptr()
    _parallel([lambda a=a, b=b: fn(xp, n, yp, d, ip, vp, rows.shape[0], a, b)
               for a, b in _split(m, nt if m * n >= _PARALLEL_MIN else 1)])
    return y


def gather(y: Tensor, rows: Tensor, vals: Tensor, threads: int | None = None) -> Tensor:
    """The adjoint of :func:`sjlt`: ``out[b, j] = Σ_k vals[k, j] · y[b, rows[k, j]]`` for a contiguous
    ``[M, d]`` ``y`` (the same products and order of sums as ``y[:, rows[0]] * vals[0] + ...``); ``rows``
    int32 or int16 ``[s, n]`` in ``[0, d)``. Requires :func:`usable` (y). Returns a new ``[M, n]`` tensor."""
    lib = library()
    assert lib is not None and usable(y) and y.dim() == 2
    m, d = y.shape
    n = rows.shape[-1]
    isuf, rows, vals = _hashed_args("gather", rows, vals, n, y.dtype)
    out = y.new_empty(m, n)
    fn = getattr(lib, f"gs_gather{isuf}_{_suffix(y)}")
    nt = max(1, threads if threads is not None else torch.get_num_threads())
    yp, op, ip, vp = y.data_ptr(), out.data_ptr(), rows.data_ptr(), vals.data_ptr()
    s = rows.shape[0]
    if s > 1 or m >= nt or m * n < _PARALLEL_MIN:
        _parallel([lambda a=a, b=b: fn(yp, d, op, n, ip, vp, s, a, b)
                   for a, b in _split(m, nt if m * n >= _PARALLEL_MIN else 1)])
        return out
    # one hashed row (s = 1) and fewer rows than threads: each call takes a column range [a, b) of one row
    isz, vsz, osz, ysz = rows.element_size(), vals.element_size(), out.element_size(), y.element_size()
    _parallel([lambda r=r, a=a, b=b: fn(yp + r * d * ysz, d, op + (r * n + a) * osz, b - a, ip + a * isz,
                                         vp + a * vsz, 1, 0, 1)
               for r in range(m) for a, b in _split(n, nt)])
    return out


def signs_mul(x: Tensor, signs: Tensor, out: Tensor | None = None, threads: int | None = None) -> Tensor:
    """``x · signs`` into ``out`` (into ``x`` when ``None``) for ``[M, n]`` ``x`` and ``out`` that are
    :func:`usable` with ``contiguous=False`` (rows contiguous, any row stride), ``signs`` a contiguous int8
    ``[n]`` of ±1: the same values as the product, by sign flips (torch's float·int8 product takes a slow
    type-promoting loop). Returns ``out``."""
    lib = library()
    out = x if out is None else out
    m, n = x.shape
    assert lib is not None and usable(x, contiguous=False) and usable(out, contiguous=False)
    if signs.dtype != torch.int8 or signs.shape != (n,) or not signs.is_contiguous() or out.shape != x.shape \
            or out.dtype != x.dtype:
        raise ValueError(f"signs_mul: expected int8 signs [{n}] and out {x.dtype} {tuple(x.shape)}, got signs "
                         f"{signs.dtype} {tuple(signs.shape)} and out {out.dtype} {tuple(out.shape)}")
    fn = getattr(lib, f"gs_signs_{_suffix(x)}")
    es = x.element_size()
    op, xp, sp, os_, xs = out.data_ptr(), x.data_ptr(), signs.data_ptr(), out.stride(0), x.stride(0)
    nt = max(1, threads if threads is not None else torch.get_num_threads())
    if m >= nt or m * n < _PARALLEL_MIN:
        _parallel([lambda a=a, b=b: fn(op, os_, xp, xs, sp, n, a, b)
                   for a, b in _split(m, nt if m * n >= _PARALLEL_MIN else 1)])
    else:  # fewer rows than threads: column ranges of each row
        _parallel([lambda r=r, a=a, b=b: fn(op + (r * os_ + a) * es, 0, xp + (r * xs + a) * es, 0, sp + a, b - a, 0, 1)
                   for r in range(m) for a, b in _split(n, nt)])
    return out


def _whtsel_args(n: int, b: int, sel: Tensor, src: Tensor | None, mult: Tensor | None, dtype: torch.dtype):
    if b < 1 or b & (b - 1) or n % b:
        raise ValueError(f"whtsel: b must be a power of two dividing n={n}, got {b}")
    sel = sel.to(torch.int32).contiguous()
    if src is not None:
        src = src.to(torch.int32).contiguous()
        if src.numel() != b:
            raise ValueError(f"whtsel: src must have b={b} entries, got {src.numel()}")
    if mult is not None:
        mult = mult.to(dtype).contiguous()
        if mult.numel() != n:
            raise ValueError(f"whtsel: mult must have n={n} entries, got {mult.numel()}")
    return sel, src, mult


def _whtsel_run(name: str, inp: Tensor, out: Tensor, n: int, b: int, sel: Tensor, src: Tensor | None,
                mult: Tensor | None, scale: float, threads: int | None) -> Tensor:
    """Run ``gs_<name>`` over the rows of ``inp`` into ``out`` on the worker threads."""
    lib = library()
    assert lib is not None
    fn = getattr(lib, f"gs_{name}_{_suffix(inp)}")
    ip, op, selp = inp.data_ptr(), out.data_ptr(), sel.data_ptr()
    srcp = src.data_ptr() if src is not None else None
    mp = mult.data_ptr() if mult is not None else None
    m = inp.shape[0]
    nt = max(1, threads if threads is not None else torch.get_num_threads())
    _parallel([lambda a=a, c=c: fn(ip, n, b, srcp, mp, selp, sel.numel(), scale, op, a, c)
               for a, c in _split(m, nt if m * n >= _PARALLEL_MIN else 1)])
    return out


def whtsel(x: Tensor, b: int, sel: Tensor, scale: float, src: Tensor | None = None,
           mult: Tensor | None = None, threads: int | None = None) -> Tensor:
    """``out[m, g, i] = scale · (H_b t_g)[sel[i]]`` with ``t_g[k] = (mult ⊙ x)[m, g·b + src[k]]``: a row-restricted,
    column-permuted Walsh–Hadamard factor on the fast index of the contiguous ``[M, n]`` ``x`` (``H_b``
    unnormalised; ``src`` int32 ``[b]`` or ``None``; ``mult`` ``[n]`` of x's dtype or ``None``). Returns
    ``[M, n // b, len(sel)]``. Requires :func:`usable` (x)."""
    assert usable(x) and x.dim() == 2
    m, n = x.shape
    sel, src, mult = _whtsel_args(n, b, sel, src, mult, x.dtype)
    out = x.new_empty(m, n // b, sel.numel())
    return _whtsel_run("whtsel", x, out, n, b, sel, src, mult, scale, threads)


def whtsel_t(y: Tensor, b: int, sel: Tensor, scale: float, src: Tensor | None = None,
             mult: Tensor | None = None, threads: int | None = None) -> Tensor:
    """The adjoint of :func:`whtsel`: ``[M, G, r] -> [M, G·b]``. Requires :func:`usable` (y)."""
    assert usable(y) and y.dim() == 3
    m, groups, r = y.shape
    n = groups * b
    sel, src, mult = _whtsel_args(n, b, sel, src, mult, y.dtype)
    if sel.numel() != r:
        raise ValueError(f"whtsel_t: y has {r} outputs per group but sel has {sel.numel()}")
    return _whtsel_run("whtsel_t", y, y.new_empty(m, n), n, b, sel, src, mult, scale, threads)


def _reference_wht(x: Tensor) -> Tensor:
    n = x.shape[-1]
    y = x.clone()
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        h *= 2
    return y.reshape(x.shape)


def _self_check(lib: ctypes.CDLL) -> bool:
    g = torch.Generator().manual_seed(0)
    try:
        for n in (1, 2, 8, 64, 1 << 13, 1 << 15):
            x = torch.randn(3, n, generator=g, dtype=torch.float64)
            ref = _reference_wht(x) * 0.5
            got = x.clone()
            lib.gs_fwht_f64(got.data_ptr(), 3, n, 0, 3, 0.5)
            if not torch.allclose(got, ref, rtol=1e-12, atol=1e-12 * n):
                _status["self_check"] = f"fwht mismatch at n={n}"
                return False
        x = torch.randn(2, 50, generator=g, dtype=torch.float64)
        rows = torch.randint(0, 7, (2, 50), generator=g, dtype=torch.int32)
        vals = torch.randn(2, 50, generator=g, dtype=torch.float64)
        y = torch.zeros(2, 7, dtype=torch.float64)
        lib.gs_sjlt_f64(x.data_ptr(), 50, y.data_ptr(), 7, rows.data_ptr(), vals.data_ptr(), 2, 0, 2)
        ref = torch.zeros(2, 7, dtype=torch.float64)
        for k in range(2):
            ref.index_add_(1, rows[k].long(), x * vals[k])
        if not torch.allclose(y, ref, rtol=1e-12, atol=1e-12):
            _status["self_check"] = "sjlt mismatch"
            return False
        out, rows16 = torch.empty(2, 50, dtype=torch.float64), rows.to(torch.int16)
        lib.gs_gather_i16_f64(y.data_ptr(), 7, out.data_ptr(), 50, rows16.data_ptr(), vals.data_ptr(), 2, 0, 2)
        if not torch.equal(out, y[:, rows[0].long()] * vals[0] + y[:, rows[1].long()] * vals[1]):
            _status["self_check"] = "gather mismatch"
            return False
    except Exception as e:  # pragma: no cover - a broken build must never break the library
        _status["self_check"] = repr(e)
        return False
    return True
