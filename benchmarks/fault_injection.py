"""Fault injection for the gradient store and attribution (issue 12): does anything give a wrong answer silently?

Parts (each prints its table; ``--out FILE`` writes them all as markdown):

* kills: a fit in a child process is SIGKILLed at random moments and resumed until it completes; the final
  store must equal an uninterrupted run byte for byte (data, markers, manifest).
* corruptions: damage a copy of a finished store (flipped bytes, truncation, deleted/FIFO/symlinked files,
  rows and markers swapped in from another model's store, edited manifests, relabelled data); count the
  damage detected and named (``check_store`` or the fit refuses), and recovered (``repair_store`` + the same
  fit again gives the reference bytes, recomputing only the damaged chunks).
* concurrent: several processes fill one fresh store at once; the result must equal the reference.
* bad inputs: bad options to the Attributor, the store and the CLI's config; each must be a clear error
  (ValueError/TypeError or a usage error with exit status 2 naming the argument), never a silent result.
* fingerprint overhead: featurising with the per-chunk data fingerprint against the same run without it.

usage: python benchmarks/fault_injection.py [--quick] [--seed S] [--out benchmarks/results/reliability.md]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gradsketch.attribution import Attributor, _features  # noqa: E402
from gradsketch.store import GradientStore  # noqa: E402
from gradsketch.store.repair import check_store, repair_store  # noqa: E402

CHILD = ROOT / "tests" / "_attribution_child.py"
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)  # type: ignore[union-attr]


def files(path: Path) -> dict[str, bytes]:
    """Every file of a store (data, markers, manifest) by relative path, hidden lock/temp files excluded."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


# ------------------------------------------------------------------------------------------------ kills
def run_child(store: Path, sleep: float, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(store), str(sleep), *extra], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(store: Path) -> int:
    d = store / "features_0" / "chunks"
    return len([p for p in d.iterdir() if p.name.endswith(".json") and not p.name.startswith(".")]) \
        if d.is_dir() else 0


def kills(ref: dict[str, bytes], tmp: Path, rng: random.Random, trials: int, max_kills: int) -> dict:
    """Each run: start the fit, wait until a random number of further chunks is complete plus a random
    0-100 ms (so kills land before, inside and between chunk writes), SIGKILL, repeat; then let it finish."""
    n_chunks = child.N // child.CHUNK
    n_kills = survived = identical = 0
    t0 = time.perf_counter()
    for t in range(trials):
        store = tmp / f"kill{t}"
        k = 0
        while True:
            start = _done(store)
            p = run_child(store, 0.02)
            if k < max_kills and start < n_chunks:
                target = start + rng.randrange(0, max(1, (n_chunks - start) // 2))
                while p.poll() is None and _done(store) < target:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.1))
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait(timeout=60)
                    k += 1
                    continue
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"child failed: {err[-2000:]}")
            break
        n_kills += k
        got = files(store / "features_0")
        ok = check_store(store / "features_0").ok
        survived += k if ok else 0
        identical += k if got == ref else 0
    return {"runs": trials, "kills": n_kills, "survived": survived, "byte_identical": identical,
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ corruptions
def _chunk_offset(path: Path, c: int) -> int:
    st = GradientStore.open(path)
    try:
        return st._offset + st.chunk_range(c)[0] * st.d * st.itemsize
    finally:
        st.close()


def _flip(path: Path, c: int, rng: random.Random) -> set[int]:
    off = _chunk_offset(path, c) + rng.randrange(child.CHUNK * 16 * 4)
    with open(path / "data.npy", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ (1 << rng.randrange(8))]))
    return {c}


def _edit_manifest(path: Path, **fields) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(fields)
    (path / "manifest.json").write_text(json.dumps(m))


