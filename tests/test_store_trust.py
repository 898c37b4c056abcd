"""Issue 12: the store knows the data it holds (per-chunk data fingerprints, fixed example order), its
files are untrusted (plain files inside the store, markers bound to their store), resume writes the same
bytes as an uninterrupted run, leftovers of dead writers are cleaned, and failures name the store."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import count_featurised_rows
from torch.utils.data import DataLoader, TensorDataset

from gradsketch.model._batch import SplitBatch
from gradsketch.store import (
    CorruptChunkError,
    DataChangedError,
    GradientStore,
    StoreFileError,
    _io,
    check_sequential,
    fill_stream,
)

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

N, D, CR = 23, 4, 5
SPEC = {"kind": "test"}


def data(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


W = torch.randn(3, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


def exact_rows(split, lo, hi, row0):
    """Rows that depend only on each example: x W + y."""
    x, y = split.slice(lo, hi).rebuild()
    return x @ W + y[:, None].double()


def items(X, y, bs):
    return [SplitBatch((X[s:s + bs], y[s:s + bs])) for s in range(0, X.shape[0], bs)]


def fresh(path, chunk_rows=CR, dtype="float32", fp="fp"):
    return GradientStore.create_or_open(path, N, D, SPEC, fp, dtype=dtype, chunk_rows=chunk_rows)


def files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


# ------------------------------------------------------------------------------------------ items 1 and 2
def test_changed_examples_are_refused_naming_chunk_and_examples(tmp_path):
    X, y = data()
    st = fresh(tmp_path / "s")
    fill_stream(st, items(X, y, 4), lambda s: s.size, exact_rows, progress=False)
    before = files(tmp_path / "s")
    y2 = y.clone()
    y2[11] = (y2[11] + 1) % 3  # one relabelled example: chunk 2 = examples 10:15
    X2 = X.clone()
    X2[21] += 1.0  # one replaced input: chunk 4 = examples 20:23
    with pytest.raises(DataChangedError, match=r"chunk 2 \(examples 10:15\), chunk 4 \(examples 20:23\)") as e:
        fill_stream(st, items(X2, y2, 4), lambda s: s.size, exact_rows, progress=False, name="train_data")
    assert e.value.chunks == [2, 4] and e.value.row_ranges == [(10, 15), (20, 23)]
    assert files(tmp_path / "s") == before  # nothing rewritten
    # reordered examples (e.g. a shuffled second pass) are a change too
    perm = torch.arange(N)
    perm[[0, 7]] = perm[[7, 0]]
    with pytest.raises(DataChangedError, match=r"chunk 0 \(examples 0:5\), chunk 1 \(examples 5:10\)"):
        fill_stream(st, items(X[perm], y[perm], 4), lambda s: s.size, exact_rows, progress=False)
    # the same data in other batch sizes: same fingerprints (they do not depend on where batches are cut)
    assert fill_stream(st, items(X, y, 7), lambda s: s.size, exact_rows, progress=False) == []


def test_refeaturise_rewrites_only_the_changed_chunks(tmp_path):
    X, y = data()
    st = fresh(tmp_path / "s")
    fill_stream(st, items(X, y, 4), lambda s: s.size, exact_rows, progress=False)
    y2 = y.clone()
    y2[11] = (y2[11] + 1) % 3
    calls = []

    def rows(split, lo, hi, row0):
        calls.append((row0, row0 + hi - lo))
        return exact_rows(split, lo, hi, row0)

    wrote = fill_stream(st, items(X, y2, 4), lambda s: s.size, rows, progress=False, on_data_change="refeaturise")
    assert wrote == [2] and all(10 <= a < b <= 15 for a, b in calls)
    ref = fresh(tmp_path / "ref")
    fill_stream(ref, items(X, y2, 4), lambda s: s.size, exact_rows, progress=False)
    assert np.asarray(st.array()).tobytes() == np.asarray(ref.array()).tobytes()
    assert st.data_fingerprints() == ref.data_fingerprints()
    st.verify()


def test_random_sampler_is_refused_with_the_fix():
    ds = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
    check_sequential(DataLoader(ds, batch_size=4))
    check_sequential([(torch.zeros(2, 2),)])
    for loader in (DataLoader(ds, batch_size=4, shuffle=True),
                   DataLoader(ds, batch_size=4, sampler=torch.utils.data.RandomSampler(ds))):
        with pytest.raises(ValueError, match=r"train_data: expected the examples in a fixed order, got a "
                                             r"DataLoader with a RandomSampler.*shuffle=False"):
            check_sequential(loader, "train_data")


def test_relabelled_training_data_refused_by_attributor(tmp_path):
    """The issue's case: relabel training examples, refit on the same store path: refused, naming the chunks."""
    task, batches = child.setup()
    batches = batches[:8]  # 80 examples, chunks of 20
    child.attributor(task, tmp_path).fit(batches, progress=False)
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    y[[25, 31]] = (y[[25, 31]] + 1) % 3
    relabelled = [(X[s:s + 10], y[s:s + 10]) for s in range(0, 80, 10)]
    with pytest.raises(DataChangedError, match=r"train_data: .*chunk 1 \(examples 20:40\)") as e:
        child.attributor(task, tmp_path).fit(relabelled, progress=False)
    assert e.value.chunks == [1]


