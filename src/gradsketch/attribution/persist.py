"""Saving and loading a fitted :class:`~gradsketch.attribution.Attributor` without unpickling anything.

A saved attributor is a directory with

- ``manifest.json``: plain JSON (format name and version, the method, mode, sketch option, the options
  that are plain values, the task's parameter names/shapes/dtype/fingerprint, and per model state
  (component): its weight, sketch spec, where its training features are, its kernel's type);
- ``t<i>.bin``: raw little-endian tensor bytes, one file per tensor (features, kernel factors, weights,
  checkpoint states), each listed in the manifest with its dtype, shape and sha256.

Nothing is read with ``pickle`` or ``torch.load``: the files are treated as untrusted input. Every tensor's
file size must equal ``numel · itemsize`` of the shape the manifest claims (checked before reading) and its
sha256 must match; the kernels, sketches and features are rebuilt only from these tensors and checked
against each other (a kernel of d × d for features of width d, a sketch whose spec is the recorded one).
A manifest for another model (parameter names, shapes, dtype, or values: the fingerprint) is refused with
a ``ValueError`` naming what was expected and what arrived.

Kernels are stored as their factors: the identity; an eigendecomposition ``V diag(w) Vᵀ`` (Arnoldi, the
damping rule's eigh); a Cholesky factor (TRAK, explicit influence); TRAK's Woodbury form (features and the
n × n Cholesky factor); the (E)K-FAC factors and damping. A kernel applied by an iterative solver (influence
with ``solver="cg"`` or ``"lissa"``) has no factors; it is materialised as its d × d matrix (d solves at
save time, d ≤ 8192), so the loaded attributor's scores equal the original's to the solver's tolerance.

A store-backed attributor saves a reference to its feature store (its path, identity and row count), not a
copy; :meth:`Attributor.load` reopens it (``store=`` points to a moved store) and verifies its checksums.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "gradsketch-attributor"
VERSION = 1
MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 << 20
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
_FILE = re.compile(r"t[0-9]{1,9}\.bin")
#: fitted attributes handled by the loader itself (not stored as plain attributes)
_SKIP_ATTRS = {"kernels_", "n_train_", "d_", "timings_", "skipped_indices_", "config_", "curvature_"}


class AttributorFileError(ValueError):
    """A saved attributor that cannot be loaded: missing, truncated or edited files, or a manifest whose
    claims disagree with the files (the message names the file, what was expected and what was found)."""


# ------------------------------------------------------------------------------------------- writing
class _Writer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tensors: dict[str, dict] = {}

    def tensor(self, t: Tensor) -> str:
        t = t.detach().to("cpu").contiguous()
        name = next(k for k, v in _DTYPES.items() if v == t.dtype) if t.dtype in _DTYPES.values() else None
        if name is None:
            raise TypeError(f"save: a tensor of dtype {t.dtype} cannot be saved (expected one of {sorted(_DTYPES)})")
        key = f"t{len(self.tensors)}"
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        (self.path / f"{key}.bin").write_bytes(data)
        self.tensors[key] = {"file": f"{key}.bin", "dtype": name, "shape": list(t.shape),
                             "sha256": hashlib.sha256(data).hexdigest()}
        return key


def _plain(v: Any) -> bool:
    """JSON plain data (no tensors, no callables, finite or not)."""
    if v is None or isinstance(v, bool | int | float | str):
        return True
    if isinstance(v, list | tuple):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


def _task_record(task: Any) -> dict:
    from ..store import fingerprint_model

    return {"n_params": int(task.n_params), "param_names": list(task.param_names),
            "param_shapes": [list(s) for s in task.param_shapes], "dtype": str(task.dtype).replace("torch.", ""),
            "model_class": type(task.model).__name__, "fingerprint": fingerprint_model(task.model)}


def _kernel_record(w: _Writer, kernel: Any, comp_kfac: str | None) -> dict:
    from ..curvature.kfac import _PowerOperator
    from ..linalg import CholeskyInverse, EigenOperator, MatrixOperator
    from ..linalg.operator import WoodburyInverse

    if kernel is None:
        return {"type": "identity"}
    if isinstance(kernel, EigenOperator):
        return {"type": "eigen", "w": w.tensor(kernel.w), "V": None if kernel.V is None else w.tensor(kernel.V),
                "shift": float(getattr(kernel, "shift", 0.0) or 0.0)}
    if isinstance(kernel, CholeskyInverse):
        return {"type": "cholesky", "L": w.tensor(kernel.L)}
    if isinstance(kernel, WoodburyInverse):
        return {"type": "woodbury", "F": w.tensor(kernel.F), "L": w.tensor(kernel.L), "damping": kernel.damping}
    if isinstance(kernel, _PowerOperator) and comp_kfac is not None:
        return {"type": "kfac", "p": float(kernel.p), "damping": float(kernel.damping)}
    if isinstance(kernel, MatrixOperator):
        return {"type": "dense", "A": w.tensor(kernel.A)}
    d = int(kernel.shape[0])
    if d > 8192:
        raise ValueError(f"save: the kernel {type(kernel).__name__} is applied by an iterative solver and would be "
                         f"saved as its {d}×{d} matrix; expected d <= 8192: use a sketch (smaller d) or "
                         "solver='explicit'")
    A = kernel.to_dense().detach().to("cpu", torch.float64)
    return {"type": "dense", "A": w.tensor(0.5 * (A + A.T)), "from": type(kernel).__name__}


def save_attributor(attr: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the fitted ``attr`` to the directory ``path`` (see the module docstring); returns the path."""
    from ..store import GradientStore
    from ._features import ProjectionSketch

    if not getattr(attr, "_fitted", False):
        raise RuntimeError(f"{type(attr).__name__}: call fit(train_data) before save()")
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: expected a directory (or a path to create one), got the file {str(path)!r}")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MANIFEST).is_file() or not overwrite:
            raise FileExistsError(f"path: {str(path)!r} is not empty; expected a new or empty directory (or a saved "
                                  "attributor with overwrite=True)")
        for f in path.iterdir():
            if f.name == MANIFEST or _FILE.fullmatch(f.name):
                f.unlink()
    path.mkdir(parents=True, exist_ok=True)
    attr._check_fitted()
    w = _Writer(path)
    comps = []
    for comp in attr._components:
        sk = comp.sketch
        rec: dict[str, Any] = {"index": comp.index, "weight": comp.weight, "fingerprint": comp.fingerprint,
                               "sketch": {"spec": _sketch_spec_json(sk)}}
        if isinstance(sk, ProjectionSketch):
            rec["sketch"]["V"] = w.tensor(sk.V)
            rec["sketch"]["append_identity"] = bool(getattr(sk, "append_identity", False))
        if comp.state is not None:
            rec["state"] = {k: w.tensor(v) for k, v in comp.state.items()}
        if isinstance(comp.feats, GradientStore):
            st = comp.feats
            rec["feats"] = {"store": str(Path(st.path).resolve()), "name": Path(st.path).name, "n_rows": st.n_rows,
                            "d": st.d, "dtype": st.dtype, "fingerprint": st.fingerprint, "spec": st.spec}
        else:
            rec["feats"] = {"tensor": w.tensor(comp.feats)}
        rec["q"] = None if comp.q is None else w.tensor(comp.q)
        rs = comp.info.get("row_scale")   # TRAK ggn_trace: the Gram-form kernel's row scales (scoring shortcut)
        if rs is not None:
            rec["row_scale"] = w.tensor(rs)
        kfac = comp.info.get("kfac")
        if kfac is not None:
            state = kfac.state_dict()
            rec["kfac"] = {"meta": state["meta"], "tensors": {k: w.tensor(v) for k, v in state["tensors"].items()},
                           "damping": float(comp.info["damping"])}
        rec["kernel"] = _kernel_record(w, comp.kernel, "kfac" if kfac is not None else None)
        rec["info"] = {k: v for k, v in comp.info.items() if k in ("ridge", "damping_abs", "factors") and _plain(v)}
        comps.append(rec)
    attrs, tensor_attrs = {}, {}
    for k, v in vars(attr).items():
        if not k.endswith("_") or k.startswith("_") or k in _SKIP_ATTRS:
            continue
        if isinstance(v, Tensor):
            tensor_attrs[k] = w.tensor(v)
        elif _plain(v):
            attrs[k] = v
    sketch_opt = attr.sketch if attr.sketch is None or _plain(attr.sketch) else "object"
    options = {k: v for k, v in attr.options.items() if _plain(v)}
    manifest = {
        "format": FORMAT, "version": VERSION, "method": attr.method, "class": type(attr).__name__,
        "mode": attr.mode, "sketch": sketch_opt, "options": options,
        "options_not_saved": sorted(k for k in attr.options if k not in options),
        "row_options": attr.row_options() if _plain(attr.row_options()) else None,
        "store": None if attr.store is None else str(Path(attr.store).resolve()),
        "task": _task_record(attr.task), "fit_fingerprint": attr._fit_fingerprint,
        "n_train": int(attr.n_train_), "d": int(attr.d_), "skipped_indices": list(attr.skipped_indices_),
        "shared_q": None if attr._shared_q is None else w.tensor(attr._shared_q),
        "attributes": attrs, "tensor_attributes": tensor_attrs, "components": comps, "tensors": w.tensors,
    }
    from ..store import _io

    manifest["checksum"] = manifest_checksum(manifest)
    _io.atomic_write(path / MANIFEST, _io.dumps(manifest))
    return path


