"""scikit-learn's 8×8 digits (1,797 images, 10 classes; ships with scikit-learn, no download).

One loader, :func:`load_digits_split`, serves every built-in use (the demo, the spectrum and
intrinsic-dimension commands, the evaluation benchmarks): a seeded permutation, the first ``n_train``
examples for training and the next ``n_test`` for testing, inputs standardised with the training mean and
standard deviation. :func:`digits_batches` cuts a split into batches; :func:`flip_labels` plants label noise.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Digits", "load_digits_split", "digits_batches", "flip_labels", "N_DIGITS"]

#: number of images in scikit-learn's digits set
N_DIGITS = 1797


class Digits(NamedTuple):
    """Standardised inputs ``x_* [n, 64]``, labels ``y_* [n]`` and the raw images ``img_* [n, 8, 8]``
    (pixel values 0..16) for display."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    img_train: Tensor
    img_test: Tensor


def load_digits_split(n_train: int = 1000, n_test: int = 200, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Digits:
    """A seeded split of the digits set: ``n_train`` training and ``n_test`` test images (disjoint;
    ``n_test`` may be 0), inputs standardised with the training mean and standard deviation (computed in
    float64, then cast to ``dtype``).

    >>> d = load_digits_split(100, 20)
    >>> tuple(d.x_train.shape), tuple(d.img_test.shape), d.y_train.dtype
    ((100, 64), (20, 8, 8), torch.int64)
    """
    from sklearn.datasets import load_digits

    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an integer, got {v!r}")
    if n_train < 1 or n_test < 0 or n_train + n_test > N_DIGITS:
        raise ValueError(f"n_train, n_test: expected n_train >= 1, n_test >= 0 with n_train + n_test <= {N_DIGITS}, "
                         f"got {n_train} and {n_test}")
    ds = load_digits()
    perm = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    raw = torch.tensor(ds.data, dtype=torch.float64)
    mu, sd = raw[tr].mean(0), raw[tr].std(0).clamp_min(1e-3)
    x = ((raw - mu) / sd).to(dtype)
    y = torch.tensor(ds.target, dtype=torch.long)
    img = raw.reshape(-1, 8, 8)
    return Digits(x[tr], y[tr], x[te], y[te], img[tr], img[te])


def digits_batches(x: Tensor, y: Tensor, batch_size: int = 256) -> list[tuple[Tensor, Tensor]]:
    """``[(x[i:i+B], y[i:i+B]), ...]`` in order (the fixed-order batches the attribution store expects).

    >>> d = load_digits_split(10, 0)
    >>> [tuple(b[0].shape) for b in digits_batches(d.x_train, d.y_train, 4)]
    [(4, 64), (4, 64), (2, 64)]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def flip_labels(y: Tensor, fraction: float, n_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip ``round(fraction · n)`` labels chosen at random to a different class drawn uniformly.

    Returns ``(y_noisy [n], flipped [n] bool)``; ``y`` itself is not modified.

    >>> y2, f = flip_labels(torch.zeros(10, dtype=torch.long), 0.3, 10)
    >>> int(f.sum()), bool((y2[f] != 0).all())
    (3, True)
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    if n_classes < 2:
        raise ValueError(f"n_classes: expected at least 2, got {n_classes}")
    g = torch.Generator().manual_seed(seed)
    n = y.shape[0]
    m = int(round(fraction * n))
    idx = torch.randperm(n, generator=g)[:m]
    shift = torch.randint(1, n_classes, (m,), generator=g)
    y2 = y.clone()
    y2[idx] = (y[idx] + shift) % n_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[idx] = True
    return y2, flipped
