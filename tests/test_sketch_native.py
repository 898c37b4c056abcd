"""The native CPU kernels (sketch/_native.c) against explicit matrices, and every sketch's fast path
(native kernels, no autograd) against its autograd path and against its explicit matrix.

When no C compiler is available the kernel tests skip (the library then uses the pure-torch transforms,
which test_sketch.py covers); `test_native_builds_here` fails instead of skipping on a machine that has a
compiler, so a broken build cannot hide behind a skip.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gradsketch import sketch
from gradsketch.sketch import _native
from gradsketch.sketch._transforms import hadamard, wht

HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
native = pytest.mark.skipif(_native.library() is None, reason="native kernels not built: " + str(_native.status()))


def test_native_builds_here():
    if not HAVE_CC or os.environ.get("GRADSKETCH_NATIVE", "1") == "0":
        pytest.skip("no C compiler on this machine, or native kernels switched off")
    st = _native.status()
    assert st["state"] == "loaded", st


def _h(n: int) -> torch.Tensor:
    return hadamard(n, torch.float64) * math.sqrt(n)  # unnormalised ±1 Sylvester matrix


def _butterflies(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised WHT of every row by plain radix-2 butterflies (independent of the kernel)."""
    m, n = x.shape
    y = x.clone()
    h = 1
    while h < n:
        y = y.view(m, n // (2 * h), 2, h)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2).reshape(m, n)
        h *= 2
    return y


@native
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32, 1024, 4096, 8192, 1 << 15])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fwht_equals_hadamard_matrix(n, rows, threads):
    g = torch.Generator().manual_seed(n + rows)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    want = (x @ _h(n) if n <= 4096 else _butterflies(x)) * 0.25  # H is symmetric
    got = _native.fwht_(x.clone(), 0.25, threads=threads)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12 * math.sqrt(n))
    x32 = x.float()
    got32 = _native.fwht_(x32.clone(), 0.25, threads=threads)
    assert torch.allclose(got32.double(), want, rtol=1e-5, atol=1e-5 * math.sqrt(n))


@native
def test_fwht_long_rows_shared_between_threads():
    # fewer rows than threads and rows longer than one block: each row is split between threads in two phases
    n = 1 << 16
    x = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = _butterflies(x)
    got = _native.fwht_(x.clone(), 1.0, threads=2)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="power of two"):
        _native.fwht_(torch.randn(2, 12, dtype=torch.float64), 1.0)


