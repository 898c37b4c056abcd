"""A resumable Arnoldi run: killed at any step and resumed, it returns exactly what an uninterrupted run
returns; a checkpoint of another run (operator, start, dtypes, dimension) or a damaged one is refused."""

import json

import pytest
import torch

from gradsketch.linalg import MatrixOperator
from gradsketch.linalg.arnoldi import arnoldi, arnoldi_eigs

D64 = torch.float64


def sym(n=40, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=dtype)
    return (A + A.T) / 2


class Dies(MatrixOperator):
    """A matrix operator that raises on its ``fail_at``-th product (as a killed process would stop)."""

    def __init__(self, A, fail_at):
        super().__init__(A)
        self.calls, self.fail_at = 0, fail_at

    def _matmat(self, X):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return super()._matmat(X)


@pytest.mark.parametrize("basis_dtype", [None, torch.float16])
@pytest.mark.parametrize("fail_at,every", [(1, 4), (9, 4), (13, 5), (17, 100)])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, basis_dtype, fail_at, every):
    A = sym()
    ref = arnoldi(MatrixOperator(A), 24, seed=3, basis_dtype=basis_dtype)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        arnoldi(Dies(A, fail_at), 24, seed=3, basis_dtype=basis_dtype, checkpoint=ck, checkpoint_every=every)
    if fail_at > 1:  # the steps done before the failure were saved when it raised
        assert json.loads((ck / "manifest.json").read_text())["steps"] == fail_at - 1
    res = arnoldi(MatrixOperator(A), 24, seed=3, basis_dtype=basis_dtype, checkpoint=ck, checkpoint_every=every)
    assert torch.equal(res.Q, ref.Q) and torch.equal(res.H, ref.H)
    # this call spent the remaining steps plus one check product (none of the saved ones)
    assert res.n_matvec == 24 - (fail_at - 1) + (1 if fail_at > 1 else 0)
    again = arnoldi(MatrixOperator(A), 24, seed=3, basis_dtype=basis_dtype, checkpoint=ck)
    assert torch.equal(again.Q, ref.Q) and again.n_matvec == 1  # complete: only the check


def test_restarts_and_generator_state_survive_a_resume(tmp_path):
    """A rank-6 operator breaks down at step 6 and continues from fresh random vectors drawn from the
    generator; a resume after the breakdown draws the same ones."""
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(30, 6, generator=g, dtype=D64))[0]
    A = U @ torch.diag(torch.arange(1.0, 7.0, dtype=D64)) @ U.T
    ref = arnoldi(MatrixOperator(A), 15, seed=5)
    assert ref.n_restarts >= 1
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        arnoldi(Dies(A, 11), 15, seed=5, checkpoint=ck, checkpoint_every=3)
    res = arnoldi(MatrixOperator(A), 15, seed=5, checkpoint=ck)
    assert torch.equal(res.Q, ref.Q) and torch.equal(res.H, ref.H) and res.n_restarts == ref.n_restarts


def test_longer_and_shorter_runs_reuse_a_checkpoint(tmp_path):
    A = sym(seed=2)
    ck = tmp_path / "ck"
    arnoldi(MatrixOperator(A), 10, seed=0, checkpoint=ck)
    longer = arnoldi(MatrixOperator(A), 20, seed=0, checkpoint=ck)
    ref20 = arnoldi(MatrixOperator(A), 20, seed=0)
    assert torch.equal(longer.Q, ref20.Q) and torch.equal(longer.H, ref20.H) and longer.n_matvec == 11
    shorter = arnoldi(MatrixOperator(A), 7, seed=0, checkpoint=ck)
    ref7 = arnoldi(MatrixOperator(A), 7, seed=0)
    assert torch.equal(shorter.Q, ref7.Q) and torch.equal(shorter.H, ref7.H)
    eig = arnoldi_eigs(MatrixOperator(A), 3, n_iter=20, seed=0, checkpoint=ck)
    assert torch.allclose(eig.eigenvalues, arnoldi_eigs(MatrixOperator(A), 3, n_iter=20, seed=0).eigenvalues)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    A = sym()
    ck = tmp_path / "ck"
    arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    with pytest.raises(ValueError, match="another model, data or operator"):
        arnoldi(MatrixOperator(A + 1e-3 * sym(seed=9)), 12, seed=0, checkpoint=ck)
    with pytest.raises(ValueError, match="another start vector"):
        arnoldi(MatrixOperator(A), 12, seed=1, checkpoint=ck)
    with pytest.raises(ValueError, match="basis_dtype"):
        arnoldi(MatrixOperator(A), 12, seed=0, basis_dtype=torch.float32, checkpoint=ck)
    with pytest.raises(ValueError, match="work_dtype"):
        arnoldi(MatrixOperator(A.float()), 12, seed=0, checkpoint=ck)
    with pytest.raises(ValueError, match="n = 40.*n = 39|n = 39"):
        arnoldi(MatrixOperator(A[:39, :39]), 12, seed=0, checkpoint=ck)