# ------------------------------------------------------------------------------------------ item 12
def test_interrupted_and_resumed_fill_writes_the_same_bytes(tmp_path):
    """rows_fn sees the same pieces (split on the chunk grid) whether or not the run was interrupted; here the
    rows depend on the piece size, as float rounding does in a real batched computation."""
    X, y = data()

    def rows(split, lo, hi, row0):
        return exact_rows(split, lo, hi, row0) + 1e-3 * (hi - lo)

    ref = fresh(tmp_path / "ref", dtype="float16")
    fill_stream(ref, items(X, y, 7), lambda s: s.size, rows, progress=False)
    for k in (1, 2, 3):
        st = fresh(tmp_path / f"k{k}", dtype="float16")
        seen = []

        def dying(split, lo, hi, row0, seen=seen, k=k):
            if row0 >= k * CR:
                raise KeyboardInterrupt
            return rows(split, lo, hi, row0)

        with pytest.raises(KeyboardInterrupt):
            fill_stream(st, items(X, y, 7), lambda s: s.size, dying, progress=False)
        assert st.completed_chunks() == list(range(k))
        fill_stream(st, items(X, y, 7), lambda s: s.size, rows, progress=False)
        assert files(tmp_path / f"k{k}") == files(tmp_path / "ref"), k


def test_resumed_attributor_store_is_byte_identical(tmp_path):
    """A real model, float16 store, batches of 7 that straddle chunk boundaries, interrupted after 2 chunks."""
    from gradsketch.attribution import Attributor
    from gradsketch.model import Task

    task, batches = child.setup()
    X = torch.cat([b[0] for b in batches])[:100]
    y = torch.cat([b[1] for b in batches])[:100]
    data7 = [(X[s:s + 7], y[s:s + 7]) for s in range(0, 100, 7)]
    calls = {"n": 0, "stop": None}

    class Stop(Exception):
        pass

    def loss(m, b):
        calls["n"] += 1
        if calls["stop"] is not None and calls["n"] > calls["stop"]:
            raise Stop
        return torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    dying = Task(task.model, loss)

    def att(path):
        return Attributor(dying, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=0), store=path,
                          store_dtype="float16", chunk_rows=20)

    att(tmp_path / "ref").fit(data7, progress=False)
    calls.update(n=0, stop=6)
    with pytest.raises(Stop):
        att(tmp_path / "cut").fit(data7, progress=False)
    calls["stop"] = None
    cut = GradientStore.open(tmp_path / "cut" / "features_0")
    assert 0 < len(cut.completed_chunks()) < cut.n_chunks
    att(tmp_path / "cut").fit(data7, progress=False)
    assert files(tmp_path / "cut" / "features_0") == files(tmp_path / "ref" / "features_0")


# ------------------------------------------------------------------------------------------ item 7
def _manifest_edit(path, **fields):
    man = path / "manifest.json"
    m = json.loads(man.read_text())
    m.update(fields)
    man.write_text(json.dumps(m))