@native
@pytest.mark.parametrize("b", [1, 2, 8, 16, 64, 512])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_whtsel_equals_restricted_permuted_hadamard(b, dtype):
    g = torch.Generator().manual_seed(b)
    groups, m = 5, 3
    x = torch.randn(m, groups * b, generator=g, dtype=dtype)
    mult = torch.randn(groups * b, generator=g, dtype=dtype)
    perm = torch.randperm(b, generator=g)
    rows = torch.randperm(b, generator=g)[: max(1, b // 4)]
    mat = _h(b)[rows][:, perm]  # the factor as the sketches store it (up to the 1/√b scale)
    want = ((x.double() * mult.double()).view(m, groups, b) @ mat.T) * 0.5
    got = _native.whtsel(x, b, rows, 0.5, src=torch.argsort(perm), mult=mult)
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol * math.sqrt(b))
    plain = _native.whtsel(x, b, rows, 1.0)
    assert torch.allclose(plain.double(), x.double().view(m, groups, b) @ _h(b)[rows].T, rtol=tol, atol=tol * b)
    with pytest.raises(ValueError, match="src must have"):
        _native.whtsel(x, b, rows, 1.0, src=torch.arange(b + 1))


@native
@pytest.mark.parametrize("index", [torch.int32, torch.int16])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_sjlt_scatter_equals_index_add(m, index):
    g = torch.Generator().manual_seed(m)
    n, d, s = 1000, 37, 3
    x = torch.randn(m, n, generator=g, dtype=torch.float64)
    rows = torch.randint(0, d, (s, n), generator=g, dtype=torch.int32)
    vals = torch.randn(s, n, generator=g, dtype=torch.float64)
    want = torch.zeros(m, d, dtype=torch.float64)
    for k in range(s):
        want.index_add_(1, rows[k].long(), x * vals[k])
    assert torch.allclose(_native.sjlt(x, rows.to(index), vals, d, threads=2), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="int32 or int16 rows"):
        _native.sjlt(x, rows.long(), vals, d)


@native
@pytest.mark.parametrize("index", [torch.int32, torch.int16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,s,n", [(1, 1, 1000), (1, 1, 70_000), (3, 1, 70_000), (2, 3, 1000), (5, 2, 70_000)])
def test_gather_is_the_torch_gather_bit_for_bit_and_the_adjoint_of_sjlt(m, s, n, dtype, index):
    """gather(y) = y[:, rows[0]]·vals[0] + y[:, rows[1]]·vals[1] + ... exactly (same products, same order of
    sums), on one thread and split over two (n = 70,000 ≥ the parallel threshold: column ranges for s = 1);
    and <sjlt(x), y> = <x, gather(y)>."""
    g = torch.Generator().manual_seed(m * 100 + s)
    d = 300
    y = torch.randn(m, d, generator=g, dtype=dtype)
    rows = torch.randint(0, d, (s, n), generator=g, dtype=torch.int32)
    vals = torch.randn(s, n, generator=g, dtype=dtype)
    want = y[:, rows[0].long()] * vals[0]
    for k in range(1, s):
        want = want + y[:, rows[k].long()] * vals[k]
    for threads in (1, 2):
        assert torch.equal(_native.gather(y, rows.to(index), vals, threads=threads), want)
    x = torch.randn(m, n, generator=g, dtype=torch.float64)
    lhs = (_native.sjlt(x, rows.to(index), vals.double(), d) * y.double()).sum()
    rhs = (x * _native.gather(y.double(), rows.to(index), vals.double())).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10)
    with pytest.raises(ValueError, match="gather: expected int32 or int16 rows"):
        _native.gather(y, rows.long(), vals)
    with pytest.raises(ValueError, match="gather: expected int32 or int16 rows"):
        _native.gather(y, rows, vals[:, :-1])


# -- every kind: fast path == autograd path == explicit matrix ------------------------------------------------
FAST_KINDS = [("affd", {}), ("afjl", {}), ("fjl", {}), ("sjlt", {}), ("qk", {}), ("ffd", {}),
              ("affd", {"preconditioner": "orthogonal"}), ("afjl", {"preconditioner": "fft"})]


@pytest.mark.parametrize("kind,opts", FAST_KINDS)
@pytest.mark.parametrize("n", [1 << 13, 9000])
def test_fast_path_equals_autograd_path_and_matrix(kind, opts, n):
    d = 256
    S = sketch(kind, n, d, seed=7, **opts)
    rows = (1 << 20) // n + 2  # above the fast path's size threshold
    x = torch.randn(rows, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = S(x)
    slow = S(x.clone().requires_grad_(True)).detach()
    mat = S.T(torch.eye(d, dtype=torch.float64))  # [d, n]: row i is Sᵀe_i, i.e. the explicit matrix
    want = x @ mat.T
    assert torch.allclose(fast, want, rtol=1e-9, atol=1e-9), (fast - want).abs().max()
    assert torch.allclose(slow, want, rtol=1e-9, atol=1e-9), (slow - want).abs().max()
    f32 = S(x.float())
    assert torch.allclose(f32.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max())


def test_native_wht_is_differentiable_to_second_order_and_forward_mode():
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: wht(t), (x,))
    assert torch.autograd.gradgradcheck(lambda t: (wht(t) ** 2).sum(), (x,))
    import torch.autograd.forward_ad as fwAD

    t = torch.randn(3, 64, dtype=torch.float64)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), t)
        out = fwAD.unpack_dual(wht(dual)).tangent
    assert torch.allclose(out, t @ hadamard(64, torch.float64), atol=1e-12)
    _, jvp = torch.func.jvp(lambda u: wht(u), (x.detach(),), (t,))  # torch.func: the pure-torch transform
    assert torch.allclose(jvp, out, atol=1e-12)


