"""Attributor under failures: SIGKILL mid-featurisation then resume, corrupt chunks, NaN gradients,
mismatched stores/models, empty data, bad arguments. Nothing already computed is lost."""

from __future__ import annotations

import importlib.util
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gradsketch.attribution import Attributor, batches
from gradsketch.store import CorruptChunkError, GradientStore

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_then_resume_gives_identical_store(tmp_path):
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    task, data = child.setup()
    child.attributor(task, ref_dir).fit(data, progress=False)
    n_chunks = child.N // child.CHUNK
    kill_after = random.Random(1234).randint(2, n_chunks - 3)  # seeded kill point: after this many chunks
    proc = subprocess.Popen([sys.executable, str(CHILD), str(dir_), "0.05"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            chunks = dir_ / "features_0" / "chunks"
            if chunks.exists() and len(list(chunks.glob("*.json"))) >= kill_after:
                break
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = GradientStore.open(dir_ / "features_0")
    done = len(st.completed_chunks())
    assert kill_after <= done < n_chunks  # killed part-way
    st.close()
    # resume in this process: only the missing chunks are computed
    a = child.attributor(task, dir_).fit(data, progress=False)
    got = GradientStore.open(dir_ / "features_0")
    ref = GradientStore.open(ref_dir / "features_0")
    assert got.is_complete
    np.testing.assert_array_equal(np.asarray(got.array()), np.asarray(ref.array()))
    got.verify()
    fresh = child.attributor(task, ref_dir).fit(data, progress=False)
    torch.testing.assert_close(a.score(data[:2], progress=False), fresh.score(data[:2], progress=False))


def test_corrupt_chunk_is_detected_and_named(tmp_path):
    task, data = child.setup()
    child.attributor(task, tmp_path).fit(data, progress=False)
    st = GradientStore.open(tmp_path / "features_0")
    r0, _ = st.chunk_range(3)
    off = st._offset + r0 * st.d * st.itemsize
    st.close()
    with open(tmp_path / "features_0" / "data.npy", "r+b") as f:
        f.seek(off + 5)
        f.write(b"\xff\x7f")
    with pytest.raises(CorruptChunkError, match=r"chunk 3") as e:
        child.attributor(task, tmp_path).fit(data, progress=False)
    assert e.value.chunks == [3]


def test_nan_gradient_raises_naming_the_example_and_keeps_earlier_chunks(tmp_path):
    task, data = child.setup()
    bad = [tuple(t.clone() for t in b) for b in data]
    bad[5][0][3, 1] = float("nan")  # example 5 * 10 + 3 = 53
    with pytest.raises(FloatingPointError, match=r"example index\(es\) 53"):
        child.attributor(task, tmp_path).fit(bad, progress=False)
    st = GradientStore.open(tmp_path / "features_0")
    assert st.completed_chunks() == [0, 1]  # rows 0..39 were written before the failure
    st.close()
    # fixed data: the rerun resumes and completes; skip policy zeroes the row instead of raising
    child.attributor(task, tmp_path).fit(data, progress=False)
    a = Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=0), nan_policy="skip").fit(bad, progress=False)
    assert torch.all(a.self_influence(progress=False)[53] == 0)


def test_mismatched_store_and_changed_model_are_refused(tmp_path):
    task, data = child.setup()
    child.attributor(task, tmp_path).fit(data, progress=False)
    other = Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=1), store=tmp_path,
                       store_dtype="float32", chunk_rows=child.CHUNK)
    with pytest.raises(ValueError, match="sketch spec differs"):
        other.fit(data, progress=False)
    a = child.attributor(task, tmp_path).fit(data, progress=False)
    with torch.no_grad():
        next(task.model.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="fingerprint"):
        child.attributor(task, tmp_path).fit(data, progress=False)
    with pytest.raises(ValueError, match="changed since fit"):
        a.score(data[:1], progress=False)


def test_empty_data_and_bad_arguments():
    task, data = child.setup()
    with pytest.raises(ValueError, match="train_data: expected at least one example"):
        Attributor(task, "grad-dot").fit([], progress=False)
    a = Attributor(task, "grad-dot").fit(data[:2], progress=False)
    with pytest.raises(ValueError, match="test_data: expected at least one example"):
        a.score([], progress=False)
    with pytest.raises(ValueError, match="method: expected one of"):
        Attributor(task, "magic")
    with pytest.raises(TypeError, match="not accepted by method='grad-dot'"):
        Attributor(task, "grad-dot", top_k=3)
    with pytest.raises(TypeError, match="task: expected a gradsketch.Task"):
        Attributor(object(), "trak")
    with pytest.raises(TypeError, match="re-iterable"):
        Attributor(task, "grad-dot").fit(iter(data), progress=False)
    with pytest.raises(RuntimeError, match="fit"):
        Attributor(task, "grad-dot").score(data, progress=False)
    with pytest.raises(ValueError, match="k: expected an integer"):
        a.topk(data[:1], k=0, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        Attributor(task, "arnoldi", n_iters=5, top_k=10).fit(data[:2], progress=False)
    assert batches(torch.zeros(5, 2), batch_size=2)[-1][0].shape == (1, 2)
    with pytest.raises(ValueError, match="tensors\\[1\\]: expected 5 rows"):
        batches(torch.zeros(5, 2), torch.zeros(4))


@pytest.mark.parametrize("method,opts,exc,msg", [
    ("influence", dict(damping=float("nan")), ValueError, "damping: expected a finite number, got nan"),
    ("influence", dict(damping=-1.0), ValueError, "damping: expected a number >= 0.0, got -1.0"),
    ("arnoldi", dict(damping=float("inf")), ValueError, "damping: expected a finite number"),
    ("arnoldi", dict(top_k=2.7), TypeError, "top_k: expected an integer, got float"),
    ("trak", dict(ridge="1"), TypeError, "ridge: expected a real number, got str"),
    ("trak", dict(margin_fn=3), TypeError, "margin_fn: expected a callable"),
    ("influence", dict(solver="svd"), ValueError, "solver: expected one of"),
    ("grad-dot", dict(block_rows=0), ValueError, "block_rows: expected an integer >= 1, got 0"),
])
def test_options_validated_at_construction(method, opts, exc, msg):
    """Every numeric option is checked for type, finiteness and range when the Attributor is built."""
    task, _ = child.setup()
    with pytest.raises(exc, match=msg):
        Attributor(task, method, **opts)