def test_damaged_checkpoints_are_refused_by_name(tmp_path):
    A = sym()
    ck = tmp_path / "ck"
    arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    good = (ck / "manifest.json").read_text()
    (ck / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not readable JSON"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    meta = json.loads(good)
    for key, bad in (("steps", 99), ("steps", -1), ("anorm", "x"), ("format", "other")):
        (ck / "manifest.json").write_text(json.dumps({**meta, key: bad}))
        with pytest.raises(ValueError, match=f"checkpoint .*{'basis.bin|manifest claims' if bad == 99 else ''}"):
            arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    (ck / "manifest.json").write_text(good)
    raw = (ck / "basis.bin").read_bytes()
    (ck / "basis.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="basis.bin holds"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    (ck / "basis.bin").write_bytes(raw)
    H = bytearray((ck / "H.bin").read_bytes())
    H[8:16] = bytes.fromhex("000000000000f87f")  # a NaN
    (ck / "H.bin").write_bytes(bytes(H))
    with pytest.raises(ValueError, match="NaN or Inf"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=ck)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="expected a directory"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=tmp_path / "file")
    with pytest.raises(ValueError, match="checkpoint_every"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=tmp_path / "new", checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint: expected a directory path"):
        arnoldi(MatrixOperator(A), 12, seed=0, checkpoint=3)


# -- resuming reads the saved rows straight into the basis, a block at a time ---------------------------------
@pytest.mark.parametrize("basis_dtype", [None, torch.float16, torch.bfloat16])
def test_block_by_block_resume_is_bit_exact(tmp_path, monkeypatch, basis_dtype):
    """Blocks of 3 rows (24 steps: the last block partial) when reading and writing give the same run."""
    import gradsketch.linalg._krylov_checkpoint as kc

    A = sym()
    ref = arnoldi(MatrixOperator(A), 24, seed=3, basis_dtype=basis_dtype)
    itemsize = ref.Q.element_size()
    monkeypatch.setattr(kc, "BLOCK_BYTES", 3 * 40 * itemsize)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        arnoldi(Dies(A, 15), 24, seed=3, basis_dtype=basis_dtype, checkpoint=ck, checkpoint_every=4)
    assert (ck / "basis.bin").stat().st_size == 15 * 40 * itemsize  # rows 0..14 (the failure saved 13, 14)
    res = arnoldi(MatrixOperator(A), 24, seed=3, basis_dtype=basis_dtype, checkpoint=ck, checkpoint_every=100)
    assert torch.equal(res.Q, ref.Q) and torch.equal(res.H, ref.H)
    saved = torch.frombuffer(bytearray((ck / "basis.bin").read_bytes()), dtype=ref.Q.dtype).reshape(25, 40)
    assert torch.equal(saved, ref.Q.T)  # the file holds the whole basis, written block by block


def test_a_nan_in_a_later_block_of_rows_is_refused(tmp_path, monkeypatch):
    import gradsketch.linalg._krylov_checkpoint as kc

    A = sym()
    ck = tmp_path / "ck"
    arnoldi(MatrixOperator(A), 12, seed=0, basis_dtype=torch.float16, checkpoint=ck)
    monkeypatch.setattr(kc, "BLOCK_BYTES", 4 * 40 * 2)  # 4 rows a block
    raw = bytearray((ck / "basis.bin").read_bytes())
    raw[(9 * 40 + 7) * 2: (9 * 40 + 8) * 2] = bytes.fromhex("007c")  # float16 +Inf in row 9 (third block)
    (ck / "basis.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"basis holds NaN or Inf \(rows 8 to 11\)"):
        arnoldi(MatrixOperator(A), 12, seed=0, basis_dtype=torch.float16, checkpoint=ck)
    raw[(9 * 40 + 7) * 2: (9 * 40 + 8) * 2] = bytes.fromhex("007e")  # a float16 NaN
    (ck / "basis.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="NaN or Inf"):
        arnoldi(MatrixOperator(A), 12, seed=0, basis_dtype=torch.float16, checkpoint=ck)


def _diag_op(n, dtype=D64):
    from gradsketch.linalg import FunctionOperator

    d = torch.linspace(1.0, 2.0, n, dtype=dtype)
    return FunctionOperator(lambda V: d[:, None] * V, (n, n), dtype, symmetric=True)


def test_resume_makes_no_python_side_copy_of_the_rows(tmp_path, monkeypatch):
    """The former loader held the saved rows as ``bytes`` plus a numpy copy (both traced by tracemalloc):
    20 rows of 512 KiB, 10 MiB each. Now the file is read into the basis's own memory; traced allocations
    stay below one block (1 MiB here)."""
    import tracemalloc

    import gradsketch.linalg._krylov_checkpoint as kc

    n = 1 << 16
    op, ck = _diag_op(n), tmp_path / "ck"
    ref = arnoldi(op, 20, seed=0, checkpoint=ck)
    monkeypatch.setattr(kc, "BLOCK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        res = arnoldi(op, 20, seed=0, checkpoint=ck)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.n_matvec == 1 and torch.equal(res.Q, ref.Q) and torch.equal(res.H, ref.H)
    assert peak < 1 << 20, f"traced peak {peak} bytes while resuming 21 rows of {n * 8} bytes"


_RESUME_CHILD = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_linalg_arnoldi_checkpoint import _diag_op
from gradsketch.linalg.arnoldi import arnoldi

def status_mb(key):  # VmHWM, unlike ru_maxrss, is not inherited from the parent across fork + exec
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith(key + ":"))

warm = {ck!r} + "-warm-up"  # first use of each kernel and of the file code allocates for good: not counted
arnoldi(_diag_op(4096, torch.float32), {m}, seed=0, basis_dtype=torch.float16, checkpoint=warm)
arnoldi(_diag_op(4096, torch.float32), {m}, seed=0, basis_dtype=torch.float16, checkpoint=warm)
op = _diag_op({n}, torch.float32)
before = status_mb("VmRSS")
res = arnoldi(op, {m}, seed=0, basis_dtype=torch.float16, checkpoint={ck!r})
print(json.dumps({{"before": before, "peak": status_mb("VmHWM"), "n_matvec": res.n_matvec}}))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/status")
def test_resumed_process_peak_is_the_basis_plus_a_few_blocks(tmp_path):
    """A fresh process resumes a complete float16 checkpoint of 13 rows of 2^21 (52 MiB). The former loader
    held, beside the basis, the file's bytes, a copy of them and a float32 copy for the finiteness check
    (its peak grew 8x the basis; 796 MiB for twice this size); now the growth is the basis plus a few
    float32 working vectors (8 MiB each: the start vector, the check product; about nine measured) and one
    block."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    n, m, ck = 1 << 21, 12, tmp_path / "ck"
    arnoldi(_diag_op(n, torch.float32), m, seed=0, basis_dtype=torch.float16, checkpoint=ck)
    assert (ck / "basis.bin").stat().st_size == (m + 1) * n * 2
    script = _RESUME_CHILD.format(tests=str(Path(__file__).parent), n=n, m=m, ck=str(ck))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n_matvec"] == 1
    basis_mb = (m + 1) * n * 2 / 2**20
    grow = got["peak"] - got["before"]
    print(f"resume: peak RSS grew {grow:.0f} MiB for a {basis_mb:.0f} MiB basis")
    assert grow <= basis_mb + 16 * n * 4 / 2**20, f"peak RSS grew {grow:.0f} MiB for a {basis_mb:.0f} MiB basis"