def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its ``checksum`` key: an edited manifest is refused
    (a check against accidents; a deliberate edit can recompute it, so every field is validated as well)."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sketch_spec_json(sketch: Any) -> Any:
    from ._features import sketch_spec

    spec = sketch_spec(sketch)
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------- reading
class _Reader:
    def __init__(self, path: Path, table: Any) -> None:
        self.path = path
        if not isinstance(table, dict):
            raise AttributorFileError(f"{path / MANIFEST}: 'tensors' must be an object, got {type(table).__name__}")
        self.table = table

    def tensor(self, key: Any, what: str, shape: tuple | None = None, dtype: Any = None) -> Tensor:
        """The tensor ``key`` (``what`` names it in messages); ``shape``: the expected shape (None entries: any)."""
        rec = self.table.get(key) if isinstance(key, str) else None
        if not isinstance(rec, dict):
            raise AttributorFileError(f"{self.path / MANIFEST}: {what}: expected a reference to a listed tensor, got "
                                      f"{key!r}")
        f, dt, shp, sha = rec.get("file"), rec.get("dtype"), rec.get("shape"), rec.get("sha256")
        if not isinstance(f, str) or not _FILE.fullmatch(f):
            raise AttributorFileError(f"{self.path / MANIFEST}: {what}: expected a file name t<i>.bin, got {f!r}")
        if dt not in _DTYPES:
            raise AttributorFileError(f"{self.path / f}: {what}: expected a dtype in {sorted(_DTYPES)}, got {dt!r}")
        if not isinstance(shp, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                for s in shp) or len(shp) > 8:
            raise AttributorFileError(f"{self.path / f}: {what}: expected a shape of non-negative integers, got "
                                      f"{shp!r}")
        if shape is not None:
            if len(shape) != len(shp) or any(e is not None and e != s for e, s in zip(shape, shp)):
                want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
                raise AttributorFileError(f"{self.path / f}: {what}: expected shape {want}, the manifest claims {shp}")
        if dtype is not None and _DTYPES[dt] not in (dtype if isinstance(dtype, tuple) else (dtype,)):
            raise AttributorFileError(f"{self.path / f}: {what}: expected dtype {dtype}, the manifest claims {dt}")
        tdt = _DTYPES[dt]
        numel = math.prod(shp)
        size = numel * torch.empty((), dtype=tdt).element_size()
        p = self.path / f
        if p.is_symlink() or not p.is_file():
            raise AttributorFileError(f"{p}: {what}: expected a regular file, found none")
        actual = p.stat().st_size
        if actual != size:
            raise AttributorFileError(f"{p}: {what}: expected {size} bytes ({dt} of shape {shp}), found {actual} "
                                      "(truncated or edited file)")
        data = p.read_bytes()
        if len(data) != size:
            raise AttributorFileError(f"{p}: {what}: expected {size} bytes, read {len(data)}")
        if hashlib.sha256(data).hexdigest() != sha:
            raise AttributorFileError(f"{p}: {what}: the sha256 of the file differs from the manifest's (edited or "
                                      "corrupted file)")
        if numel == 0:
            return torch.empty(shp, dtype=tdt)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(tdt).reshape(shp).clone()


