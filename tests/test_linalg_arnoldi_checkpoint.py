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
