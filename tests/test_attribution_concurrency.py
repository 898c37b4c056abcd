"""Several writers through the high-level API: ranks featurising disjoint shares of one store (real processes
and in-process), concurrent full fits on one store, a chunk completed by another writer meanwhile."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsketch.store import GradientStore

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

N_CHUNKS = child.N // child.CHUNK  # 12


def _start_together(tmp_path, argv_list, timeout=120):
    """Start one child per argv, wait until every one is ready, release them at once; return (rc, out, err)."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, str(CHILD), *map(str, argv), "--go", str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argv_list]
    try:
        for p in procs:  # "ready" once torch is imported and the attributor is built
            line = p.stdout.readline().strip()
            assert line == "ready", p.stderr.read()[-3000:]
        go.touch()
        res = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            res.append((p.returncode, out, err))
        return res
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _assert_same_store(path, ref_path):
    got, ref = GradientStore.open(path), GradientStore.open(ref_path)
    try:
        assert got.is_complete and got.verify() == list(range(N_CHUNKS))
        assert np.asarray(got.array()).tobytes() == np.asarray(ref.array()).tobytes()
        assert got.chunk_checksums() == ref.chunk_checksums()
    finally:
        got.close()
        ref.close()


@pytest.fixture
def reference(tmp_path):
    """A single-process fit: its store and the scores of the first 3 batches."""
    task, data = child.setup()
    a = child.attributor(task, tmp_path / "ref").fit(data, progress=False)
    return tmp_path / "ref" / "features_0", a.score(data[:3], progress=False)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX processes")
def test_two_rank_processes_then_fit_equals_single_process_fit(tmp_path, reference):
    ref_store, ref_scores = reference
    store = tmp_path / "ranks"
    res = _start_together(tmp_path, [[store, 0.01, "--rank", r, "--world-size", 2] for r in (0, 1)])
    for rc, out, err in res:
        assert rc == 0 and out.strip().endswith("done"), err[-3000:]
    _assert_same_store(store / "features_0", ref_store)
    # a plain fit finds the store complete: it only finalises (no loss evaluation at all for grad-dot)
    calls: list = []
    task, data = child.setup(calls=calls)
    a = child.attributor(task, store).fit(data, progress=False)
    assert calls == []
    assert torch.equal(a.score(data[:3], progress=False), ref_scores)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX processes")
def test_two_concurrent_full_fits_on_one_store_both_succeed(tmp_path, reference):
    ref_store, ref_scores = reference
    store = tmp_path / "shared"
    res = _start_together(tmp_path, [[store, 0.01, "--scores", tmp_path / f"scores{i}.pt"] for i in (0, 1)])
    for rc, out, err in res:
        assert rc == 0 and out.strip().endswith("done"), err[-3000:]
    _assert_same_store(store / "features_0", ref_store)
    s0, s1 = (torch.load(tmp_path / f"scores{i}.pt") for i in (0, 1))
    assert torch.equal(s0, s1) and torch.equal(s0, ref_scores)


def test_featurise_rank_computes_only_its_share(tmp_path, reference):
    ref_store, ref_scores = reference
    calls: list = []
    task, data = child.setup(calls=calls)
    X = torch.cat([b[0] for b in data])
    a = child.attributor(task, tmp_path / "s")
    assert a.featurise(data, rank=1, world_size=3, progress=False) is a
    st = GradientStore.open(tmp_path / "s" / "features_0")
    lo, hi = st.row_range_for_rank(1, 3)
    assert (lo, hi) == (80, 160)
    assert st.completed_chunks() == list(st.chunks_in((lo, hi)))
    st.close()
    seen = torch.cat(calls)
    share = {tuple(r.tolist()) for r in X[lo:hi]}
    assert {tuple(r.tolist()) for r in seen} == share  # every row of the share, nothing else
    # each row once (plus, at most, the task's one-off validation pass on the first batch it sees)
    assert seen.shape[0] <= hi - lo + child.BATCH
    with pytest.raises(RuntimeError, match="fit"):
        a.score(data[:1], progress=False)  # featurise does not fit
    n = len(calls)
    a.featurise(data, rank=1, world_size=3, progress=False)  # rerun: nothing left in its share
    assert len(calls) == n
    for r in (2, 0):
        a.featurise(data, rank=r, world_size=3, progress=False)
    n = len(calls)
    a.fit(data, progress=False)
    assert len(calls) == n  # complete: fit only finalises
    _assert_same_store(tmp_path / "s" / "features_0", ref_store)
    assert torch.equal(a.score(data[:3], progress=False), ref_scores)
    # more ranks than chunks: the extra ranks have nothing to do
    b = child.attributor(task, tmp_path / "many")
    for r in range(N_CHUNKS + 3):
        b.featurise(data, rank=r, world_size=N_CHUNKS + 3, progress=False)
    _assert_same_store(tmp_path / "many" / "features_0", ref_store)


