"""Offline evaluation data: scikit-learn digits split, planted label flips.

Source of the data: ``sklearn.datasets.load_digits`` (1,797 8×8 images, 10 classes; ships with
scikit-learn, no download).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


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
    """A seeded split of the digits set: ``n_train`` training and ``n_test`` test images (disjoint),
    inputs standardised with the training mean and standard deviation."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    n = ds.data.shape[0]
    if n_train < 1 or n_test < 1 or n_train + n_test > n:
        raise ValueError(f"n_train, n_test: expected positive counts with n_train + n_test <= {n}, got "
                         f"{n_train} and {n_test}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    raw = torch.tensor(ds.data, dtype=torch.float64)
    mu, sd = raw[tr].mean(0), raw[tr].std(0).clamp_min(1e-3)
    x = ((raw - mu) / sd).to(dtype)
    y = torch.tensor(ds.target, dtype=torch.long)
    img = raw.reshape(-1, 8, 8)
    return Digits(x[tr], y[tr], x[te], y[te], img[tr], img[te])


def flip_labels(y: Tensor, fraction: float, n_classes: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Flip ``round(fraction · n)`` labels chosen at random to a different class drawn uniformly.

    Returns ``(y_noisy [n], flipped [n] bool)``."""
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