def corruption_cases(other: Path, rng: random.Random, n_flips: int):
    """(name, apply(path) -> damaged chunks | "all" | "manifest") pairs."""
    n_chunks = child.N // child.CHUNK
    cases = []
    for _ in range(n_flips):
        c = rng.randrange(n_chunks)
        cases.append((f"flip one bit (chunk {c})", lambda p, c=c: _flip(p, c, rng)))

    def truncate_data(p):
        size = (p / "data.npy").stat().st_size
        os.truncate(p / "data.npy", size - 1000)
        return "all"

    def truncate_marker(p):
        m = p / "chunks" / "000004.json"
        m.write_bytes(m.read_bytes()[:40])
        return {4}

    def delete_marker(p):
        (p / "chunks" / "000005.json").unlink()
        return {5}

    def delete_chunks(p):
        shutil.rmtree(p / "chunks")
        return "all"

    def fifo_data(p):
        (p / "data.npy").unlink()
        os.mkfifo(p / "data.npy")
        return "all"

    def fifo_marker(p):
        (p / "chunks" / "000002.json").unlink()
        os.mkfifo(p / "chunks" / "000002.json")
        return {2}

    def symlink_data(p):
        outside = p.parent / f"{p.parent.name}-outside.npy"
        os.replace(p / "data.npy", outside)
        os.symlink(outside, p / "data.npy")
        return "all"

    def swap_store_files(p):
        shutil.copy(other / "data.npy", p / "data.npy")
        shutil.rmtree(p / "chunks")
        shutil.copytree(other / "chunks", p / "chunks")
        return set(range(n_chunks))

    def swap_one_chunk(p):
        c, off = 7, _chunk_offset(p, 7)
        nbytes = child.CHUNK * 16 * 4
        with open(other / "data.npy", "rb") as f:
            f.seek(off)
            rows = f.read(nbytes)
        with open(p / "data.npy", "r+b") as f:
            f.seek(off)
            f.write(rows)
        shutil.copy(other / "chunks" / f"{c:06d}.json", p / "chunks" / f"{c:06d}.json")
        return {c}

    def move_marker(p):
        os.replace(p / "chunks" / "000001.json", p / "chunks" / "000003.json")
        return {1, 3}

    def edit_n_chunks(p):
        _edit_manifest(p, n_chunks=n_chunks - 1)
        return "manifest"

    def absolute_data_file(p):
        shutil.copy(p / "data.npy", p.parent / "elsewhere.npy")
        _edit_manifest(p, data_file=str(p.parent / "elsewhere.npy"))
        return "manifest"

    def delete_manifest(p):
        (p / "manifest.json").unlink()
        return "manifest"

    cases += [("truncate data.npy", truncate_data), ("truncate a marker", truncate_marker),
              ("delete a marker", delete_marker), ("delete chunks/", delete_chunks),
              ("FIFO in place of data.npy", fifo_data), ("FIFO in place of a marker", fifo_marker),
              ("data.npy a symlink to a file outside", symlink_data),
              ("data.npy + chunks/ of another model's store", swap_store_files),
              ("one chunk's rows + marker from another model's store", swap_one_chunk),
              ("marker renamed to another chunk", move_marker), ("manifest n_chunks edited", edit_n_chunks),
              ("manifest data_file absolute", absolute_data_file), ("manifest deleted", delete_manifest)]
    return cases


def _copy_special(src: str, dst: str) -> None:
    """copy2, but a FIFO is recreated as a FIFO (the damage is copied, not read)."""
    import stat

    if stat.S_ISFIFO(os.lstat(src).st_mode):
        os.mkfifo(dst)
    else:
        shutil.copy2(src, dst)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int):
    def raise_(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, raise_)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def fit_counting(task, data, root: Path, **opts) -> tuple[list[int], BaseException | None]:
    """Fit into ``root``; the rows featurised and the exception raised (None if it fitted)."""
    seen: list[int] = []
    real = _features._rows

    def counting(task_, batch, sketch, mode, nan_policy, offset, name, *a, **k):
        r = real(task_, batch, sketch, mode, nan_policy, offset, name, *a, **k)
        seen.extend(range(offset, offset + r.shape[0]))
        return r

    _features._rows = counting
    try:
        with alarm(120):
            a = child.attributor(task, root, **opts)
            a.fit(data, progress=False)
            _features._rows = real  # scoring featurises the test batch: not counted
            a.score(data[:1], progress=False)
    except (Exception, _Timeout) as e:  # noqa: BLE001 - classified by the caller
        return seen, e
    finally:
        _features._rows = real
    return seen, None