def _fail(path: Path, msg: str) -> AttributorFileError:
    return AttributorFileError(f"{path / MANIFEST}: {msg}")


def _get(d: Any, key: str, types: Any, path: Path, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _fail(path, f"{where}: expected the key {key!r}, found none")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                                         else (types,))):
        raise _fail(path, f"{where}.{key}: expected {types}, got {type(v).__name__}")
    return v


def check_task(rec: dict, task: Any, path: Path) -> None:
    """The saved task record against ``task``: ``ValueError`` naming what was expected and what arrived."""
    from ..store import fingerprint_model

    here = _task_record(task)
    if rec.get("n_params") != here["n_params"]:
        raise ValueError(f"task: the attributor at {str(path)!r} was fitted on a model with {rec.get('n_params')} "
                         f"selected parameters ({rec.get('model_class')}), this task has {here['n_params']} "
                         f"({here['model_class']}); expected the same model and parameter selection")
    if rec.get("param_names") != here["param_names"] or rec.get("param_shapes") != here["param_shapes"]:
        a = list(zip(rec.get("param_names") or [], rec.get("param_shapes") or []))
        b = list(zip(here["param_names"], here["param_shapes"]))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if list(x) != list(y)), min(len(a), len(b)))
        got = a[first] if first < len(a) else "<none>"
        has = b[first] if first < len(b) else "<none>"
        raise ValueError(f"task: the attributor at {str(path)!r} was fitted on other parameters: parameter {first} "
                         f"expected {got}, this task has {has}; expected the same architecture")
    if rec.get("dtype") != here["dtype"]:
        raise ValueError(f"task: the attributor at {str(path)!r} was fitted in {rec.get('dtype')}, this task's "
                         f"model is {here['dtype']}; expected model.to(torch.{rec.get('dtype')})")
    if rec.get("fingerprint") != fingerprint_model(task.model):
        raise ValueError(f"task: the attributor at {str(path)!r} was fitted on other parameter values (model "
                         f"fingerprint {str(rec.get('fingerprint'))[:19]}..., this model's "
                         f"{here['fingerprint'][:19]}...); expected the fitted weights: load them into the model")