@pytest.mark.parametrize("data_file", ["ABSOLUTE", "../outside.npy", "sub/../../outside.npy"])
def test_data_file_outside_the_store_is_refused(tmp_path, data_file):
    """The manifest points at a valid file outside the store: fit must not write rows into it."""
    fresh(tmp_path / "s").close()
    outside = tmp_path / "outside.npy"
    shutil.copy(tmp_path / "s" / "data.npy", outside)
    (tmp_path / "s" / "sub").mkdir()
    before = outside.read_bytes()
    _manifest_edit(tmp_path / "s", data_file=str(outside) if data_file == "ABSOLUTE" else data_file)
    with pytest.raises(StoreFileError, match=r"data_file: expected a plain file name inside the store"):
        st = GradientStore.create_or_open(tmp_path / "s", N, D, SPEC, "fp", dtype="float32", chunk_rows=CR)
        st.write_chunk(0, np.ones((CR, D)))
    assert outside.read_bytes() == before


def test_symlinked_data_file_is_refused(tmp_path):
    fresh(tmp_path / "s").close()
    outside = tmp_path / "outside.npy"
    os.replace(tmp_path / "s" / "data.npy", outside)
    before = outside.read_bytes()
    os.symlink(outside, tmp_path / "s" / "data.npy")
    with pytest.raises(StoreFileError, match=r"data.npy: unusable data file .*symbolic link"):
        st = GradientStore.create_or_open(tmp_path / "s", N, D, SPEC, "fp", dtype="float32", chunk_rows=CR)
        st.write_chunk(0, np.ones((CR, D)))
    assert outside.read_bytes() == before


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not hasattr(signal, "SIGALRM"), reason="needs POSIX")
@pytest.mark.parametrize("name", ["data.npy", "manifest.json", "chunks/000000.json"])
def test_fifo_in_place_of_a_store_file_is_refused_not_waited_on(tmp_path, name):
    st = fresh(tmp_path / "s")
    st.write_chunk(0, np.ones((CR, D)))
    st.close()
    os.unlink(tmp_path / "s" / name)
    os.mkfifo(tmp_path / "s" / name)

    def timeout(*_):
        raise TimeoutError("blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(10)
    try:
        if name == "chunks/000000.json":
            with pytest.raises(CorruptChunkError, match=r"chunk 0 .*not a regular file"):
                GradientStore.open(tmp_path / "s").verify()
        else:
            with pytest.raises(StoreFileError, match=rf"{name}: .*FIFO"):
                GradientStore.open(tmp_path / "s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_rows_copied_from_another_store_of_the_same_shape_are_refused(tmp_path):
    """data.npy and chunks/ of another model's store (same shape, valid checksums) do not pass as ours."""
    a, b = fresh(tmp_path / "a", fp="model-a"), fresh(tmp_path / "b", fp="model-b")
    rng = np.random.default_rng(0)
    for st in (a, b):
        for i in range(st.n_chunks):
            st.write_chunk(i, rng.standard_normal((st.chunk_range(i)[1] - st.chunk_range(i)[0], D)))
        st.close()
    shutil.copy(tmp_path / "b" / "data.npy", tmp_path / "a" / "data.npy")
    shutil.rmtree(tmp_path / "a" / "chunks")
    shutil.copytree(tmp_path / "b" / "chunks", tmp_path / "a" / "chunks")
    with pytest.raises(CorruptChunkError, match=r"chunk 0 \(rows 0:5\): chunks/000000.json belongs to another "
                                                r"store") as e:
        GradientStore.open(tmp_path / "a").verify()
    assert e.value.chunks == list(range(5))
    # one marker moved to another index within the same store is refused too
    c = tmp_path / "b" / "chunks"
    os.replace(c / "000001.json", c / "000003.json")
    with pytest.raises(CorruptChunkError, match=r"chunks/000003.json records chunk 1 rows 5:10, expected chunk 3"):
        GradientStore.open(tmp_path / "b").verify()


@pytest.mark.parametrize("edit,match", [
    (dict(n_chunks=4), r"n_chunks: expected ceil\(n_rows / chunk_rows\) = 5, found 4"),
    (dict(chunk_rows=0), r"chunk_rows: expected an integer >= 1, found 0"),
    (dict(fingerprint="other-model"), r"store_id: does not match the manifest's fields"),
])
def test_edited_manifest_is_refused_naming_the_field(tmp_path, edit, match):
    fresh(tmp_path / "s").close()
    _manifest_edit(tmp_path / "s", **edit)
    with pytest.raises(StoreFileError, match=match):
        GradientStore.open(tmp_path / "s")


# ------------------------------------------------------------------------------------------ items 8, 9, 11
def test_missing_chunks_directory_is_a_clear_error(tmp_path):
    fresh(tmp_path / "s").close()
    shutil.rmtree(tmp_path / "s" / "chunks")
    with pytest.raises(StoreFileError, match=r"chunks: is missing; .*gradsketch store repair"):
        GradientStore.open(tmp_path / "s")


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_dead_writers_are_removed_on_open(tmp_path):
    fresh(tmp_path / "s").close()
    dead, live = _dead_pid(), os.getpid()
    creating = tmp_path / f".s.creating-{dead}-0a1b2c3d"
    creating.mkdir()
    (creating / "data.npy").write_bytes(b"\0" * 1000)
    live_creating = tmp_path / f".s.creating-{live}-0a1b2c3d"
    live_creating.mkdir()
    chunks = tmp_path / "s" / "chunks"
    (chunks / f".000002.json.{dead}.0badf00d.tmp").write_text("{")
    (chunks / f".000003.json.{live}.0badf00d.tmp").write_text("{")
    (tmp_path / "s" / f".manifest.json.{dead}.12ab.tmp").write_text("{")
    GradientStore.create_or_open(tmp_path / "s", N, D, SPEC, "fp", dtype="float32", chunk_rows=CR).close()
    assert not creating.exists() and live_creating.exists()
    assert sorted(p.name for p in chunks.iterdir()) == [f".000003.json.{live}.0badf00d.tmp"]
    assert not (tmp_path / "s" / f".manifest.json.{dead}.12ab.tmp").exists()


def test_disk_full_names_the_store_and_says_it_resumes(tmp_path, monkeypatch):
    st = fresh(tmp_path / "s")
    st.write_chunk(0, np.ones((CR, D)))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io, "pwrite_all", full)
    with pytest.raises(OSError, match=r"No space left on device while writing chunk 1 \(rows 5:10\) of the store "
                                      rf"at '{tmp_path / 's'}': the 1 completed chunk\(s\) are kept; free space "
                                      "and rerun the same command, it resumes") as e:
        st.write_chunk(1, np.ones((CR, D)))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert st.completed_chunks() == [0]


# ------------------------------------------------------------------------------------------ item 8: CLI
def _fit_counting(task, batches, path, monkeypatch):
    """Fit into ``path``; returns the store rows that were featurised (recomputed)."""
    seen = count_featurised_rows(monkeypatch)
    child.attributor(task, path).fit(batches, progress=False)
    monkeypatch.undo()
    return seen


def test_cli_verify_and_repair_recompute_only_the_damaged_chunks(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gradsketch.cli import app

    task, batches = child.setup()
    batches = batches[:12]  # 120 examples, 6 chunks of 20
    child.attributor(task, tmp_path / "ref").fit(batches, progress=False)
    shutil.copytree(tmp_path / "ref", tmp_path / "s")
    store = tmp_path / "s" / "features_0"
    st = GradientStore.open(store)
    off = st._offset + st.chunk_range(3)[0] * st.d * st.itemsize
    st.close()
    with open(store / "data.npy", "r+b") as f:  # one flipped byte in chunk 3
        f.seek(off + 7)
        b = f.read(1)
        f.seek(off + 7)
        f.write(bytes([b[0] ^ 0x10]))
    os.unlink(store / "chunks" / "000005.json")
    os.mkfifo(store / "chunks" / "000005.json")  # chunk 5's marker replaced by a FIFO
    runner = CliRunner()
    r = runner.invoke(app, ["store", "verify", str(store)])
    assert r.exit_code == 1, r.output
    assert "6 chunks: 4 complete and verified, 0 missing, 2 corrupt" in r.output
    assert re.search(r"chunk 3: rows 60:80: bytes changed", r.output)
    assert re.search(r"chunk 5: rows 100:120: chunks/000005.json is unreadable or not a regular file", r.output)
    r = runner.invoke(app, ["store", "repair", str(store)])
    assert r.exit_code == 0, r.output
    assert "chunk 3: marker removed" in r.output and "recomputes the 2 missing chunk(s)" in r.output
    assert runner.invoke(app, ["store", "verify", str(store)]).exit_code == 0
    assert sorted(set(_fit_counting(task, batches, tmp_path / "s", monkeypatch))) == [*range(60, 80),
                                                                                      *range(100, 120)]
    assert files(store) == files(tmp_path / "ref" / "features_0")


def test_cli_repair_of_store_level_damage(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gradsketch.cli import app

    task, batches = child.setup()
    batches = batches[:6]
    child.attributor(task, tmp_path / "ref").fit(batches, progress=False)
    runner = CliRunner()
    for damage in ("chunks", "data"):
        shutil.copytree(tmp_path / "ref", tmp_path / damage)
        store = tmp_path / damage / "features_0"
        if damage == "chunks":
            shutil.rmtree(store / "chunks")
        else:
            (store / "data.npy").unlink()
            os.mkfifo(store / "data.npy")
        r = runner.invoke(app, ["store", "verify", str(store)])
        assert r.exit_code == 1 and "store-level damage" in r.output, r.output
        r = runner.invoke(app, ["store", "repair", str(store)])
        assert r.exit_code == 0 and "the next fit recomputes every chunk" in r.output, r.output
        assert len(_fit_counting(task, batches, tmp_path / damage, monkeypatch)) == 60
        assert files(store) == files(tmp_path / "ref" / "features_0")
    # a damaged manifest: not repairable, nothing changed, the message says what to do
    store = tmp_path / "ref" / "features_0"
    _manifest_edit(store, n_rows=61)
    before = files(store)
    r = runner.invoke(app, ["store", "repair", str(store)])
    assert r.exit_code == 1 and f"delete {store} and rerun the fit" in r.output, r.output
    assert files(store) == before
    r = runner.invoke(app, ["store", "verify", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no gradsketch store" in r.output
    r = runner.invoke(app, ["store", "verify", str(tmp_path / "ref")])  # the Attributor's root: name the stores
    out = "".join(r.output.split())  # (long paths wrap)
    assert r.exit_code == 2 and f"thestoresinsideitare{tmp_path / 'ref' / 'features_0'}" in out, r.output


def test_store_under_a_regular_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"path: expected a directory for the store at .*afile/s', but .*afile' is "
                                         "a file"):
        GradientStore.create_or_open(tmp_path / "afile" / "s", N, D, SPEC, "fp")


# ------------------------------------------------------------------------------------------ item 5
def _scaled_attributor(path, scale, dtype="float16"):
    from gradsketch.attribution import Attributor
    from gradsketch.model import Task

    task, batches = child.setup()
    scaled = Task(task.model, lambda m, b: scale * torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"))
    return Attributor(scaled, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=0), store=path, store_dtype=dtype,
                      chunk_rows=20), batches[:4]


@pytest.mark.parametrize("scale", [1e-30, 1e-6])
def test_float16_underflow_warns_with_the_fraction(tmp_path, scale):
    att, data = _scaled_attributor(tmp_path / "s", scale)
    with pytest.warns(RuntimeWarning, match=r"store at .*: (\d+\.\d)% of the entries of chunk 0 \(rows 0:20\) "
                                            r"underflow float16 .*, (\d+\.\d)% became 0;.*store_dtype='float32'") as w:
        att.fit(data, progress=False)
    msgs = [str(x.message) for x in w if "underflow float16" in str(x.message)]
    assert len(msgs) == 1  # once per store, not per chunk
    pct, zero = map(float, re.search(r"(\d+\.\d)% of the entries.*?(\d+\.\d)% became 0", msgs[0]).groups())
    if scale == 1e-30:
        assert pct == zero == 100.0  # every entry flushed to 0
    else:
        assert 1.0 < pct <= 100.0 and zero < pct


def test_float16_normal_gradients_do_not_warn_and_overflow_names_store_dtype(tmp_path):
    import warnings

    att, data = _scaled_attributor(tmp_path / "a", 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        att.fit(data, progress=False)
    att, data = _scaled_attributor(tmp_path / "b", 1e7)
    with pytest.raises(ValueError, match=r"overflow: \|value\| > 65504; store the rows in float32: "
                                         r"store_dtype='float32' for the Attributor") as e:
        att.fit(data, progress=False)
    assert "allow_nonfinite" not in str(e.value)
    att, data = _scaled_attributor(tmp_path / "c", 1e7, dtype="float32")
    att.fit(data, progress=False)  # the option the message names is accepted and works