def corruptions(task, data, ref_root: Path, other: Path, tmp: Path, rng: random.Random, n_flips: int) -> tuple[
        dict, list[dict]]:
    ref = files(ref_root / "features_0")
    rows = []
    for name, apply in corruption_cases(other, rng, n_flips):
        root = tmp / f"c{len(rows)}"
        shutil.copytree(ref_root, root)
        store = root / "features_0"
        damaged = apply(store)
        # 1. detection without the data: check_store (what `gradsketch store verify` prints)
        try:
            with alarm(60):
                report = check_store(store)
            found = set(report.corrupt) | (set(report.missing) if damaged not in ("all", "manifest") else set())
            detected = (not report.ok) or (damaged != "manifest" and isinstance(damaged, set)
                                           and damaged <= set(report.missing))
            named = detected and (report.store_error is not None or (isinstance(damaged, set) and damaged <= found))
        except (FileNotFoundError, _Timeout) as e:  # manifest deleted: "no gradsketch store at ..."
            detected = named = not isinstance(e, _Timeout)
        # 2. what a fit does with the damaged store (before any repair): refuse, recompute, or silently wrong
        shutil.copytree(root, tmp / f"fit{len(rows)}", symlinks=True, copy_function=_copy_special)
        seen, err = fit_counting(task, data, tmp / f"fit{len(rows)}")
        fit_files = files(tmp / f"fit{len(rows)}" / "features_0") if (tmp / f"fit{len(rows)}" / "features_0"
                                                                      / "manifest.json").exists() else {}
        if err is None:
            fit_outcome = "recomputed, correct" if fit_files == ref else "SILENTLY WRONG"
        else:
            fit_outcome = f"refused ({type(err).__name__})"
        # 3. recovery: repair_store (chunk-level) or delete + refit (store-level manifest damage)
        with alarm(60):
            rep = repair_store(store) if (store / "manifest.json").exists() else None
        if rep is None or not rep.ok:
            shutil.rmtree(root)
            how = "delete + refit"
        else:
            how = "repair + refit"
        seen, err = fit_counting(task, data, root)
        recovered = err is None and files(store) == ref
        expect = set() if damaged in ("all", "manifest") else {r for c in damaged for r in
                                                              range(c * child.CHUNK, (c + 1) * child.CHUNK)}
        only_damaged = recovered and (damaged in ("all", "manifest") or set(seen) == expect)
        rows.append(dict(case=name, detected=detected, named=named, fit=fit_outcome, recovery=how,
                         recovered=recovered, recomputed=len(set(seen)), only_damaged=only_damaged))
    # relabelled training data on reuse: the fit refuses naming the chunk
    root = tmp / "relabel"
    shutil.copytree(ref_root, root)
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    y[[45, 130]] = (y[[45, 130]] + 1) % 3
    relab = [(X[s:s + child.BATCH], y[s:s + child.BATCH]) for s in range(0, child.N, child.BATCH)]
    _, err = fit_counting(task, relab, root)
    msg = str(err) if err is not None else ""
    ok = err is not None and "chunk 2 (examples 40:60)" in msg and "chunk 6 (examples 120:140)" in msg
    fresh = tmp / "relabel-fresh"
    child.attributor(task, fresh).fit(relab, progress=False)
    seen, err2 = fit_counting(task, relab, root, on_data_change="refeaturise")
    recovered = err2 is None and files(root / "features_0") == files(fresh / "features_0")
    rows.append(dict(case="relabelled examples 45 and 130, same store path", detected=ok, named=ok,
                     fit=f"refused ({type(err).__name__})" if err is not None else "SILENTLY WRONG",
                     recovery="on_data_change='refeaturise'", recovered=recovered, recomputed=len(set(seen)),
                     only_damaged=recovered and sorted(set(seen)) == [*range(40, 60), *range(120, 140)]))
    summary = {"tried": len(rows), "detected": sum(bool(r["detected"]) for r in rows),
               "named": sum(bool(r["named"]) for r in rows),
               "silently_wrong_fits": sum(r["fit"] == "SILENTLY WRONG" for r in rows),
               "recovered": sum(bool(r["recovered"]) for r in rows if r["recovered"] is not None),
               "recoverable": sum(r["recovered"] is not None for r in rows),
               "chunk_level": sum(r["recovery"] != "delete + refit" and r["recomputed"] != child.N for r in rows),
               "chunk_level_only_damaged": sum(bool(r["only_damaged"]) for r in rows
                                               if r["recovery"] != "delete + refit" and r["recomputed"] != child.N)}
    return summary, rows


# ------------------------------------------------------------------------------------------------ concurrent
def concurrent(ref: dict[str, bytes], tmp: Path, rounds: int, writers: int) -> dict:
    identical = 0
    for r in range(rounds):
        store = tmp / f"conc{r}"
        go = tmp / f"go{r}"
        procs = [run_child(store, 0.01, ("--go", str(go))) for _ in range(writers)]
        for p in procs:  # all started and ready, then released together
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"writer not ready: {line!r} {p.stderr.read() if p.stderr else ''}")
        go.write_text("go")
        for p in procs:
            _, err = p.communicate(timeout=600)
            if p.returncode != 0:
                raise RuntimeError(f"writer failed: {err[-2000:]}")
        identical += files(store / "features_0") == ref and check_store(store / "features_0").ok
    return {"rounds": rounds, "writers": writers, "byte_identical": identical}