def _rebuild_sketch(rd: _Reader, srec: Any, task: Any, d: int, where: str, path: Path) -> Any:
    from ..sketch.spec import sketch_from_spec
    from ._features import IdentitySketch, ProjectionSketch

    spec = _get(srec, "spec", dict, path, where)
    kind = spec.get("kind")
    N = int(task.n_params)
    if spec.get("n") is not None and spec.get("n") != N:
        raise _fail(path, f"{where}.spec: expected n = task.n_params = {N}, got {spec.get('n')!r}")
    if kind == "identity":
        if d != N:
            raise _fail(path, f"{where}: an identity sketch needs features of width {N}, the features have {d}")
        sk: Any = IdentitySketch(N)
    elif "V" in srec:
        append = srec.get("append_identity", False) is True  # features [Vᵀg, g]: V is [N, d − N]
        k = d - N if append else d
        if k < 1:
            raise _fail(path, f"{where}: a projection with append_identity={append} needs d > {N if append else 0}, "
                              f"got d = {d}")
        V = rd.tensor(srec["V"], f"{where}.V", (N, k), (torch.float32, torch.float64, torch.float16, torch.bfloat16))
        V = V.to(device=task.device, dtype=task.dtype)
        make: Any = ProjectionSketch  # append_identity: the lead's Arnoldi tail (features [Vᵀg, g])
        sk = make(V, tag=str(kind), append_identity=True) if append else make(V, tag=str(kind))
    else:
        if not isinstance(spec.get("d"), int) or spec["d"] != d:
            raise _fail(path, f"{where}.spec: expected d = {d} (the features' width), got {spec.get('d')!r}")
        try:
            sk = sketch_from_spec(spec)
        except Exception as e:  # noqa: BLE001 - any failure of an edited spec is a file error
            raise _fail(path, f"{where}.spec: cannot rebuild the sketch ({type(e).__name__}: {e})") from e
        if hasattr(sk, "to") and task.device.type != "cpu":
            sk = sk.to(task.device)
    if _sketch_spec_json(sk) != spec:
        raise _fail(path, f"{where}.spec: the rebuilt sketch's spec differs from the recorded one")
    if int(sk.d) != d or int(sk.n) != N:
        raise _fail(path, f"{where}: expected a sketch R^{N} -> R^{d}, rebuilt R^{sk.n} -> R^{sk.d}")
    return sk


