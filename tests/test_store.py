"""gradsketch.store in one process: round trips, resume, corruption, refusals and every error path."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import gradsketch.store  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradsketch.store import CorruptChunkError, GradientStore, _io, fill, fingerprint_model  # noqa: E402

SPEC = {"kind": "affd", "n": 1000, "d": 8, "seed": 3}
FP = "sha256:abc"


def rows(n=23, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def make(tmp_path, n=23, d=8, chunk_rows=5, **kw):
    return GradientStore.create_or_open(tmp_path / "s", n, d, SPEC, FP, chunk_rows=chunk_rows, **kw)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("float32", 0.0)])
def test_round_trip(tmp_path, dtype, tol):
    X = rows()
    meta = {"labels": np.arange(23) % 3, "ids": [f"ex{i}" for i in range(23)]}
    s = make(tmp_path, dtype=dtype, metadata=meta)
    assert s.missing_chunks() == [0, 1, 2, 3, 4] and not s.is_complete
    assert [s.chunk_range(i) for i in range(5)] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert fill(s, lambda a, b: torch.from_numpy(X[a:b]), progress=False) == [0, 1, 2, 3, 4]
    assert s.is_complete and s.missing_chunks() == [] and s.verify() == [0, 1, 2, 3, 4]
    s.close()

    r = GradientStore.open(tmp_path / "s")
    A = r.array()
    assert isinstance(A, np.memmap) and A.dtype == np.dtype(dtype) and A.shape == (23, 8)
    assert not A.flags.writeable
    np.testing.assert_allclose(A.astype(np.float32), X, rtol=tol, atol=tol)
    np.testing.assert_array_equal(A, X.astype(dtype))  # exactly the cast, no other rounding
    np.testing.assert_array_equal(r.array((4, 12)), A[4:12])
    np.testing.assert_array_equal(r.array(range(4, 12)), A[4:12])
    blocks = list(r.iter_blocks(7))
    assert [b.shape for b in blocks] == [(7, 8), (7, 8), (7, 8), (2, 8)]
    assert all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), A.astype(np.float32))
    tblocks = list(r.iter_blocks(10, (3, 23), as_tensor=True))
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tblocks)
    np.testing.assert_array_equal(torch.cat(tblocks).numpy(), A[3:].astype(np.float32))
    assert len(r) == 23 and r.d == 8 and r.dtype == dtype and r.spec == SPEC and r.fingerprint == FP
    assert r.metadata == {"labels": [i % 3 for i in range(23)], "ids": [f"ex{i}" for i in range(23)]}
    assert r.n_chunks == 5 and r.chunk_rows == 5 and not r.writable
    assert set(r.chunk_checksums()) == {0, 1, 2, 3, 4}
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["n_rows"] == 23 and man["d"] == 8 and man["dtype"] == dtype and man["chunk_rows"] == 5
    assert man["spec"] == SPEC and man["fingerprint"] == FP and man["checksum"] == "sha256"


def test_torch_inputs_any_float_dtype(tmp_path):
    s = make(tmp_path, dtype="float32")
    X = torch.from_numpy(rows())
    s.write_chunk(0, X[:5].to(torch.bfloat16))
    s.write_chunk(1, X[5:10].double().requires_grad_())
    s.write_chunk(2, X[10:15].numpy().astype(np.float64))
    np.testing.assert_array_equal(s.array((0, 5), allow_incomplete=True),
                                  X[:5].to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(s.array((5, 15), allow_incomplete=True), X[5:15].numpy())


def test_conversion_matches_numpy_cast_bit_for_bit(tmp_path):
    """Rows are cast with torch for speed: the float16 store must hold exactly numpy's round-to-nearest-even
    cast, across the float16 range (subnormals, ties, the largest finite value 65504)."""
    rng = np.random.default_rng(3)
    exps = rng.uniform(-27, 15.99, size=(20, 64))
    X = (np.sign(rng.standard_normal((20, 64))) * 2.0 ** exps).astype(np.float32)
    X[0, :6] = [65504.0, 65519.99, -65519.99, 2.0 ** -24, 2.0 ** -25 * 1.0000001, 1 + 2.0 ** -11]  # edges, a tie
    for dtype in ("float16", "float32"):
        s = GradientStore.create_or_open(tmp_path / dtype, 20, 64, SPEC, FP, chunk_rows=20, dtype=dtype)
        s.write_chunk(0, X)
        np.testing.assert_array_equal(s.array(), X.astype(dtype))
    s = GradientStore.create_or_open(tmp_path / "f64", 20, 64, SPEC, FP, chunk_rows=10, dtype="float16")
    s.write_chunk(0, X[:10].astype(np.float64) * (1 + 2.0 ** -30))  # float64 -> float16: one rounding
    s.write_chunk(1, torch.from_numpy(X[10:]).double())
    np.testing.assert_array_equal(s.array(), np.concatenate([(X[:10].astype(np.float64) * (1 + 2.0 ** -30)),
                                                             X[10:].astype(np.float64)]).astype(np.float16))


def test_nonfinite_checks_on_fast_path(tmp_path):
    s = make(tmp_path, dtype="float32")
    X = torch.from_numpy(rows())
    bad = X[:5].clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"got NaN/Inf in row 3 \(1 non-finite row\(s\): 3\)"):
        s.write_chunk(0, bad)
    huge = X[5:10].double()
    huge[1] = 1e308  # every entry finite, the float64 row sum is inf: must not be reported as NaN/Inf input
    with pytest.raises(ValueError, match=r"row 6 after conversion to float32 \(overflow"):
        s.write_chunk(1, huge)
    cancel = X[10:15].double()
    # finite and summing to 0 in float64, but each overflows float32
    cancel[0, :2] = torch.tensor([1e308, -1e308], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"row 10 after conversion to float32"):
        s.write_chunk(2, cancel)
    h = GradientStore.create_or_open(tmp_path / "h", 5, 8, SPEC, FP, chunk_rows=5, dtype="float16")
    h.write_chunk(0, torch.full((5, 8), 60000.0))  # finite in float16 though each row's sum overflows it
    assert float(h.array().astype(np.float32).min()) == 60000.0
    s.write_chunk(0, X[:5].t().contiguous().t())  # column-major rows are taken as they are
    np.testing.assert_array_equal(s.array((0, 5), allow_incomplete=True), X[:5].numpy())
    assert s.missing_chunks() == [1, 2, 3, 4]


def test_dtype_aliases():
    from gradsketch.store.gradient_store import normalize_dtype

    for d in ["float16", np.float16, np.dtype("float16"), torch.float16, "half"]:
        assert normalize_dtype(d) == "float16"
    for d in ["float32", np.float32, np.dtype("<f4"), torch.float32]:
        assert normalize_dtype(d) == "float32"


def test_default_chunk_rows_and_reopen_accepts_stored(tmp_path):
    s = GradientStore.create_or_open(tmp_path / "s", 100_000, 256, SPEC, FP)
    assert s.chunk_rows == 16 * 2**20 // (256 * 2) == 32768 and s.n_chunks == 4
    s2 = GradientStore.create_or_open(tmp_path / "s", 100_000, 256, SPEC, FP)  # chunk_rows=None: accept
    assert s2.chunk_rows == s.chunk_rows
    # the data file is preallocated sparse, so a big empty store costs nothing to create
    assert (tmp_path / "s" / "data.npy").stat().st_size >= 100_000 * 256 * 2


# ----------------------------------------------------------------------------- resume
def test_resume_after_partial_writing(tmp_path):
    X = rows()
    s = make(tmp_path)
    s.write_chunk(1, X[5:10])
    s.write_chunk(3, X[15:20])
    s.close()
    del s
    s = make(tmp_path)  # reopen as a new run would
    assert s.missing_chunks() == [0, 2, 4]
    assert s.missing_chunks((0, 12)) == [0, 2] and s.missing_chunks((5, 10)) == []
    calls = []

    def compute(a, b):
        calls.append((a, b))
        return X[a:b]

    assert fill(s, compute, progress=False) == [0, 2, 4]
    assert calls == [(0, 5), (10, 15), (20, 23)]
    assert fill(s, compute, progress=False) == [] and len(calls) == 3  # nothing left: nothing recomputed
    ref = make(tmp_path / "ref")
    fill(ref, lambda a, b: X[a:b], progress=False)
    np.testing.assert_array_equal(s.array(), ref.array())
    assert s.chunk_checksums() == ref.chunk_checksums()


def test_crash_between_data_and_marker_leaves_chunk_missing(tmp_path, monkeypatch):
    X = rows()
    s = make(tmp_path)

    def crash(*a, **k):
        raise KeyboardInterrupt("simulated kill after the data fsync, before the marker")

    monkeypatch.setattr(_io, "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        s.write_chunk(2, X[10:15] * 7)  # wrong values land in the data file, but no marker
    monkeypatch.undo()
    assert s.missing_chunks() == [0, 1, 2, 3, 4]
    # a half-written marker temp file and garbage bytes are ignored / overwritten on resume
    (tmp_path / "s" / "chunks" / ".000002.json.999.dead.tmp").write_text("{garbage")
    fill(s, lambda a, b: X[a:b], progress=False)
    assert s.is_complete and s.verify() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(s.array(), X.astype(np.float16))


def test_concurrent_completion_of_same_chunk_is_refused(tmp_path):
    X = rows()
    a, b = make(tmp_path), make(tmp_path)
    a.write_chunk(0, X[:5])
    with pytest.raises(ValueError, match="already complete"):
        b.write_chunk(0, X[:5])


def test_row_range_for_rank_partitions_chunks(tmp_path):
    s = make(tmp_path, n=103, chunk_rows=10)  # 11 chunks
    for world in [1, 2, 3, 4, 11, 13]:
        ranges = [s.row_range_for_rank(r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 103
        assert all(ranges[k][1] == ranges[k + 1][0] for k in range(world - 1))
        assert all(r0 % 10 == 0 for r0, _ in ranges)
        sizes = [len(s.chunks_in(r)) for r in ranges]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 11
    X = rows(103)
    for r in [2, 0, 1]:
        fill(s, lambda a, b: X[a:b], rank=r, world_size=3, progress=False)
        assert s.missing_chunks(s.row_range_for_rank(r, 3)) == []
    assert s.is_complete


# ----------------------------------------------------------------------------- integrity
def test_corrupt_byte_is_named_by_verify(tmp_path):
    X = rows()
    s = make(tmp_path)
    fill(s, lambda a, b: X[a:b], progress=False)
    s.close()
    data = tmp_path / "s" / "data.npy"
    r = GradientStore.open(tmp_path / "s")
    offset = data.stat().st_size - 23 * 8 * 2  # header length
    pos = offset + (12 * 8 + 3) * 2 + 1  # a byte of row 12 -> chunk 2
    with open(data, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))
    r = GradientStore.open(tmp_path / "s")
    with pytest.raises(CorruptChunkError, match=r"chunk 2 \(rows 10:15\)") as e:
        r.verify()
    assert e.value.chunks == [2] and isinstance(e.value, ValueError)
    assert r.verify((15, 23)) == [3, 4]  # other chunks are fine
    # a damaged marker is also a corrupt chunk
    (tmp_path / "s" / "chunks" / "000004.json").write_text('{"chunk": 4, "row_start": 0}')
    with pytest.raises(CorruptChunkError) as e:
        r.verify()
    assert e.value.chunks == [2, 4] and "chunk 4" in str(e.value)


def test_overwrite_completed_chunk(tmp_path):
    X = rows()
    s = make(tmp_path)
    c0 = s.write_chunk(0, X[:5])
    with pytest.raises(ValueError, match=r"chunk 0 \(rows 0:5\).*already complete.*overwrite=True"):
        s.write_chunk(0, X[:5])
    c1 = s.write_chunk(0, -X[:5], overwrite=True)
    assert c1 != c0 and s.chunk_checksums() == {0: c1} and s.verify() == [0]
    np.testing.assert_array_equal(s.array((0, 5)), (-X[:5]).astype(np.float16))


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "change, what",
    [
        ({"spec": dict(SPEC, seed=4)}, r"sketch spec differs \(seed: expected 4, found 3\)"),
        ({"fingerprint": "sha256:def"}, r"fingerprint: expected 'sha256:def', found 'sha256:abc'"),
        ({"d": 9}, r"d: expected 9, found 8"),
        ({"n_rows": 24}, r"n_rows: expected 24, found 23"),
        ({"dtype": "float32"}, r"dtype: expected 'float32', found 'float16'"),
        ({"chunk_rows": 6}, r"chunk_rows: expected 6, found 5"),
        ({"metadata": {"a": 2}}, r"metadata: expected \{'a': 2\}, found \{'a': 1\}"),
    ],
)
def test_mismatch_refused(tmp_path, change, what):
    args = dict(n_rows=23, d=8, spec=SPEC, fingerprint=FP, chunk_rows=5, metadata={"a": 1})
    GradientStore.create_or_open(tmp_path / "s", **args).close()
    with pytest.raises(ValueError, match=what):
        GradientStore.create_or_open(tmp_path / "s", **{**args, **change})
    GradientStore.create_or_open(tmp_path / "s", **args).close()  # the same arguments are accepted


def test_spec_compared_as_json(tmp_path):
    spec = {"kind": "affd", "sizes": (3, 4), "seed": 0}
    GradientStore.create_or_open(tmp_path / "s", 5, 2, spec, FP).close()
    s = GradientStore.create_or_open(tmp_path / "s", 5, 2, {"seed": 0, "sizes": [3, 4], "kind": "affd"}, FP)
    assert s.spec == {"kind": "affd", "sizes": [3, 4], "seed": 0}


def test_several_mismatches_all_named(tmp_path):
    make(tmp_path).close()
    with pytest.raises(ValueError) as e:
        GradientStore.create_or_open(tmp_path / "s", 23, 9, {"kind": "qk"}, "other", chunk_rows=5)
    msg = str(e.value)
    assert "d: expected 9, found 8" in msg and "fingerprint" in msg
    assert "kind: expected 'qk', found 'affd'" in msg


# ----------------------------------------------------------------------------- error paths
@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"n_rows": 0}, ValueError, r"n_rows: expected an integer >= 1, got 0"),
        ({"n_rows": -3}, ValueError, r"n_rows: expected an integer >= 1, got -3"),
        ({"n_rows": True}, TypeError, r"n_rows: expected an integer >= 1, got True"),
        ({"n_rows": 2.5}, TypeError, r"n_rows"),
        ({"d": 0}, ValueError, r"d: expected an integer >= 1, got 0"),
        ({"chunk_rows": 0}, ValueError, r"chunk_rows: expected an integer >= 1, got 0"),
        ({"dtype": "int8"}, ValueError, r"dtype: expected one of \['float16', 'float32'\], got 'int8'"),
        ({"dtype": "bfloat16"}, ValueError, r"dtype: expected one of"),
        ({"spec": [1, 2]}, TypeError, r"spec: expected a JSON-serialisable dict, got list"),
        ({"spec": {"x": object()}}, TypeError, r"spec: expected a JSON-serialisable value"),
        ({"spec": {"x": float("nan")}}, TypeError, r"spec: expected a JSON-serialisable value"),
        ({"fingerprint": 3}, TypeError, r"fingerprint: expected a str, got int"),
        ({"metadata": [1]}, TypeError, r"metadata: expected a dict or None, got list"),
    ],
)
def test_create_errors(tmp_path, kw, exc, match):
    args = dict(n_rows=23, d=8, spec=SPEC, fingerprint=FP, chunk_rows=5)
    with pytest.raises(exc, match=match):
        GradientStore.create_or_open(tmp_path / "s", **{**args, **kw})
    assert not (tmp_path / "s").exists()


def test_write_errors(tmp_path):
    X = rows()
    s = make(tmp_path)
    with pytest.raises(ValueError, match=r"rows: expected shape \(5, 8\) for chunk 1 \(rows 5:10\), "
                                         r"got \(4, 8\)"):
        s.write_chunk(1, X[5:9])
    with pytest.raises(ValueError, match=r"rows: expected shape \(3, 8\) for chunk 4 \(rows 20:23\), "
                                         r"got \(3, 7\)"):
        s.write_chunk(4, X[20:23, :7])
    with pytest.raises(ValueError, match=r"rows: expected shape \(5, 8\).*got \(40,\)"):
        s.write_chunk(0, X[:5].ravel())
    with pytest.raises(TypeError, match=r"rows: expected a real floating or integer array"):
        s.write_chunk(0, X[:5].astype(np.complex64))
    with pytest.raises(ValueError, match=r"i: expected a chunk index in \[0, 5\), got 5"):
        s.write_chunk(5, X[:5])
    with pytest.raises(ValueError, match=r"i: expected a chunk index in \[0, 5\), got -1"):
        s.write_chunk(-1, X[:5])
    with pytest.raises(TypeError, match=r"i: expected a chunk index"):
        s.write_chunk(1.0, X[:5])
    bad = X[5:10].copy()
    bad[2, 4] = np.nan
    bad[4, 0] = np.inf
    with pytest.raises(ValueError, match=r"rows: expected finite values, got NaN/Inf in row 7 "
                                         r"\(2 non-finite row\(s\): 7, 9\); pass allow_nonfinite=True"):
        s.write_chunk(1, bad)
    big = X[10:15].copy()
    big[3, 1] = 1e6  # finite in float32, +inf in float16
    with pytest.raises(ValueError, match=r"row 13 after conversion to float16 \(overflow"):
        s.write_chunk(2, big)
    assert s.missing_chunks() == [0, 1, 2, 3, 4]  # nothing was recorded by the failed writes
    s.write_chunk(1, bad, allow_nonfinite=True)
    got = s.array((5, 10), allow_incomplete=True)
    assert np.isnan(got[2, 4]) and np.isposinf(got[4, 0])
    assert s.verify() == [1]  # checksums work on non-finite bytes too


def test_read_errors(tmp_path):
    X = rows()
    s = make(tmp_path)
    s.write_chunk(0, X[:5])
    with pytest.raises(ValueError, match=r"row_range: rows 0:23 include 4 incomplete chunk\(s\) "
                                         r"\(1, 2, 3, 4\)"):
        s.array()
    with pytest.raises(ValueError, match=r"incomplete chunk"):
        list(s.iter_blocks(4))
    np.testing.assert_array_equal(s.array((0, 5)), X[:5].astype(np.float16))
    assert not s.array(allow_incomplete=True)[5:].any()  # unwritten rows read as zeros
    with pytest.raises(ValueError, match=r"row_range: expected 0 <= start <= stop <= 23, got \(0, 24\)"):
        s.array((0, 24))
    with pytest.raises(ValueError, match=r"row_range: expected 0 <= start <= stop <= 23, got \(5, 2\)"):
        s.array((5, 2))
    with pytest.raises(TypeError, match=r"row_range: expected None, a range or a \(start, stop\) pair"):
        s.array((0, 1, 2))
    with pytest.raises(ValueError, match=r"row_range: expected step 1"):
        s.array(range(0, 10, 2))
    with pytest.raises(ValueError, match=r"block_rows: expected an integer >= 1, got 0"):
        s.iter_blocks(0)
    assert s.array((3, 3)).shape == (0, 8) and s.missing_chunks((3, 3)) == []
    r = GradientStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match=r"opened read-only"):
        r.write_chunk(1, X[5:10])
    with pytest.raises(FileNotFoundError, match=r"path: no gradsketch store at"):
        GradientStore.open(tmp_path / "nothing")


def test_open_errors(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"path: .* exists and is not a gradsketch store"):
        GradientStore.create_or_open(tmp_path / "busy", 23, 8, SPEC, FP)
    (tmp_path / "empty").mkdir()  # an existing empty directory is fine
    GradientStore.create_or_open(tmp_path / "empty", 23, 8, SPEC, FP).close()
    make(tmp_path).close()
    data = tmp_path / "s" / "data.npy"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 2)
    with pytest.raises(ValueError, match=r"data.npy: truncated"):
        GradientStore.open(tmp_path / "s")
    man = tmp_path / "s" / "manifest.json"
    man.write_text(json.dumps({**json.loads(man.read_text()), "version": 99}))
    with pytest.raises(ValueError, match=r"expected version 2, found 99"):
        GradientStore.open(tmp_path / "s")
    man.write_text("{not json")
    with pytest.raises(ValueError, match=r"unreadable manifest"):
        GradientStore.open(tmp_path / "s")


def test_fill_errors(tmp_path):
    s = make(tmp_path)
    X = rows()
    with pytest.raises(ValueError, match=r"row_range: expected chunk-aligned bounds \(multiples of "
                                         r"chunk_rows=5, or stop=23\), got \(3, 10\)"):
        fill(s, lambda a, b: X[a:b], row_range=(3, 10), progress=False)
    with pytest.raises(ValueError, match=r"rank, world_size: expected both or neither"):
        fill(s, lambda a, b: X[a:b], rank=0, progress=False)
    with pytest.raises(ValueError, match=r"row_range: expected None when rank/world_size are given"):
        fill(s, lambda a, b: X[a:b], rank=0, world_size=2, row_range=(0, 5), progress=False)
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[0, 2\), got 2"):
        fill(s, lambda a, b: X[a:b], rank=2, world_size=2, progress=False)
    with pytest.raises(ValueError, match=r"world_size: expected an integer >= 1, got 0"):
        s.row_range_for_rank(0, 0)
    with pytest.raises(TypeError, match=r"compute_fn: expected a callable"):
        fill(s, None, progress=False)
    with pytest.raises(ValueError, match=r"rows: expected shape \(5, 8\)"):
        fill(s, lambda a, b: X[a:b + 1], progress=False)
    assert fill(s, lambda a, b: X[a:b], row_range=(10, 23), progress=False) == [2, 3, 4]
    assert s.missing_chunks() == [0, 1]


def test_fill_progress_bar_quiet_and_loud(tmp_path, capsys):
    X = rows()
    fill(make(tmp_path), lambda a, b: X[a:b], progress=False)
    assert capsys.readouterr().err == ""
    fill(make(tmp_path / "b"), lambda a, b: X[a:b], progress=True)
    assert "5/5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fingerprint
def test_fingerprint_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    fp = fingerprint_model(model)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert fingerprint_model(model) == fp
    assert fingerprint_model(dict(model.named_parameters())) == fp
    assert fingerprint_model(list(model.named_parameters())) == fp
    assert fingerprint_model(model.named_parameters()) == fp
    with torch.no_grad():
        model[2].bias[1] += 1e-6
    assert fingerprint_model(model) != fp
    with torch.no_grad():
        model[2].bias[1] -= 1e-6
    named = dict(model.named_parameters())
    assert fingerprint_model({("x" + k): v for k, v in named.items()}) != fp  # names count
    assert fingerprint_model({k: v.double() for k, v in named.items()}) != fp  # dtypes count
    assert fingerprint_model({k: v.reshape(-1) for k, v in named.items()}) != fp  # shapes count
    assert fingerprint_model(dict(reversed(list(named.items())))) != fp  # order counts
    # large tensors: strided subsample + both ends, still sensitive to a change anywhere sampled
    big = {"w": torch.randn(10_000)}
    f_big = fingerprint_model(big, full_numel=100)
    big2 = {"w": big["w"].clone()}
    big2["w"][-1] += 1.0
    assert fingerprint_model(big2, full_numel=100) != f_big
    assert fingerprint_model({"w": big["w"].to(torch.bfloat16)}) != f_big
    with pytest.raises(TypeError, match=r"model_or_named_params: expected an nn.Module"):
        fingerprint_model(3)
    with pytest.raises(TypeError, match=r"model_or_named_params: expected tensors, got ndarray"):
        fingerprint_model({"w": np.zeros(3)})


def test_marker_files_are_the_only_state(tmp_path):
    """The manifest is never rewritten after creation: completion lives in chunks/*.json only."""
    X = rows()
    s = make(tmp_path)
    man = tmp_path / "s" / "manifest.json"
    before = (man.read_bytes(), os.stat(man).st_mtime_ns)
    fill(s, lambda a, b: X[a:b], progress=False)
    assert (man.read_bytes(), os.stat(man).st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path / "s" / "chunks")) == [f"{i:06d}.json" for i in range(5)]
    m = json.loads((tmp_path / "s" / "chunks" / "000004.json").read_text())
    assert m["row_start"] == 20 and m["row_stop"] == 23
    assert m["nbytes"] == 3 * 8 * 2 and len(m["sha256"]) == 64