# ------------------------------------------------------------------------------------------------ bad inputs
def bad_inputs(task, data, tmp: Path) -> tuple[dict, list[dict]]:
    from typer.testing import CliRunner

    from gradsketch.cli import app
    from gradsketch.store import fill_stream

    sk = dict(kind="sjlt", d=16, seed=0)

    def att(**kw):
        return lambda: Attributor(task, kw.pop("method", "grad-dot"), sketch=kw.pop("sketch", sk),
                                  store=tmp / "bad", **kw).fit(data[:2], progress=False)

    from torch.utils.data import DataLoader, TensorDataset
    X = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    shuffled = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True)
    api = [
        ("Attributor chunk_rows=0", att(chunk_rows=0), "chunk_rows"),
        ("Attributor chunk_rows=2.5", att(chunk_rows=2.5), "chunk_rows"),
        ("Attributor store_dtype='int8'", att(store_dtype="int8"), "store_dtype"),
        ("Attributor damping=nan (influence)", att(method="influence", damping=float("nan")), "damping"),
        ("Attributor damping=-1 (influence)", att(method="influence", damping=-1.0), "damping"),
        ("Attributor nan_policy='ignore'", att(nan_policy="ignore"), "nan_policy"),
        ("Attributor method='foo'", att(method="foo"), "method"),
        ("Attributor sketch d='abc'", att(sketch=dict(kind="sjlt", d="abc")), "d"),
        ("fit on DataLoader(shuffle=True)", lambda: Attributor(task, "grad-dot", sketch=sk, store=tmp / "shuf")
         .fit(shuffled, progress=False), "train_data"),
        ("store path is a regular file", lambda: (tmp.joinpath("afile").write_text("x"), Attributor(
            task, "grad-dot", sketch=sk, store=tmp / "afile").fit(data[:2], progress=False)), "store"),
        ("GradientStore chunk_rows=0", lambda: GradientStore.create_or_open(tmp / "g0", 10, 4, {}, "f",
                                                                            chunk_rows=0), "chunk_rows"),
        ("GradientStore dtype='int8'", lambda: GradientStore.create_or_open(tmp / "g1", 10, 4, {}, "f",
                                                                            dtype="int8"), "dtype"),
        ("fill_stream on_data_change='x'", lambda: fill_stream(GradientStore.create_or_open(
            tmp / "g2", 10, 4, {}, "f"), [], len, None, on_data_change="x"), "on_data_change"),
    ]
    cli = [
        ("config: malformed JSON", "c.json", '{"k": 3,', "config"),
        ("config: malformed TOML", "c.toml", 'k = = 3', "config"),
        ("config: missing file", None, None, "config"),
        ("config: k = 2.7", "c.toml", "k = 2.7", "k"),
        ("config: d = 'abc'", "c.toml", 'd = "abc"', "d"),
        ("config: method = 5", "c.toml", "method = 5", "method"),
        ("config: damping NaN (JSON)", "c.json", '{"damping": NaN}', "damping"),
        ("config: damping = -1", "c.toml", "damping = -1.0", "damping"),
        ("config: unknown key", "c.toml", "kk = 3", "config"),
        ("config: a list, not a table", "c.json", "[1, 2]", "config"),
        ("config: self_influence = 'yes'", "c.toml", 'self_influence = "yes"', "self_influence"),
        ("flag: --k 2.7", None, "--k 2.7", "k"),
    ]
    rows = []
    for name, fn, arg in api:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                fn()
        except (ValueError, TypeError) as e:
            msg = str(e)
            named = msg.startswith(f"{arg}:") or f" {arg}:" in msg or f"{arg}=" in msg or f"'{arg}'" in msg
            outcome = "clear error" if named else f"error not naming {arg}"
            rows.append(dict(case=name, outcome=outcome, message=" ".join(msg.split())[:160]))
            continue
        except Exception as e:  # noqa: BLE001
            rows.append(dict(case=name, outcome=f"other error ({type(e).__name__})", message=str(e)[:160]))
            continue
        rows.append(dict(case=name, outcome="SILENTLY ACCEPTED", message=""))
    runner = CliRunner()
    for name, fname, text, arg in cli:
        args = ["attribute", "nowhere_module:make", "--out", str(tmp / "cli"), "--no-progress"]
        if name.startswith("flag"):
            args += text.split()
        else:
            path = tmp / (fname or "missing.toml")
            if fname:
                path.write_text(text)
            args += ["--config", str(path)]
        r = runner.invoke(app, args)
        out = " ".join(r.output.split())
        named = f"{arg}:" in out or f"--{arg.replace('_', '-')}" in out
        if r.exit_code == 2 and "Traceback" not in r.output and named:
            outcome = "clear error"
        elif r.exit_code == 2 and "nowhere_module" in out:
            outcome = "SILENTLY ACCEPTED (reached the entry point)"
        else:
            outcome = f"exit {r.exit_code}"
        rows.append(dict(case=name, outcome=outcome, message=out[-160:]))
    summary = {"tried": len(rows), "clear_error": sum(r["outcome"] == "clear error" for r in rows),
               "unclear_error": sum(r["outcome"] != "clear error" and not r["outcome"].startswith("SILENTLY")
                                    for r in rows),
               "silently_wrong": sum(r["outcome"].startswith("SILENTLY") for r in rows)}
    return summary, rows


