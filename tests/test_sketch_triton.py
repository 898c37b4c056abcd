"""The Triton kernels (sketch/_triton.py) and their dispatch.

On a CPU the kernels run through Triton's interpreter in a subprocess started with TRITON_INTERPRET=1 (it
must be set before triton is imported, and the library never sets it), against exact float64 answers and
the torch formulation (tests/_triton_interp_child.py). On a CUDA machine the tests below marked ``cuda``
run the compiled kernels and every sketch kind's forward, adjoint and autograd on the device against the
CPU: float64 (the torch formulation on both; max |Δ| ≤ 1e-10·max |y|) and float32 (Triton on the device;
max |Δ| ≤ 2e-5·max |y|), and the kernels in float16/bfloat16 against float64 (≤ 4e-3 / 3e-2 of max |y|,
the inputs' own rounding).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradsketch import sketch
from gradsketch.sketch import _triton as T
from gradsketch.sketch._transforms import hadamard

HAVE_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
CHILD = Path(__file__).with_name("_triton_interp_child.py")


def _interp(which: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", GRADSKETCH_NATIVE="0")
    env.pop("GRADSKETCH_TRITON", None)
    r = subprocess.run([sys.executable, str(CHILD), which], capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _check(results: list[dict]) -> None:
    assert results
    bad = [r for r in results if not r["err"] <= r["tol"]]
    assert not bad, "\n".join(f"{r['name']}: {r['err']:.2e} > {r['tol']:.0e}" for r in bad)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_kernels_and_dispatch_through_the_interpreter():
    """FWHT (padding, signs, several passes), the restricted last factor and its adjoint, the CountSketch
    scatter, and affd/afjl/fjl/sjlt through the Triton dispatch, all on CPU tensors in the interpreter."""
    res = _interp("quick")
    _check(res)
    names = " ".join(r["name"] for r in res)
    for what in ("fwht", "whtsel", "whtsel_t", "sjlt", "sketch affd", "adjoint afjl", "autograd affd"):
        assert what in names


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_kernels_and_dispatch_through_the_interpreter_full():
    _check(_interp("full"))


def test_cpu_tensors_keep_the_existing_paths_and_never_import_triton_and_the_opt_out():
    code = ("import os, sys, torch, gradsketch as gs\n"
            "from gradsketch.sketch import _triton\n"
            "x = torch.randn(3, 1000)\n"
            "for k in ('affd', 'afjl', 'fjl', 'sjlt', 'qk'):\n"
            "    gs.sketch(k, 1000, 64)(x)\n"
            "assert not _triton.usable(x)\n"
            "print('triton' in sys.modules)\n"
            "os.environ['GRADSKETCH_TRITON'] = '0'  # this child's own environment: the opt-out is read\n"
            "_triton.kernels.cache_clear()\n"
            "print(_triton.kernels() is None, _triton.status()['state'])\n")
    env = dict(os.environ)
    env.pop("GRADSKETCH_TRITON", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["False", "True disabled by GRADSKETCH_TRITON"]


def test_opt_out_by_context_and_float64():
    x = torch.zeros(2, 8)
    old = T.DEVICES
    try:
        T.DEVICES = ("cpu",)
        with T.disabled():
            assert not T.usable(x)
        assert T.usable(x) == (HAVE_TRITON and T.kernels() is not None)
        assert not T.usable(x.double())  # float64 always takes the torch formulation
    finally:
        T.DEVICES = old


def test_bad_sizes_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match="n_pad"):
        T.fwht(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="b"):
        T.whtsel(torch.zeros(2, 12), 3, torch.tensor([0]), 1.0)


# ---------------------------------------------------------------------------------------------- CUDA
VARIANTS = [("dense", {}), ("sjlt", {}), ("sjlt", {"s": 3}), ("fjl", {}), ("ffd", {}), ("affd", {}), ("afjl", {}),
            ("qk", {}), ("affd", {"preconditioner": "fft"}), ("afjl", {"preconditioner": "orthogonal"}),
            ("affd", {"preconditioner": "orthogonal"})]
IDS = [k + "".join(f"-{v}" for v in o.values()) for k, o in VARIANTS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max())


@cuda
@pytest.mark.parametrize("n,n_pad", [(1024, 1024), (3000, 4096), (1 << 14, 1 << 14), (70000, 1 << 17)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_cuda_fwht_against_float64(n, n_pad, dtype, tol):
    if T.kernels() is None:
        pytest.skip(f"triton kernels unavailable: {T.status()}")
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    mult = torch.randn(n_pad, generator=g, dtype=torch.float64)
    from gradsketch.sketch._native import _reference_wht

    want = _reference_wht(torch.nn.functional.pad(x, (0, n_pad - n)) * mult) / math.sqrt(n_pad)
    got = T.fwht(x.to(dtype).cuda(), n_pad, mult.to(dtype).cuda(), out_dtype=torch.float32)
    assert _rel(got, want) <= tol


@cuda
@pytest.mark.parametrize("b,r", [(16, 4), (256, 32), (1024, 1024)])
def test_cuda_whtsel_and_adjoint_against_float64(b, r):
    if T.kernels() is None:
        pytest.skip(f"triton kernels unavailable: {T.status()}")
    g = torch.Generator().manual_seed(b)
    groups = 37
    n = b * groups
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    sel, src = torch.randperm(b, generator=g)[:r], torch.randperm(b, generator=g)
    mult = torch.randn(n, generator=g, dtype=torch.float64)
    H = hadamard(b, torch.float64)
    want = ((x * mult).view(3, groups, b)[:, :, src] @ H.T)[:, :, sel]
    got = T.whtsel(x.float().cuda(), b, sel, 1 / math.sqrt(b), src=src, mult=mult.float().cuda())
    assert _rel(got, want) <= 2e-6
    y = torch.randn(3, groups, r, generator=g, dtype=torch.float64)
    back = T.whtsel_t(y.float().cuda(), b, sel, 1 / math.sqrt(b), src=src, mult=mult.float().cuda()).double().cpu()
    lhs, rhs = (want * y).sum(), (x * back).sum()
    assert abs(float(lhs - rhs)) <= 1e-5 * float((want.abs() * y.abs()).sum())


@cuda
@pytest.mark.parametrize("kind,opts", VARIANTS, ids=IDS)
@pytest.mark.parametrize("triton_on", [True, False])
def test_cuda_sketch_forward_adjoint_autograd_match_cpu(kind, opts, triton_on):
    n, d = 5000, 64
    S_cpu = sketch(kind, n, d, seed=4, **opts)
    S_gpu = sketch(**S_cpu.spec).to("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    y = torch.randn(3, d, generator=g, dtype=torch.float64)
    ctx = T.disabled() if not triton_on else _null()
    with ctx:
        # float64: the torch formulation on both devices
        assert _rel(S_gpu(x.cuda()), S_cpu(x)) <= 1e-10
        assert _rel(S_gpu.T(y.cuda()), S_cpu.T(y)) <= 1e-10
        # float32: Triton on the device where it applies
        assert _rel(S_gpu(x.float().cuda()), S_cpu(x)) <= 2e-5
        assert _rel(S_gpu.T(y.float().cuda()), S_cpu.T(y)) <= 2e-5
        # autograd on the device: d<Φx, y>/dx = Φᵀy
        xr = x.float().cuda().requires_grad_(True)
        (gx,) = torch.autograd.grad((S_gpu(xr) * y.float().cuda()).sum(), xr)
        assert _rel(gx, S_cpu.T(y)) <= 2e-5
        # the chunked no-autograd fast path (≥ 2^20 elements) against the CPU in float32
        xb = torch.randn(2**20 // n + 1, n, generator=g)
        assert _rel(S_gpu(xb.cuda()), S_cpu(xb.double())) <= 2e-5


@cuda
def test_cuda_dispatch_reaches_triton():
    if T.kernels() is None:
        pytest.skip(f"triton kernels unavailable: {T.status()}")
    x = torch.randn(2, 1 << 12, device="cuda")
    assert T.usable(x) and not T.usable(x.double()) and not T.usable(x.cpu())
    with T.disabled():
        assert not T.usable(x)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _sm90_compile(fn, types: dict, consts: dict, num_warps: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    return k.asm


@pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
def test_kernels_compile_for_hopper_without_a_gpu(tmp_path, monkeypatch):
    """Each kernel goes through Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM, PTX, ptxas to a cubin) for
    sm_90 with the launch sizes the wrappers use: errors that only the GPU compiler sees (layouts of gather,
    reshape/permute/join) show up here without a device. Skipped when triton's CUDA backend is absent."""
    try:
        from gradsketch.sketch import _triton_kernels as K
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"triton kernels do not import: {e!r}")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # triton's compile cache, not the user's ~/.triton
    f32, i32 = "*fp32", "i32"
    cases = [
        (K.fwht_fast_kernel, dict(x_ptr="*bf16", out_ptr=f32, mult_ptr="*bf16", n_in=i32, stride_in=i32, n_out=i32,
                                  groups=i32, scale="fp32"), dict(LOG_R=12, BG=1, HAS_MULT=True), T._warps(1 << 12)),
        (K.fwht_strided_kernel, dict(in_ptr=f32, out_ptr=f32, C=i32, scale="fp32"), dict(LOG_R=8, BC=32),
         T._warps(1 << 13)),
        (K.whtsel_kernel, dict(x_ptr=f32, out_ptr=f32, src_ptr="*i32", mult_ptr=f32, sel_ptr="*i32", n=i32,
                               groups=i32, r=i32, scale="fp32"),
         dict(LOG_B=10, LOG_RS=5, BG=4, HAS_SRC=True, HAS_MULT=True), T._warps(1 << 12)),
        (K.whtsel_t_kernel, dict(y_ptr=f32, out_ptr=f32, src_ptr="*i32", mult_ptr=f32, inv_ptr="*i32", n=i32,
                                 groups=i32, r=i32, scale="fp32"),
         dict(LOG_B=8, LOG_RS=3, BG=16, HAS_SRC=True, HAS_MULT=True), T._warps(1 << 12)),
        (K.sjlt_kernel, dict(x_ptr=f32, rows_ptr="*i32", vals_ptr=f32, y_ptr=f32, M=i32, n=i32, d=i32, s=i32),
         dict(BM=16, BN=256), T._warps(1 << 12)),
    ]
    for fn, types, consts, nw in cases:
        try:
            asm = _sm90_compile(fn, types, consts, nw)
        except (ImportError, FileNotFoundError, RuntimeError) as e:
            if "ptxas" in str(e).lower() or "backend" in str(e).lower():
                pytest.skip(f"no CUDA compiler backend in this triton install: {e!r}")
            raise
        assert asm.get("cubin"), fn