def _rebuild_kernel(rd: _Reader, krec: Any, d: int, n_train: int, kfac_op: Any, where: str, path: Path) -> Any:
    from ..linalg import CholeskyInverse, EigenOperator, LinearOperator, MatrixOperator
    from ..linalg.operator import WoodburyInverse

    typ = _get(krec, "type", str, path, where)
    f64 = torch.float64
    if typ == "identity":
        return None
    if typ == "eigen":
        shift = krec.get("shift", 0.0)
        if isinstance(shift, bool) or not isinstance(shift, int | float) or not math.isfinite(shift):
            raise _fail(path, f"{where}.shift: expected a finite number, got {shift!r}")
        kw = {"shift": float(shift)} if shift else {}  # M = V diag(w) Vᵀ + shift·I (Arnoldi's tail)
        eig: Any = EigenOperator
        if krec.get("V") is None:
            return eig(rd.tensor(krec.get("w"), f"{where}.w", (d,), f64), **kw)
        V = rd.tensor(krec["V"], f"{where}.V", (d, None), f64)
        return eig(rd.tensor(krec.get("w"), f"{where}.w", (V.shape[1],), f64), V, **kw)
    if typ == "cholesky":
        return CholeskyInverse(rd.tensor(krec.get("L"), f"{where}.L", (d, d), f64))
    if typ == "dense":
        return MatrixOperator(rd.tensor(krec.get("A"), f"{where}.A", (d, d), f64), symmetric=True)
    if typ == "woodbury":
        F = rd.tensor(krec.get("F"), f"{where}.F", (None, d), (torch.float32, f64))
        L = rd.tensor(krec.get("L"), f"{where}.L", (F.shape[0], F.shape[0]), f64)
        damping = _get(krec, "damping", (int, float), path, where)
        if not (math.isfinite(damping) and damping > 0):
            raise _fail(path, f"{where}.damping: expected a finite positive number, got {damping!r}")
        k = WoodburyInverse.__new__(WoodburyInverse)
        k.F, k.L, k.damping = F, L, float(damping)
        LinearOperator.__init__(k, (d, d), f64, "cpu", symmetric=True)
        return k
    if typ == "kfac":
        if kfac_op is None:
            raise _fail(path, f"{where}: a K-FAC kernel needs the component's 'kfac' factors, found none")
        if kfac_op.shape[0] != d:
            raise _fail(path, f"{where}: the K-FAC factors act on R^{kfac_op.shape[0]}, the features have d = {d}")
        damping = _get(krec, "damping", (int, float), path, where)
        p = _get(krec, "p", (int, float), path, where)
        if not (math.isfinite(damping) and damping >= 0) or p != -1.0:
            raise _fail(path, f"{where}: expected p = -1 and a finite damping >= 0, got p = {p!r}, damping = "
                              f"{damping!r}")
        return kfac_op.power(-1.0, float(damping))
    raise _fail(path, f"{where}.type: expected one of ['cholesky', 'dense', 'eigen', 'identity', 'kfac', "
                      f"'woodbury'], got {typ!r}")