# ------------------------------------------------------------------------------------------------ overhead
def fingerprint_overhead(tmp: Path, repeats: int) -> dict:
    """Featurise an MLP 784-256-10 (4,096 examples, batches of 256, sjlt d = 1024) into a store with and
    without the per-chunk data fingerprint, alternating; the median time ratio."""
    import importlib

    from gradsketch.model import Task

    fill_mod = importlib.import_module("gradsketch.store.fill")  # (gradsketch.store.fill is also a function)

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(4096, 784, generator=g), torch.randint(0, 10, (4096,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    task = Task(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    data = [(X[s:s + 256], y[s:s + 256]) for s in range(0, 4096, 256)]
    real = fill_mod.batch_leaves
    times: dict[str, list[float]] = {"with": [], "without": []}
    for r in range(repeats):
        for variant in (("with", "without") if r % 2 == 0 else ("without", "with")):
            fill_mod.batch_leaves = real if variant == "with" else (lambda item: None)
            path = tmp / f"ovh-{variant}-{r}"
            t0 = time.perf_counter()
            Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=1024, seed=0), store=path,
                       chunk_rows=512).featurise(data, progress=False)
            times[variant].append(time.perf_counter() - t0)
            shutil.rmtree(path)
    fill_mod.batch_leaves = real
    # the hash alone, on the same batches
    from gradsketch.model._batch import SplitBatch

    h = fill_mod._ChunkHash()
    t0 = time.perf_counter()
    for b in data:
        sp = SplitBatch(b)
        h.update(fill_mod.batch_leaves(sp), 0, sp.size)
    h.hexdigest()
    t_hash = time.perf_counter() - t0
    mb = sum(t.numel() * t.element_size() for b in data for t in b) / 2**20
    w, wo = float(np.median(times["with"])), float(np.median(times["without"]))
    return {"with_s": w, "without_s": wo, "ratio": w / wo, "hash_s": t_hash, "hash_MiB": mb,
            "hash_MiB_per_s": mb / t_hash, "hash_share": t_hash / wo, "repeats": repeats}


# ------------------------------------------------------------------------------------------------ main
def table(rows: list[dict]) -> list[str]:
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in keys) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer kills, flips and rounds (a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--parts", default="kills,corruptions,concurrent,bad,overhead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    parts = set(args.parts.split(","))
    lines = ["# Reliability: fault injection into the gradient store and attribution", "",
             f"Machine: {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
             f"{os.getloadavg()[0]:.1f} at the start; seed {args.seed}{', quick' if args.quick else ''}. "
             f"Command: `python benchmarks/fault_injection.py{' --quick' if args.quick else ''} --seed {args.seed}`.",
             "", f"Store under test: the tiny task of tests/_attribution_child.py ({child.N} examples, batches "
             f"of {child.BATCH}, chunks of {child.CHUNK} rows, sjlt d = 16, float32 rows, grad-dot).", ""]
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gs-faults-") as d:
        tmp = Path(d)
        task, data = child.setup()
        ref_root = tmp / "ref"
        child.attributor(task, ref_root).fit(data, progress=False)
        ref = files(ref_root / "features_0")
        # another model's store of the same shape (for swaps)
        other_task, _ = child.setup()
        with torch.no_grad():
            for p in other_task.model.parameters():
                p.add_(0.1)
        child.attributor(other_task, tmp / "other").fit(data, progress=False)
        if "kills" in parts:
            t0 = time.perf_counter()
            res = kills(ref, tmp, rng, trials=2 if args.quick else 6, max_kills=3 if args.quick else 5)
            results["kills"] = res
            print("kills", res, f"{time.perf_counter() - t0:.0f} s", flush=True)
            lines += ["## Random SIGKILLs during fit", "",
                      "A fit in a child process (the tiny task, 12 chunks) is SIGKILLed once a random number of "
                      "further chunks is complete plus a random 0-100 ms (so kills land before, inside and "
                      f"between chunk writes), then rerun; up to {3 if args.quick else 5} kills per run, "
                      f"{res['runs']} runs ({res['seconds']:.0f} s). A kill counts as survived when the finished "
                      "store verifies, as byte-identical when every file equals an uninterrupted run's.", "",
                      "| kills | store complete and verified | byte-identical to an uninterrupted run |",
                      "|---|---|---|", f"| {res['kills']} | {res['survived']} | {res['byte_identical']} |", ""]
        if "corruptions" in parts:
            t0 = time.perf_counter()
            summ, rows = corruptions(task, data, ref_root, tmp / "other" / "features_0", tmp, rng,
                                     n_flips=2 if args.quick else 6)
            results["corruptions"] = summ
            print("corruptions", summ, f"{time.perf_counter() - t0:.0f} s", flush=True)
            lines += ["## Corruptions", "",
                      "detected: `check_store` (= `gradsketch store verify`) reports it (or, for data changes, the "
                      "fit refuses); named: it names the damaged chunk(s) or file. fit: what `fit` + `score` do "
                      "on the damaged store before any repair. recovered: after `repair_store` (or deleting "
                      "the store when the manifest is damaged) the same fit gives the reference bytes; "
                      "recomputed: rows featurised by that fit; only_damaged: exactly the damaged chunks' rows.",
                      "", *table(rows), "",
                      f"Summary: {summ['tried']} tried, {summ['detected']} detected, {summ['named']} named, "
                      f"{summ['silently_wrong_fits']} silently wrong fits, {summ['recovered']}/"
                      f"{summ['recoverable']} recovered; of the {summ['chunk_level']} chunk-level damages, "
                      f"{summ['chunk_level_only_damaged']} were recovered recomputing only the damaged chunks "
                      "(store-level damage recomputes every chunk).", ""]
        if args.out:
            args.out.write_text("\n".join(lines))
        if "concurrent" in parts:
            t0 = time.perf_counter()
            res = concurrent(ref, tmp, rounds=1 if args.quick else 3, writers=3)
            results["concurrent"] = res
            print("concurrent", res, f"{time.perf_counter() - t0:.0f} s", flush=True)
            lines += ["## Concurrent writers", "",
                      f"{res['writers']} processes fit the same fresh store at once (released together); "
                      f"{res['byte_identical']}/{res['rounds']} rounds byte-identical to the reference.", ""]
        if args.out:
            args.out.write_text("\n".join(lines))
        if "bad" in parts:
            summ, rows = bad_inputs(task, data, tmp)
            results["bad_inputs"] = summ
            print("bad inputs", summ, flush=True)
            lines += ["## Bad inputs", "", *table(rows), "",
                      f"Summary: {summ['tried']} tried, {summ['clear_error']} clear errors naming the argument, "
                      f"{summ['unclear_error']} errors that do not name it, {summ['silently_wrong']} silently "
                      "accepted.", ""]
        if "overhead" in parts:
            res = fingerprint_overhead(tmp, repeats=2 if args.quick else 5)
            results["overhead"] = res
            print("overhead", res, flush=True)
            lines += ["## Cost of the per-chunk data fingerprint", "",
                      f"Featurising an MLP 784-256-10 (4,096 examples, batches of 256, sjlt d = 1024, explicit, "
                      f"float16 store) with and without the fingerprint, alternating, median of {res['repeats']}: "
                      f"{res['with_s']:.2f} s vs {res['without_s']:.2f} s, ratio **{res['ratio']:.3f}**. The hash "
                      f"alone: {res['hash_MiB']:.1f} MiB of batch tensors in {res['hash_s'] * 1e3:.0f} ms "
                      f"({res['hash_MiB_per_s']:.0f} MiB/s), {100 * res['hash_share']:.1f}% of the featurisation.",
                      ""]
    lines += ["Raw: `" + json.dumps(results, default=float) + "`", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
