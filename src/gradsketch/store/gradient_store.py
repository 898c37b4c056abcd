"""GradientStore: a resumable, multi-writer, memory-mapped on-disk array of sketched gradients.

On-disk layout of a store directory ``path/``::

    manifest.json      static header, written once at creation and never rewritten: format, version,
                       n_rows, d, dtype, chunk_rows, n_chunks, checksum algorithm, sketch spec,
                       fingerprint, metadata, ``extra`` (what the creator recorded about how the
                       rows were made, e.g. attribution's options; never part of the identity check),
                       and ``store_id`` = sha256 of all of these (so an edited field is detected, and
                       markers can be bound to this store)
    data.npy           one .npy array [n_rows, d] (little-endian float16 or float32), preallocated
                       (sparse) at creation, read back through a memory map
    chunks/000123.json completion marker of chunk 123, bound to its store and data: store_id, chunk
                       index, row range, byte count, sha256 of its bytes, and the fingerprint of the
                       examples its rows were computed from (``data``, when the writer knew them)

Files are untrusted: the manifest's ``data_file`` must be a plain file name inside the store, and every
store file is opened without following symlinks and used only if it is a regular file (a FIFO in place
of data.npy is refused, never waited on). Leftovers of dead writers (``.<name>.creating-<pid>-*``
directories beside the store, ``.<file>.<pid>.*.tmp`` files inside it) are removed on the next open.

Rows are cut into ``n_chunks = ceil(n_rows / chunk_rows)`` chunks; chunk ``i`` holds rows
``[i * chunk_rows, min((i + 1) * chunk_rows, n_rows))``. The marker files are the only source of
truth for completion: a chunk is complete iff its marker exists. ``write_chunk`` writes the rows
with ``pwrite``, ``fsync``s the data file, and only then publishes the marker atomically (temp file,
fsync, hard link / rename, fsync of the directory). Hence

* a writer killed at any point loses at most the chunk it was writing, which stays "missing" and is
  rewritten in full on resume (rows are addressed by index, so nothing is ever duplicated);
* several processes filling disjoint chunk ranges never contend for a shared file: each publishes
  its own markers, so no completion can be lost and no lock is needed;
* creation is atomic too: the store is built in a hidden sibling directory and renamed into place,
  so racing creators end up opening the one store that won.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import operator
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from . import _io

FORMAT = "gradsketch.store"
VERSION = 2
MANIFEST = "manifest.json"
DATA = "data.npy"
CHUNKS = "chunks"
CHECKSUM = "sha256"
DTYPES: dict[str, np.dtype[Any]] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
DEFAULT_CHUNK_BYTES = 16 * 2**20
F16_TINY = 2.0**-14  # smallest normal float16
UNDERFLOW_WARN = 0.01  # warn when more than this share of a chunk's entries underflow float16
_MARKER_RE = re.compile(r"^(\d{6,})\.json$")
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")
def store_id(header: Mapping) -> str:
    """sha256 of every field of a manifest but ``store_id`` itself (canonical JSON), as hex."""
    body = {k: v for k, v in header.items() if k != "store_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class StoreFileError(ValueError):
    """A store-level file (manifest.json, data.npy, chunks/) is missing, damaged or not a plain file inside
    the store: no chunk can be vouched for. The message names the file and what to run."""


class CorruptChunkError(ValueError):
    """Raised by :meth:`GradientStore.verify` when chunk data do not match their recorded checksum.

    ``err.chunks`` lists the indices of the corrupt chunks, ``err.reasons`` maps each to what failed.
    """

    def __init__(self, message: str, chunks: list[int], reasons: dict[int, str] | None = None):
        super().__init__(message)
        self.chunks = list(chunks)
        self.reasons = dict(reasons or {})


# ----------------------------------------------------------------------------- argument checking
def _positive_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an integer >= 1, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value}")
    return value


def normalize_dtype(dtype) -> str:
    """Map ``dtype`` (str, numpy or torch dtype) to ``"float16"`` or ``"float32"``; ValueError otherwise."""
    name = getattr(dtype, "name", None) if not isinstance(dtype, str) else dtype
    if name is None and dtype is not None:  # torch.dtype has no .name; str(torch.float16) == "torch.float16"
        name = str(dtype).removeprefix("torch.")
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        name = np.dtype(dtype).name
    aliases = {"float16": "float16", "half": "float16", "f2": "float16", "<f2": "float16",
               "float32": "float32", "float": "float32", "f4": "float32", "<f4": "float32"}
    if not isinstance(name, str) or name not in aliases:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return aliases[name]


def _normalize_json(value, name: str):
    """Round-trip through JSON so that tuples/lists etc. compare as they will be read back."""
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name}: expected a JSON-serialisable value, got {value!r} ({e})") from None


def _jsonable_metadata(metadata):
    def conv(x):
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if hasattr(x, "tolist") and callable(x.tolist):  # numpy arrays/scalars, torch tensors
            return conv(x.tolist())
        return x

    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata: expected a dict or None, got {type(metadata).__name__}")
    return _normalize_json(conv(metadata), "metadata")


def to_numpy(rows) -> np.ndarray:
    """numpy view/copy of ``rows`` (numpy array or torch tensor on any device, detached)."""
    if type(rows).__module__.startswith("torch"):
        import torch

        t = rows.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    return np.asarray(rows)


def _torch_view(arr: np.ndarray) -> Any:
    """A torch tensor sharing ``arr``'s memory when it is native-endian float32/float64 with non-negative
    strides (the rows gradsketch writes), else None."""
    if arr.dtype not in (np.dtype("float32"), np.dtype("float64")) or not arr.dtype.isnative \
            or not arr.flags.writeable or any(st < 0 for st in arr.strides):
        return None
    import torch

    return torch.from_numpy(arr)


def _describe_spec_diff(expected: Any, found: Any) -> str:
    if not isinstance(expected, dict) or not isinstance(found, dict):
        return f"expected {expected!r}, found {found!r}"
    keys = sorted(set(expected) | set(found))
    parts = []
    for k in keys:
        if expected.get(k, "<absent>") != found.get(k, "<absent>"):
            parts.append(f"{k}: expected {expected.get(k, '<absent>')!r}, found {found.get(k, '<absent>')!r}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- the store
class GradientStore:
    """Rows ``[n_rows, d]`` of sketched per-example gradients on disk; see the module docstring.

    Build with :meth:`create_or_open` (writable) or :meth:`open` (read-only), not the constructor.
    Storage dtype is float16 (default) or float32; reads for scoring come back as float32.
    """

    def __init__(self, path: Path, header: dict, writable: bool):
        self.path = Path(path)
        self._header = header
        self._writable = writable
        self._fd: int | None = None
        self._mm: np.memmap | None = None
        chunks = self.path / CHUNKS
        if not os.path.isdir(chunks) or os.path.islink(chunks):
            what = "is missing" if not os.path.lexists(chunks) else "is not a directory inside the store"
            raise StoreFileError(
                f"{chunks}: {what}; it holds the completion records of every chunk, so no row of the store at "
                f"{str(self.path)!r} can be vouched for. Run `gradsketch store repair {self.path}` (it "
                "recreates chunks/ empty: the next fit recomputes every chunk) or delete the store and refit")
        self._offset = self._check_data_file()
        if writable:
            self._remove_leftovers()

    # --------------------------------------------------------------- construction
    @classmethod
    def create_or_open(
        cls,
        path,
        n_rows: int,
        d: int,
        spec: Mapping,
        fingerprint: str,
        dtype="float16",
        chunk_rows: int | None = None,
        metadata: Mapping | None = None,
        extra: Mapping | None = None,
    ) -> GradientStore:
        """Create the store at ``path``, or reopen it for writing if it already exists.

        An existing store must agree on ``n_rows``, ``d``, ``spec``, ``fingerprint``, ``dtype``,
        ``chunk_rows`` (when given) and ``metadata`` (when given); otherwise ValueError naming what
        differs (expected = given here, found = on disk). ``chunk_rows=None`` picks ~16 MiB chunks.
        ``extra`` (a JSON-serialisable dict) is written into the manifest when the store is created and is
        never compared (read it back as :attr:`extra`; the creator's record wins when several race).
        Safe to call concurrently from several processes on the same fresh ``path``.
        """
        n_rows = _positive_int(n_rows, "n_rows")
        d = _positive_int(d, "d")
        dtype = normalize_dtype(dtype)
        if not isinstance(spec, Mapping):
            raise TypeError(f"spec: expected a JSON-serialisable dict, got {type(spec).__name__}")
        spec = _normalize_json(dict(spec), "spec")
        if not isinstance(fingerprint, str):
            raise TypeError(f"fingerprint: expected a str, got {type(fingerprint).__name__}")
        if chunk_rows is not None:
            chunk_rows = _positive_int(chunk_rows, "chunk_rows")
        meta = None if metadata is None else _jsonable_metadata(metadata)
        if extra is not None and not isinstance(extra, Mapping):
            raise TypeError(f"extra: expected a JSON-serialisable dict or None, got {type(extra).__name__}")
        extra = None if extra is None else _normalize_json(dict(extra), "extra")
        path = Path(path)

        if not (path / MANIFEST).exists():
            if chunk_rows is None:
                itemsize = DTYPES[dtype].itemsize
                chunk_rows = max(1, min(n_rows, DEFAULT_CHUNK_BYTES // (d * itemsize)))
            header = {
                "format": FORMAT,
                "version": VERSION,
                "n_rows": n_rows,
                "d": d,
                "dtype": dtype,
                "chunk_rows": chunk_rows,
                "n_chunks": math.ceil(n_rows / chunk_rows),
                "checksum": CHECKSUM,
                "data_file": DATA,
                "spec": spec,
                "fingerprint": fingerprint,
                "metadata": meta or {},
            }
            if extra:
                header["extra"] = extra
            header["store_id"] = store_id(header)
            cls._create(path, header)  # loses gracefully to a concurrent creator

        store = cls(path, cls._read_header(path), writable=True)
        try:
            store._check_matches(n_rows=n_rows, d=d, spec=spec, fingerprint=fingerprint, dtype=dtype,
                                 chunk_rows=chunk_rows, metadata=meta)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, path) -> GradientStore:
        """Open an existing store read-only (``write_chunk`` raises)."""
        path = Path(path)
        return cls(path, cls._read_header(path), writable=False)

    @staticmethod
    def _read_header(path: Path) -> dict:
        manifest = path / MANIFEST
        if not os.path.lexists(manifest):
            raise FileNotFoundError(f"path: no gradsketch store at {str(path)!r} ({MANIFEST} not found)")
        damaged = (f"; the store-level files are damaged, so no chunk can be vouched for: delete {str(path)!r} "
                   "and refit (only chunk-level damage is repairable with `gradsketch store repair`)")
        try:
            header = json.loads(_io.read_regular(manifest, 1 << 26))
        except OSError as e:
            raise StoreFileError(f"{manifest}: unreadable manifest ({e.strerror or e}){damaged}") from None
        except ValueError as e:
            raise StoreFileError(f"{manifest}: unreadable manifest ({e}){damaged}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            found = header.get("format") if isinstance(header, dict) else type(header).__name__
            raise StoreFileError(f"{manifest}: expected format {FORMAT!r}, found {found!r}")
        if header.get("version") != VERSION:
            old = (" (a store written by an older gradsketch, whose chunk records are not bound to their store "
                   "and data: delete it and refit)") if isinstance(header.get("version"), int) \
                and header["version"] < VERSION else ""
            raise StoreFileError(f"{manifest}: expected version {VERSION}, found {header.get('version')!r}{old}")
        problems = []
        for key in ("n_rows", "d", "chunk_rows", "n_chunks"):
            v = header.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{key}: expected an integer >= 1, found {v!r}")
        if header.get("dtype") not in DTYPES:
            problems.append(f"dtype: expected one of {sorted(DTYPES)}, found {header.get('dtype')!r}")
        if header.get("checksum") != CHECKSUM:
            problems.append(f"checksum: expected {CHECKSUM!r}, found {header.get('checksum')!r}")
        if not problems and header["n_chunks"] != math.ceil(header["n_rows"] / header["chunk_rows"]):
            problems.append(f"n_chunks: expected ceil(n_rows / chunk_rows) = "
                            f"{math.ceil(header['n_rows'] / header['chunk_rows'])}, found {header['n_chunks']}")
        df = header.get("data_file")
        if not (isinstance(df, str) and df and df not in (".", "..") and "/" not in df and "\\" not in df
                and os.sep not in df and (os.altsep is None or os.altsep not in df) and "\0" not in df):
            problems.append(f"data_file: expected a plain file name inside the store (no directory part, "
                            f"no '..'), found {df!r}")
        if not problems and header.get("store_id") != store_id(header):
            problems.append("store_id: does not match the manifest's fields (the manifest was edited)")
        if problems:
            raise StoreFileError(f"{manifest}: damaged manifest: {'; '.join(problems)}{damaged}")
        return header

    @staticmethod
    def _remove_dead_creations(path: Path) -> None:
        """Remove ``.<name>.creating-<pid>-<hex>`` directories beside ``path`` whose creator has exited."""
        pat = re.compile(r"^\." + re.escape(path.name) + r"\.creating-(\d+)-[0-9a-f]+$")
        try:
            names = os.listdir(path.parent)
        except OSError:
            return
        for name in names:
            m = pat.match(name)
            if m and not _io.pid_alive(int(m.group(1))):
                shutil.rmtree(path.parent / name, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Temporary files of writers that died mid-write (``.<file>.<pid>.<hex>.tmp`` in the store and in
        chunks/) and creation directories of dead creators; files of live processes are left alone."""
        self._remove_dead_creations(self.path)
        for d in (self.path, self.path / CHUNKS):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                m = _TMP_RE.match(name)
                if m and not _io.pid_alive(int(m.group(1))):
                    try:
                        os.unlink(d / name)
                    except OSError:
                        pass

    @staticmethod
    def _create(path: Path, header: dict) -> None:
        parent = path.parent
        for p in (parent, *parent.parents):  # the nearest existing ancestor must be a directory
            if p.exists() or p.is_symlink():
                if not p.is_dir():
                    raise ValueError(f"path: expected a directory for the store at {str(path)!r}, but {str(p)!r} "
                                     "is a file")
                break
        parent.mkdir(parents=True, exist_ok=True)
        GradientStore._remove_dead_creations(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / MANIFEST).exists():
                return
            raise ValueError(f"path: {str(path)!r} exists and is not a gradsketch store (expected an "
                             "empty or absent directory)")
        tmp = parent / f".{path.name}.creating-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            (tmp / CHUNKS).mkdir()
            mm = np.lib.format.open_memmap(tmp / DATA, mode="w+", dtype=DTYPES[header["dtype"]],
                                           shape=(header["n_rows"], header["d"]))
            del mm  # preallocated sparse file, zero-filled
            with open(tmp / DATA, "rb+") as f:
                os.fsync(f.fileno())
            _io.atomic_write(tmp / MANIFEST, _io.dumps(header))
            _io.fsync_dir(tmp / CHUNKS)
            try:
                os.rename(tmp, path)  # atomic; fails if another creator already filled ``path``
            except OSError:
                if not (path / MANIFEST).exists():
                    raise
            else:
                _io.fsync_dir(parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _data_path(self) -> Path:
        return self.path / self._header["data_file"]

    def _open_data(self, flags: int = os.O_RDONLY) -> int:
        """Descriptor of the data file, verified to be a regular file inside the store (never a symlink or a
        FIFO: see :func:`_io.open_regular`)."""
        try:
            return _io.open_regular(self._data_path(), flags)
        except OSError as e:
            raise StoreFileError(f"{self._data_path()}: unusable data file ({e.strerror or e}); the store-level "
                                 f"files are damaged: run `gradsketch store repair {self.path}` (it recreates the "
                                 "data file: the next fit recomputes every chunk) or delete the store and "
                                 "refit") from None

    def _check_data_file(self) -> int:
        data = self._data_path()
        fd = self._open_data()
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                offset = f.tell()
        except (OSError, ValueError) as e:
            raise StoreFileError(f"{data}: unreadable data file ({e})") from None
        expected = (self.n_rows, self.d)
        if tuple(shape) != expected or fortran or np.dtype(dtype) != DTYPES[self.dtype]:
            raise StoreFileError(f"{data}: expected a C-order {self.dtype} array of shape {expected}, found "
                             f"{np.dtype(dtype).name} {tuple(shape)} (fortran_order={fortran})")
        size = os.stat(data, follow_symlinks=False).st_size
        if size < offset + self.n_rows * self.d * self.itemsize:
            raise StoreFileError(f"{data}: truncated, expected at least "
                             f"{offset + self.n_rows * self.d * self.itemsize} bytes, found {size}")
        return offset

    def differences(self, n_rows: int | None = None, d: int | None = None, spec: Mapping | None = None,
                    fingerprint: str | None = None, dtype: Any = None, chunk_rows: int | None = None,
                    metadata: Mapping | None = None) -> dict[str, tuple[Any, Any]]:
        """The store's identity check: ``{key: (expected, found)}`` for every given field (``None``: not
        compared) that differs from what is on disk. ``spec`` and ``metadata`` are compared after a JSON
        round trip, ``dtype`` after normalisation. Empty when the store holds what the caller expects.

        >>> import tempfile, numpy as np
        >>> st = GradientStore.create_or_open(tempfile.mkdtemp() + "/s", 4, 2, {"kind": "x"}, "fp")
        >>> st.differences(n_rows=4, spec={"kind": "y"}, fingerprint="fp")
        {'spec': ({'kind': 'y'}, {'kind': 'x'})}
        """
        given = {"n_rows": n_rows, "d": d, "fingerprint": fingerprint, "chunk_rows": chunk_rows,
                 "dtype": None if dtype is None else normalize_dtype(dtype),
                 "spec": None if spec is None else json.loads(json.dumps(dict(spec), sort_keys=True)),
                 "metadata": None if metadata is None else _jsonable_metadata(metadata)}
        out: dict[str, tuple[Any, Any]] = {}
        for key, value in given.items():
            if value is None:  # not given: accept what is on disk
                continue
            found = self._header.get(key)
            if value != found:
                out[key] = (value, found)
        return out

    def _check_matches(self, **given) -> None:
        diffs = []
        for key, (value, found) in self.differences(**given).items():
            if key == "spec":
                diffs.append(f"sketch spec differs ({_describe_spec_diff(value, found)})")
            else:
                diffs.append(f"{key}: expected {value!r}, found {found!r}")
        if diffs:
            raise ValueError(f"store at {str(self.path)!r} does not match the arguments (expected = given, "
                             f"found = on disk): " + "; ".join(diffs))

    # --------------------------------------------------------------- header properties
    @property
    def n_rows(self) -> int:
        return self._header["n_rows"]

    def __len__(self) -> int:
        return self.n_rows

    @property
    def d(self) -> int:
        return self._header["d"]

    @property
    def dtype(self) -> str:
        """Storage dtype name, ``"float16"`` or ``"float32"``."""
        return self._header["dtype"]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def chunk_rows(self) -> int:
        return self._header["chunk_rows"]

    @property
    def n_chunks(self) -> int:
        return self._header["n_chunks"]

    @property
    def spec(self) -> dict:
        return json.loads(json.dumps(self._header["spec"]))

    @property
    def fingerprint(self) -> str:
        return self._header["fingerprint"]

    @property
    def metadata(self) -> dict:
        return json.loads(json.dumps(self._header.get("metadata", {})))

    @property
    def extra(self) -> dict:
        """The creator's record of how the rows were made (``{}`` if none); not part of the identity."""
        return json.loads(json.dumps(self._header.get("extra", {})))

    @property
    def writable(self) -> bool:
        return self._writable

    def __repr__(self) -> str:
        return (f"GradientStore({str(self.path)!r}, n_rows={self.n_rows}, d={self.d}, dtype={self.dtype!r}, "
                f"chunks={len(self.completed_chunks())}/{self.n_chunks} complete)")

    # --------------------------------------------------------------- chunks
    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows ``(start, stop)`` of chunk ``i``."""
        i = self._chunk_index(i)
        start = i * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def _chunk_index(self, i) -> int:
        if isinstance(i, bool):
            raise TypeError(f"i: expected a chunk index in [0, {self.n_chunks}), got {i!r}")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"i: expected a chunk index in [0, {self.n_chunks}), got {i!r}") from None
        if not 0 <= i < self.n_chunks:
            raise ValueError(f"i: expected a chunk index in [0, {self.n_chunks}), got {i}")
        return i

    def _row_range(self, row_range) -> tuple[int, int]:
        if row_range is None:
            return 0, self.n_rows
        if isinstance(row_range, range):
            if row_range.step != 1:
                raise ValueError(f"row_range: expected step 1, got {row_range!r}")
            start, stop = row_range.start, row_range.stop
        else:
            try:
                start, stop = row_range
                start, stop = operator.index(start), operator.index(stop)
            except (TypeError, ValueError):
                raise TypeError(f"row_range: expected None, a range or a (start, stop) pair of ints, "
                                f"got {row_range!r}") from None
        if not 0 <= start <= stop <= self.n_rows:
            raise ValueError(f"row_range: expected 0 <= start <= stop <= {self.n_rows}, "
                             f"got ({start}, {stop})")
        return start, stop

    def chunks_in(self, row_range=None) -> range:
        """Indices of the chunks overlapping ``row_range`` (default: all rows)."""
        start, stop = self._row_range(row_range)
        if start == stop:
            return range(0)
        return range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1)

    def _marker(self, i: int) -> Path:
        return self.path / CHUNKS / f"{i:06d}.json"

    def is_chunk_complete(self, i: int) -> bool:
        """Whether chunk ``i``'s completion marker exists (written by any process)."""
        return self._marker(self._chunk_index(i)).exists()

    def completed_chunks(self) -> list[int]:
        """Sorted indices of the chunks whose completion marker exists (re-read from disk each call)."""
        done = []
        for name in os.listdir(self.path / CHUNKS):
            m = _MARKER_RE.match(name)
            if m and int(m.group(1)) < self.n_chunks:
                done.append(int(m.group(1)))
        return sorted(done)

    def missing_chunks(self, row_range=None) -> list[int]:
        """Indices of the chunks overlapping ``row_range`` that are not complete yet."""
        done = set(self.completed_chunks())
        return [i for i in self.chunks_in(row_range) if i not in done]

    @property
    def is_complete(self) -> bool:
        return len(self.completed_chunks()) == self.n_chunks

    def chunk_checksums(self) -> dict[int, str]:
        """``{chunk index: sha256 hex}`` of the completed chunks, as recorded in their markers."""
        out: dict[int, str] = {}
        for i in self.completed_chunks():
            marker = self._read_marker(i)
            if marker is not None:
                out[i] = cast(str, marker.get(CHECKSUM))
        return out

    def _read_marker(self, i: int) -> dict | None:
        try:
            marker = json.loads(_io.read_regular(self._marker(i), 1 << 20))
        except (OSError, ValueError):
            return None
        return marker if isinstance(marker, dict) else None

    def chunk_record(self, i: int) -> dict | None:
        """The completion marker of chunk ``i`` as a dict (``None``: missing or unreadable). Keys: ``store_id``,
        ``chunk``, ``row_start``, ``row_stop``, ``nbytes``, ``sha256`` and ``data`` (the fingerprint of the
        examples the rows were computed from, or ``None`` when the writer did not know them)."""
        return self._read_marker(self._chunk_index(i))

    def data_fingerprints(self) -> dict[int, str | None]:
        """``{chunk index: data fingerprint}`` of the completed chunks, as recorded in their markers."""
        out: dict[int, str | None] = {}
        for i in self.completed_chunks():
            marker = self._read_marker(i)
            if marker is not None:
                out[i] = marker.get("data")
        return out

    def skipped_rows(self) -> list[int]:
        """Sorted store rows recorded as skipped (non-finite gradients, rows zeroed) in the completed chunks."""
        out: set[int] = set()
        for i in self.completed_chunks():
            marker = self._read_marker(i)
            if marker is not None and isinstance(marker.get("skipped"), list):
                out.update(int(r) for r in marker["skipped"])
        return sorted(out)

    def _marker_problem(self, i: int, marker: dict | None) -> str | None:
        """Why chunk ``i``'s marker cannot vouch for its rows (None: it can; the checksum is checked apart)."""
        start, stop = self.chunk_range(i)
        name = f"chunks/{self._marker(i).name}"
        if marker is None:
            return f"{name} is unreadable or not a regular file"
        if marker.get("store_id") != self._header["store_id"]:
            return (f"{name} belongs to another store (store_id {str(marker.get('store_id'))[:16]}..., this store "
                    f"is {self._header['store_id'][:16]}...): rows or markers copied from elsewhere")
        if marker.get("chunk") != i or (marker.get("row_start"), marker.get("row_stop")) != (start, stop):
            return (f"{name} records chunk {marker.get('chunk')!r} rows {marker.get('row_start')!r}:"
                    f"{marker.get('row_stop')!r}, expected chunk {i} rows {start}:{stop}")
        if marker.get("nbytes") != (stop - start) * self.d * self.itemsize:
            return f"{name} records {marker.get('nbytes')!r} bytes, expected {(stop - start) * self.d * self.itemsize}"
        if not isinstance(marker.get(CHECKSUM), str):
            return f"{name} records no {CHECKSUM}"
        return None

    # --------------------------------------------------------------- rows -> bytes
    def row_range_for_rank(self, rank: int, world_size: int) -> tuple[int, int]:
        """Contiguous, chunk-aligned share ``(start, stop)`` of the rows for ``rank`` of ``world_size``.

        Chunks are split as evenly as possible; ranks beyond the number of chunks get an empty range.
        """
        world_size = _positive_int(world_size, "world_size")
        try:
            ok = not isinstance(rank, bool) and 0 <= operator.index(rank) < world_size
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
        rank = operator.index(rank)
        c0 = rank * self.n_chunks // world_size
        c1 = (rank + 1) * self.n_chunks // world_size
        return min(c0 * self.chunk_rows, self.n_rows), min(c1 * self.chunk_rows, self.n_rows)

    def _prepare(self, rows, i: int, allow_nonfinite: bool) -> np.ndarray:
        start, stop = self.chunk_range(i)
        arr = to_numpy(rows)
        expected = (stop - start, self.d)
        if arr.shape != expected:
            raise ValueError(f"rows: expected shape {expected} for chunk {i} (rows {start}:{stop}), "
                             f"got {tuple(arr.shape)}")
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"rows: expected a real floating or integer array, got dtype {arr.dtype}")
        fast = _torch_view(arr) if arr.dtype == np.float32 or self.dtype == "float32" else None
        if fast is not None:  # (float64 -> float16 stays in numpy: torch would round twice, via float32)
            # float32/float64 rows: convert and check with torch (vectorised float16 conversion, threads);
            # numpy's float16 cast is a scalar loop, ~20x slower, and was most of a chunk write
            import torch

            if not allow_nonfinite:
                self._check_finite(fast, start, "")
            conv = fast.to(torch.float16 if self.dtype == "float16" else torch.float32).contiguous()
            if not allow_nonfinite:
                self._check_finite(conv, start, self._overflow_hint())
            if self.dtype == "float16":
                small = (fast.abs() < F16_TINY) & (fast != 0)
                self._warn_underflow(i, int(small.sum()), int((small & (conv == 0)).sum()), fast.numel())
            return conv.numpy()
        if not allow_nonfinite and arr.dtype.kind == "f":
            self._check_finite(arr, start, "")
        with np.errstate(over="ignore", under="ignore"):  # overflow to inf is reported just below, naming the row
            out = np.ascontiguousarray(arr, dtype=DTYPES[self.dtype])
        if not allow_nonfinite:
            self._check_finite(out, start, self._overflow_hint())
        if self.dtype == "float16" and arr.dtype.kind == "f":
            small = (np.abs(arr) < F16_TINY) & (arr != 0)
            self._warn_underflow(i, int(small.sum()), int((small & (out == 0)).sum()), arr.size)
        return out

    def _overflow_hint(self) -> str:
        if self.dtype == "float16":
            return (" after conversion to float16 (overflow: |value| > 65504; store the rows in float32: "
                    "store_dtype='float32' for the Attributor, dtype='float32' for GradientStore)")
        return f" after conversion to {self.dtype} (overflow: |value| too large)"

    def _warn_underflow(self, i: int, n_small: int, n_zero: int, n: int) -> None:
        """Warn (once per store object) when more than ``UNDERFLOW_WARN`` of a chunk's entries underflow
        float16: |value| < 2^-14 (subnormal: fewer significant bits, or flushed to 0)."""
        if n == 0 or n_small <= UNDERFLOW_WARN * n or getattr(self, "_warned_underflow", False):
            return
        import warnings

        self._warned_underflow = True
        start, stop = self.chunk_range(i)
        warnings.warn(
            f"store at {str(self.path)!r}: {100 * n_small / n:.1f}% of the entries of chunk {i} (rows {start}:{stop}) "
            f"underflow float16 (0 < |value| < 2^-14 = 6.1e-05: stored with fewer significant bits), "
            f"{100 * n_zero / n:.1f}% became 0; scores computed from these rows lose accuracy. Store the rows in "
            "float32 (store_dtype='float32' for the Attributor, dtype='float32' for GradientStore) or scale the "
            "loss up", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _check_finite(arr: Any, row0: int, why: str) -> None:
        """Raise naming the first non-finite rows of ``arr`` ([rows, d] numpy array or torch tensor)."""
        if not isinstance(arr, np.ndarray):
            import torch

            # one sum per row first (about 10x cheaper than the elementwise test): a finite sum means every
            # entry is finite, since NaN and ±inf propagate; only rows whose sum is not finite (a non-finite
            # entry, or finite entries whose sum overflows) need the elementwise test
            if bool(torch.isfinite(arr.sum(dim=1)).all()):
                return
            finite: np.ndarray = torch.isfinite(arr).all(dim=1).numpy()
        else:
            finite = np.asarray(np.isfinite(arr).all(axis=1))
        if not finite.all():
            bad = np.flatnonzero(~finite)
            rows = ", ".join(str(row0 + int(b)) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")
            first = row0 + int(bad[0])
            allow = "" if "overflow" in why else "; pass allow_nonfinite=True to allow"
            raise ValueError(f"rows: expected finite values, got NaN/Inf in row {first}{why} "
                             f"({len(bad)} non-finite row(s): {rows}){allow}")

    def write_chunk(self, i: int, rows, *, overwrite: bool = False, allow_nonfinite: bool = False,
                    data_fingerprint: str | None = None, skipped: list[int] | None = None) -> str:
        """Write chunk ``i`` (rows ``chunk_range(i)``) durably and mark it complete; return its sha256.

        ``rows``: ``[chunk rows, d]`` numpy array or torch tensor (any float dtype, any device).
        ``data_fingerprint``: identifies the examples the rows were computed from (recorded in the marker and
        compared by :func:`gradsketch.store.fill_stream` when the store is reused). ``skipped``: store rows of
        this chunk whose examples were skipped (non-finite gradients under ``nan_policy="skip"``, rows zeroed),
        recorded in the marker (:meth:`skipped_rows`).
        Order: data are written and fsync'd, then the completion marker is published atomically.
        Writing a completed chunk raises ValueError unless ``overwrite=True`` (which first removes the
        marker, so a crash mid-overwrite leaves the chunk missing rather than wrongly complete).
        """
        if not self._writable:
            raise ValueError(f"store at {str(self.path)!r} was opened read-only; use "
                             "GradientStore.create_or_open to write")
        i = self._chunk_index(i)
        start, stop = self.chunk_range(i)
        marker = self._marker(i)
        if marker.exists() and not overwrite:
            raise ValueError(f"i: chunk {i} (rows {start}:{stop}) of {str(self.path)!r} is already complete; "
                             "pass overwrite=True to rewrite it")
        arr = self._prepare(rows, i, allow_nonfinite)
        if overwrite and marker.exists():
            os.unlink(marker)
            _io.fsync_dir(marker.parent)
        view = memoryview(arr).cast("B")  # type: ignore[arg-type]  # ndarray supports the buffer protocol
        checksum = hashlib.sha256(view).hexdigest()
        if data_fingerprint is not None and not isinstance(data_fingerprint, str):
            raise TypeError(f"data_fingerprint: expected a str or None, got {type(data_fingerprint).__name__}")
        record = {"store_id": self._header["store_id"], "chunk": i, "row_start": start, "row_stop": stop,
                  "nbytes": len(view), CHECKSUM: checksum, "data": data_fingerprint}
        if skipped:
            rows_skipped = sorted({operator.index(r) for r in skipped})
            if rows_skipped[0] < start or rows_skipped[-1] >= stop:
                raise ValueError(f"skipped: expected store rows in [{start}, {stop}) for chunk {i}, got "
                                 f"{rows_skipped}")
            record["skipped"] = rows_skipped
        try:
            fd = self._data_fd()
            _io.pwrite_all(fd, view, self._offset + start * self.d * self.itemsize)
            os.fsync(fd)
            _io.atomic_write(marker, _io.dumps(record), exclusive=not overwrite)
        except FileExistsError:
            raise ValueError(f"i: chunk {i} (rows {start}:{stop}) was completed concurrently by another "
                             "writer; writers must fill disjoint row ranges") from None
        except OSError as e:
            if e.errno is not None and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise OSError(e.errno, f"{os.strerror(e.errno)} while writing chunk {i} (rows {start}:{stop}) of the "
                                       f"store at {str(self.path)!r}: the {len(self.completed_chunks())} completed "
                                       "chunk(s) are kept; free space and rerun the same command, it resumes with "
                                       "the missing chunks") from e
            raise
        return checksum

    def _data_fd(self) -> int:
        if self._fd is None:
            self._fd = self._open_data(os.O_RDWR)
        return self._fd

    # --------------------------------------------------------------- reading
    def _memmap(self) -> np.memmap:
        if self._mm is None:
            fd = self._open_data()
            with os.fdopen(fd, "rb", closefd=True) as f:
                self._mm = np.memmap(f, dtype=DTYPES[self.dtype], mode="r", offset=self._offset,
                                     shape=(self.n_rows, self.d), order="C")
        return self._mm

    def _require_complete(self, start: int, stop: int, allow_incomplete: bool) -> None:
        if allow_incomplete:
            return
        missing = self.missing_chunks((start, stop))
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"row_range: rows {start}:{stop} include {len(missing)} incomplete chunk(s) "
                             f"({shown}); fill them first or pass allow_incomplete=True (unwritten rows "
                             "read as 0)")

    def array(self, row_range=None, *, allow_incomplete: bool = False) -> np.memmap:
        """Read-only memory-mapped view ``[rows, d]`` (storage dtype) of ``row_range`` (default: all).

        Raises ValueError if the range contains incomplete chunks, unless ``allow_incomplete=True``.
        """
        start, stop = self._row_range(row_range)
        self._require_complete(start, stop, allow_incomplete)
        return cast(np.memmap, self._memmap()[start:stop])

    def iter_blocks(self, block_rows: int, row_range=None, *, allow_incomplete: bool = False,
                    as_tensor: bool = False) -> Iterator[np.ndarray]:
        """Yield consecutive float32 blocks ``[<= block_rows, d]`` of ``row_range`` (default: all rows).

        Block ``k`` covers rows ``start + k * block_rows`` onwards. ``as_tensor=True`` yields CPU torch
        tensors instead of numpy arrays. Completeness is checked once, before the first block.
        """
        block_rows = _positive_int(block_rows, "block_rows")
        start, stop = self._row_range(row_range)
        self._require_complete(start, stop, allow_incomplete)
        mm = self._memmap()

        def gen():
            for s in range(start, stop, block_rows):
                block = np.array(mm[s:min(s + block_rows, stop)], dtype=np.float32)
                if as_tensor:
                    import torch

                    yield torch.from_numpy(block)
                else:
                    yield block

        return gen()

    def verify(self, row_range=None) -> list[int]:
        """Recompute the checksum of every completed chunk overlapping ``row_range``.

        Returns the verified chunk indices; raises :class:`CorruptChunkError` naming every chunk whose
        bytes or marker do not match. Incomplete chunks are not checked (see ``missing_chunks``).
        """
        mm = self._memmap()
        done = set(self.completed_chunks())
        checked, corrupt, reasons = [], [], []
        why: dict[int, str] = {}
        for i in self.chunks_in(row_range):
            if i not in done:
                continue
            start, stop = self.chunk_range(i)
            marker = self._read_marker(i)
            problem = self._marker_problem(i, marker)
            if problem is None:
                assert marker is not None
                block = np.ascontiguousarray(mm[start:stop])
                got = hashlib.sha256(memoryview(block).cast("B")).hexdigest()  # type: ignore[arg-type]
                if got != marker.get(CHECKSUM):
                    problem = f"bytes changed (expected sha256 {marker.get(CHECKSUM)}, found {got})"
            if problem is not None:
                corrupt.append(i)
                why[i] = f"rows {start}:{stop}: {problem}"
                reasons.append(f"chunk {i} (rows {start}:{stop}): {problem}")
            else:
                checked.append(i)
        if corrupt:
            raise CorruptChunkError(f"store at {str(self.path)!r}: {len(corrupt)} corrupt chunk(s) "
                                    f"{corrupt}: " + "; ".join(reasons) + f". Run `gradsketch store repair "
                                    f"{self.path}` (it marks these chunks missing) and rerun the fit: only they are "
                                    "recomputed", corrupt, why)
        return checked

    # --------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the data file descriptor and the memory map (views already returned stay valid)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mm = None

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