def load_attributor(path: str | os.PathLike, task: Any, method_class: Any, component_cls: Any, store: Any = None,
                    **options: Any) -> Any:
    """The attributor saved at ``path`` by :meth:`Attributor.save`, for ``task`` (see the module docstring).
    ``method_class(name)`` resolves a registered method, ``component_cls`` is the base's ``Component`` (passed in
    by :meth:`Attributor.load`, so that this module does not import the base)."""
    from ..model import Task
    from ..store import GradientStore

    Component = component_cls
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a directory path, got {type(path).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a gradsketch.Task, got {type(task).__name__}")
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(f"path: expected a directory written by Attributor.save with a {MANIFEST}, found "
                                f"none at {str(path)!r}")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise _fail(path, f"expected at most {_MAX_MANIFEST_BYTES} bytes, found {mpath.stat().st_size}")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e}): truncated or edited") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise _fail(path, f"expected format {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    if m.get("version") != VERSION:
        raise _fail(path, f"expected version {VERSION}, got {m.get('version')!r} (written by another gradsketch)")
    if m.get("checksum") != manifest_checksum(m):
        raise _fail(path, "the manifest's checksum does not match its content (edited or corrupted file)")
    method = _get(m, "method", str, path, "manifest")
    try:
        cls = method_class(method)
    except ValueError as e:
        raise ValueError(f"method: the attributor at {str(path)!r} was fitted with method {method!r}, which is not "
                         f"registered here ({e})") from e
    check_task(_get(m, "task", dict, path, "manifest"), task, path)
    rd = _Reader(path, m.get("tensors"))
    n_train = _get(m, "n_train", int, path, "manifest")
    d = _get(m, "d", int, path, "manifest")
    if n_train < 1 or d < 1:
        raise _fail(path, f"expected n_train >= 1 and d >= 1, got n_train = {n_train}, d = {d}")
    comps_rec = _get(m, "components", list, path, "manifest")
    if not comps_rec:
        raise _fail(path, "components: expected at least one model state, got none")
    saved_opts = _get(m, "options", dict, path, "manifest")
    opts = {**saved_opts, **options}
    sketch_opt = m.get("sketch")
    store_path = store if store is not None else m.get("store")
    mode = _get(m, "mode", str, path, "manifest")
    components = []
    for i, rec in enumerate(comps_rec):
        where = f"components[{i}]"
        if not isinstance(rec, dict):
            raise _fail(path, f"{where}: expected an object, got {type(rec).__name__}")
        state = None
        if rec.get("state") is not None:
            srec = _get(rec, "state", dict, path, where)
            model_sd = task.model.state_dict()
            if set(srec) != set(model_sd):
                raise ValueError(f"task: {where}'s model state has other keys than task.model "
                                 f"(e.g. {sorted(set(srec) ^ set(model_sd))[:3]}); expected the same architecture")
            state = {k: rd.tensor(v, f"{where}.state[{k!r}]", tuple(model_sd[k].shape)) for k, v in srec.items()}
        weight = _get(rec, "weight", (int, float), path, where)
        comp = Component(state, float(weight), i)
        comp.fingerprint = str(rec.get("fingerprint", ""))
        comp.sketch = _rebuild_sketch(rd, rec.get("sketch"), task, d, f"{where}.sketch", path)
        frec = _get(rec, "feats", dict, path, where)
        if "tensor" in frec:
            comp.feats = rd.tensor(frec["tensor"], f"{where}.feats", (n_train, d),
                                   (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        else:
            name = _get(frec, "name", str, path, f"{where}.feats")
            if not re.fullmatch(r"features_[0-9]+", name):
                raise _fail(path, f"{where}.feats.name: expected features_<c>, got {name!r}")
            if store_path is None:
                raise ValueError(f"store: the attributor at {str(path)!r} reads its training features from a store; "
                                 "expected store=<directory holding it>, got none")
            spath = Path(store_path) / name
            if not (spath / "manifest.json").is_file():
                raise FileNotFoundError(f"store: expected the feature store {str(spath)!r} of the saved attributor "
                                        "(pass store= where it now is), found none")
            st = GradientStore.open(spath)
            diff = st.differences(n_rows=n_train, d=d, spec=frec.get("spec"), fingerprint=frec.get("fingerprint"),
                                  dtype=frec.get("dtype"))
            if diff:
                st.close()
                shown = "; ".join(f"{k}: expected {v[0]!r}, found {v[1]!r}" for k, v in sorted(diff.items()))
                raise ValueError(f"store: the feature store {str(spath)!r} is not the one the attributor was saved "
                                 f"with ({shown})")
            if not st.is_complete:
                st.close()
                raise ValueError(f"store: the feature store {str(spath)!r} is incomplete (missing chunks "
                                 f"{st.missing_chunks()[:5]}); expected the complete store the fit used")
            st.verify()
            comp.feats = st
        q = rec.get("q")
        comp.q = None if q is None else rd.tensor(q, f"{where}.q", (n_train,))
        if rec.get("row_scale") is not None:
            rs = rd.tensor(rec["row_scale"], f"{where}.row_scale", (n_train,), torch.float64)
            if not bool(torch.isfinite(rs).all()) or bool((rs < 0).any()):
                raise _fail(path, f"{where}.row_scale: expected finite scales ≥ 0, found others")
            comp.info["row_scale"] = rs
        kfac_op = None
        if rec.get("kfac") is not None:
            from ..curvature.kfac import KFACOperator

            krec = _get(rec, "kfac", dict, path, where)
            tens = _get(krec, "tensors", dict, path, f"{where}.kfac")
            state_k = {"meta": _get(krec, "meta", dict, path, f"{where}.kfac"),
                       "tensors": {k: rd.tensor(v, f"{where}.kfac[{k!r}]", None, torch.float64)
                                   for k, v in tens.items()}}
            try:
                kfac_op = KFACOperator.from_state_dict(task, state_k)
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
                raise _fail(path, f"{where}.kfac: cannot rebuild the factors ({type(e).__name__}: {e})") from e
            comp.info.update(kfac=kfac_op, damping=float(_get(krec, "damping", (int, float), path, f"{where}.kfac")))
        comp.kernel = _rebuild_kernel(rd, rec.get("kernel"), d, n_train, kfac_op, f"{where}.kernel", path)
        info = rec.get("info") or {}
        if isinstance(info, dict):
            comp.info.update({k: v for k, v in info.items() if _plain(v)})
        components.append(comp)
    # the sketch option as given at fit time: a dict (rebuilt the same way) or, for an object, the rebuilt one
    obj = cls(task, method=method, sketch=components[0].sketch if sketch_opt == "object" else sketch_opt,
              store=store_path, mode=mode, **opts)
    for comp in components:
        if comp.state is None:
            comp.task = obj.feature_task()
    recorded_rows = m.get("row_options")
    if isinstance(recorded_rows, dict) and _plain(obj.row_options()) and recorded_rows != obj.row_options():
        diffs = [f"{k}: saved {recorded_rows.get(k)!r}, now {obj.row_options().get(k)!r}"
                 for k in sorted(set(recorded_rows) | set(obj.row_options()))
                 if recorded_rows.get(k) != obj.row_options().get(k)]
        raise ValueError(f"options: the loaded attributor would compute test features differently from the saved "
                         f"one ({'; '.join(diffs)}); pass the options it was fitted with (e.g. margin_fn=)")
    obj._components = components
    obj._shared_q = None if m.get("shared_q") is None else rd.tensor(m["shared_q"], "shared_q", (n_train,))
    for k, v in (m.get("attributes") or {}).items():
        if isinstance(k, str) and k.endswith("_") and not k.startswith("_") and k not in _SKIP_ATTRS and _plain(v):
            setattr(obj, k, v)
    for k, v in (m.get("tensor_attributes") or {}).items():
        if isinstance(k, str) and k.endswith("_") and not k.startswith("_") and k not in _SKIP_ATTRS:
            setattr(obj, k, rd.tensor(v, f"attribute {k}"))
    if components[-1].info.get("kfac") is not None:
        obj.curvature_ = components[-1].info["kfac"]  # type: ignore[attr-defined]
    obj.kernels_ = [c.kernel for c in components]
    obj.n_train_, obj.d_ = n_train, d
    obj.skipped_indices_ = [int(i) for i in (m.get("skipped_indices") or []) if isinstance(i, int)]
    obj.timings_ = {}
    obj._fit_fingerprint = str(m.get("fit_fingerprint"))
    obj._fitted = True
    for comp in components:
        if comp.n_rows != n_train:
            raise _fail(path, f"components[{comp.index}]: expected {n_train} training rows, found {comp.n_rows}")
    obj._check_fitted()
    return obj


__all__ = ["manifest_checksum", "AttributorFileError", "save_attributor", "load_attributor", "check_task"]
