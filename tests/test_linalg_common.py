"""Cross-cutting behaviour of every linalg algorithm: progress bars change nothing, results do not depend
on the device (CUDA when available) and follow the operator's dtype, half-precision operators work."""

import pytest
import torch

from gradsketch.linalg import (
    FunctionOperator,
    MatrixOperator,
    arnoldi,
    arnoldi_eigs,
    cg,
    eigsh,
    hutchinson,
    hutchpp,
    lanczos,
    lissa,
    slq,
)


def planted(n=60, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigs = torch.linspace(0.1, 5.0, n, dtype=torch.float64)
    A = (Q * eigs) @ Q.T
    return ((A + A.T) / 2).to(dtype=dtype, device=device)


def run_all(op, progress=False):
    b = torch.ones(op.shape[0], dtype=op.dtype, device=op.device)
    return {
        "lanczos": lanczos(op, 3, progress=progress).eigenvalues,
        "arnoldi_H": arnoldi(op, 10, progress=progress).H,
        "arnoldi_eigs": arnoldi_eigs(op, 3, n_iter=40, progress=progress).eigenvalues,
        "hutchinson": torch.tensor(hutchinson(op, 5, progress=progress).estimate),
        "hutchpp": torch.tensor(hutchpp(op, 9, progress=progress).estimate),
        "slq": slq(op, 3, 10, progress=progress).nodes,
        "cg": cg(op, b, damping=0.1, progress=progress).x,
        "lissa": lissa(op, b, damping=0.1, scale=6.0, depth=50, progress=progress).x,
    }


def test_progress_changes_nothing():
    op = MatrixOperator(planted())
    quiet, loud = run_all(op), run_all(op, progress=True)
    for key in quiet:
        assert torch.equal(quiet[key], loud[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    cpu = run_all(MatrixOperator(planted(dtype=dtype)))
    gpu_op = MatrixOperator(planted(dtype=dtype, device="cuda"))
    gpu = run_all(gpu_op)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for key in cpu:
        if key.startswith(("lanczos", "arnoldi_eigs", "cg", "lissa")):
            assert gpu[key].device.type == "cuda", key
        assert torch.allclose(gpu[key].cpu().to(cpu[key].dtype), cpu[key], rtol=tol, atol=tol), key
    r = lanczos(gpu_op, 2)
    assert r.eigenvectors.device.type == "cuda" and r.eigenvectors.dtype == dtype
    assert eigsh(gpu_op, 2).eigenvectors.device.type == "cuda"


def test_half_precision_operator_runs_in_float32():
    A = planted()
    op = FunctionOperator(lambda V: (A.float() @ V.float()).to(torch.bfloat16), (60, 60), torch.bfloat16,
                          symmetric=True)
    r = lanczos(op, 2, check_symmetric=1e-2, tol=1e-2)
    assert r.eigenvalues.dtype == torch.float32
    assert torch.allclose(r.eigenvalues.double(), torch.tensor([5.0, 5.0 - 4.9 / 59], dtype=torch.float64),
                          rtol=2e-2)
    assert abs(hutchinson(op, 20).estimate - float(torch.linspace(0.1, 5.0, 60).sum())) < 20