def test_switched_off_kernels_give_the_same_sketches(tmp_path):
    """GRADSKETCH_NATIVE=0 (pure torch) and the native kernels compute the same linear maps."""
    code = (
        "import json, torch, gradsketch as gs\n"
        "x = torch.randn(70, 1 << 14, dtype=torch.float64, generator=torch.Generator().manual_seed(0))\n"
        "out = {k: gs.sketch(k, 1 << 14, 300, seed=2)(x)[:, :5].tolist() for k in ('affd', 'afjl', 'fjl', 'sjlt')}\n"
        "from gradsketch.sketch._native import status\n"
        "print(json.dumps({'state': status()['state'], 'out': out}))\n"
    )
    res = {}
    for flag in ("0", "1"):
        env = dict(os.environ, GRADSKETCH_NATIVE=flag, GRADSKETCH_CACHE=str(tmp_path / "cache"))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        res[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["0"]["state"].startswith("disabled")
    if HAVE_CC:
        assert res["1"]["state"] == "loaded"
    for k, v in res["0"]["out"].items():
        assert torch.allclose(torch.tensor(v), torch.tensor(res["1"]["out"][k]), rtol=1e-10, atol=1e-10), k


@native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kernels_work_in_a_forked_child():
    """A thread pool inherited through fork() has no threads: the child must make its own, not hang."""
    x = torch.randn(4, 1 << 17)
    want = _native.fwht_(x.clone(), 1.0, threads=2)  # creates the pool in the parent
    pid = os.fork()
    if pid == 0:  # child: exit code 0 iff the kernel runs and agrees
        ok = False
        try:
            torch.set_num_threads(1)  # as DataLoader workers do: torch's own OpenMP pool is not fork-safe
            ok = torch.allclose(_native.fwht_(x.clone(), 1.0, threads=2), want)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("kind", ["affd", "afjl", "fjl", "sjlt"])
def test_batched_gradients_through_the_sketch(kind):
    """autograd.grad(is_grads_batched=True) hands the backward storage-less batched tensors: the kernels
    must step aside for the torch formulation (implicit-mode per-example gradients rely on this)."""
    S = sketch(kind, 3000, 64, seed=1)
    w = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    out = S.T(w)
    v = torch.randn(3, 3000, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, w, v, is_grads_batched=True)
    assert torch.allclose(g, S(v), atol=1e-10)


@native
@pytest.mark.parametrize("b", [1, 4, 64])
def test_whtsel_adjoint_identity(b):
    g = torch.Generator().manual_seed(b)
    n = 5 * b
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    sel = torch.randperm(b, generator=g)[: max(1, b // 2)]
    src = torch.argsort(torch.randperm(b, generator=g))
    mult = torch.randn(n, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, sel.numel(), generator=g, dtype=torch.float64)
    lhs = (_native.whtsel(x, b, sel, 0.3, src=src, mult=mult) * y).sum()
    rhs = (x * _native.whtsel_t(y, b, sel, 0.3, src=src, mult=mult)).sum()
    assert abs(float(lhs - rhs)) < 1e-10 * float(x.abs().sum() * y.abs().sum()) ** 0.5
    with pytest.raises(ValueError, match="sel has"):
        _native.whtsel_t(y, b, sel[:0] if sel.numel() > 1 else torch.arange(2), 1.0)


@pytest.mark.parametrize("kind", ["affd", "afjl"])
def test_native_adjoint_equals_torch_adjoint(kind):
    S = sketch(kind, 9000, 300, seed=4)
    y = torch.randn(5, 300, dtype=torch.float64)
    got = S.T(y)
    with _native.disabled():
        want = S.T(y)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    small = sketch(kind, 70, 6, seed=4)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: small.T(t), (w,))
    assert torch.autograd.gradgradcheck(lambda t: small.T(t), (w,))


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_code_is_never_loaded_from_a_directory_others_can_write(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert not _native._private_dir(shared)
    private = tmp_path / "private"
    assert _native._private_dir(private) and (private.stat().st_mode & 0o077) == 0


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n", [(1, 10), (1, 100_000), (2, 100_000), (5, 1000)])
def test_signs_mul_equals_the_product_bit_for_bit(m, n, dtype):
    """signs_mul(x, s) = x·s exactly (by sign flips), in place, into a strided out (rows of a wider buffer),
    on one thread and on two (column ranges when M < threads)."""
    g = torch.Generator().manual_seed(m + n)
    x = torch.randn(m, n, generator=g, dtype=dtype)
    x[0, 0] = 0.0
    signs = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)
    want = x * signs
    for threads in (1, 2):
        buf = torch.full((m, n + 7), 5.0, dtype=dtype)
        _native.signs_mul(x, signs, out=buf[:, :n], threads=threads)
        assert torch.equal(buf[:, :n], want) and bool((buf[:, n:] == 5.0).all())
        y = x.clone()
        assert _native.signs_mul(y, signs, threads=threads) is y and torch.equal(y, want)
    with pytest.raises(ValueError, match="int8 signs"):
        _native.signs_mul(x, signs.float())
    with pytest.raises(ValueError, match="int8 signs"):
        _native.signs_mul(x, signs[:-1])