def test_featurise_ranks_with_checkpoints_and_unsketched_arnoldi(tmp_path):
    task, data = child.setup()
    data = data[:8]
    sd0 = {k: v.clone() for k, v in task.model.state_dict().items()}
    sd1 = {k: v + 0.05 for k, v in sd0.items()}
    for method, opts in [("tracin", dict(checkpoints=[(sd0, 0.5), (sd1, 0.25)])),
                         ("arnoldi", dict(n_iters=8, top_k=4))]:
        sketch = None if method == "arnoldi" else dict(kind="sjlt", d=16, seed=0)

        def make(path, method=method, opts=opts, sketch=sketch):
            from gradsketch.attribution import Attributor

            return Attributor(task, method, sketch=sketch, store=path, store_dtype="float32", chunk_rows=20, **opts)

        ref = make(tmp_path / f"{method}-ref").fit(data, progress=False).score(data[:2], progress=False)
        for r in (1, 0, 2):
            make(tmp_path / method).featurise(data, rank=r, world_size=3, progress=False)
        for c in range(len(opts.get("checkpoints", [None]))):
            st = GradientStore.open(tmp_path / method / f"features_{c}")
            assert st.is_complete
            st.close()
        got = make(tmp_path / method).fit(data, progress=False).score(data[:2], progress=False)
        assert torch.equal(got, ref), method


def test_chunk_completed_by_another_writer_meanwhile_is_skipped(tmp_path, reference, monkeypatch):
    """A writer outside gradsketch's lock completes chunk 2 between our check and our write: ours is dropped,
    the fit succeeds and the store is the one a single process writes."""
    ref_store, ref_scores = reference
    orig = GradientStore.write_chunk
    raced = []

    def write_chunk(self, i, rows, **kw):
        if i == 2 and not raced:
            raced.append(i)
            orig(self, i, rows, **kw)  # the other writer, with the same rows
        return orig(self, i, rows, **kw)  # ours: "already complete"

    monkeypatch.setattr(GradientStore, "write_chunk", write_chunk)
    task, data = child.setup()
    a = child.attributor(task, tmp_path / "s").fit(data, progress=False)
    assert raced == [2]
    _assert_same_store(tmp_path / "s" / "features_0", ref_store)
    assert torch.equal(a.score(data[:3], progress=False), ref_scores)


def test_featurise_bad_arguments(tmp_path):
    task, data = child.setup()
    from gradsketch.attribution import Attributor

    with pytest.raises(ValueError, match="store: featurise"):
        Attributor(task, "grad-dot").featurise(data, progress=False)
    a = child.attributor(task, tmp_path)
    with pytest.raises(ValueError, match="rank, world_size: expected both or neither"):
        a.featurise(data, rank=0, progress=False)
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[0, 2\)"):
        a.featurise(data, rank=2, world_size=2, progress=False)
    with pytest.raises(ValueError, match="world_size: expected an integer >= 1"):
        a.featurise(data, rank=0, world_size=0, progress=False)
    with pytest.raises(TypeError, match="re-iterable"):
        a.featurise(iter(data), rank=0, world_size=2, progress=False)
    assert not (tmp_path / "features_0").exists()
