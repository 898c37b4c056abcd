"""Deterministic randomness: every random object is drawn from a CPU generator seeded from its spec."""

from __future__ import annotations

import hashlib
import json

import torch


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed from ``seed`` and any JSON-serialisable tags (stable across runs and machines)."""
    blob = json.dumps([int(seed), *[str(t) for t in tags]], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *tags))
    return g


def gamma(alpha: float, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Gamma(``alpha``, 1) draws ``[*shape]`` (float64) from ``gen`` only: Marsaglia & Tsang's squeeze-free
    rejection method (ACM TOMS 2000; acceptance > 95% for α ≥ 1), with the boost
    Gamma(α) = Gamma(α + 1)·U^(1/α) for α < 1. Deterministic for a given generator state.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = gamma(3.0, (20000,), g)
    >>> abs(float(x.mean()) - 3.0) < 0.1  # sd of the mean: sqrt(3/20000) = 0.012
    True
    """
    if not alpha > 0:
        raise ValueError(f"alpha: expected a number > 0, got {alpha!r}")
    a = alpha if alpha >= 1 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.empty(n, dtype=torch.float64)
    todo: torch.Tensor | None = None  # indices still to draw (None: all of them, the first round)
    m = n
    while m:
        # the same operations, in the same order, as v = (1 + c·x)³ and
        # log u < x²/2 + d − d·v + d·log v, evaluated in place: four m-long float64 arrays at a time
        x = torch.randn(m, generator=gen, dtype=torch.float64)
        v = torch.mul(x, c).add_(1.0).pow_(3)
        u = torch.rand(m, generator=gen, dtype=torch.float64)
        t = torch.mul(x, 0.5)
        t.mul_(x).add_(d).sub_(torch.mul(v, d))
        t.add_(v.clamp_min(1e-300).log_().mul_(d))
        del x
        ok = u.log_().lt_(t).bool() & (v > 0)
        del u, t
        if todo is None and bool(ok.all()):
            out = v.mul_(d)
            break
        idx = ok.nonzero().squeeze(1) if todo is None else todo[ok]
        out[idx] = v[ok].mul_(d)
        todo = (~ok).nonzero().squeeze(1) if todo is None else todo[~ok]
        m = todo.numel()
    if alpha < 1:
        out *= torch.rand(n, generator=gen, dtype=torch.float64) ** (1.0 / alpha)
    return out.reshape(shape)


def chi(dof: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """χ-distributed draws with ``dof`` degrees of freedom (the norm of a ``dof``-dimensional standard
    Gaussian): ``sqrt(2·Gamma(dof/2))``, float64, from ``gen`` only.

    >>> g = torch.Generator().manual_seed(1)
    >>> abs(float((chi(64, (20000,), g) ** 2).mean()) - 64) < 1.0  # sd of the mean: sqrt(128/20000) = 0.08
    True
    """
    return gamma(dof / 2.0, shape, gen).mul_(2.0).sqrt_()  # = (2·Gamma).sqrt(), in place
