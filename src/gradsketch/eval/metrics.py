"""Attribution quality metrics: linear datamodeling score, leave-one-out agreement, mislabel detection.

Sources: Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023 (LDS); Koh & Liang 2017
(leave-one-out); Schioppa et al., AAAI 2022 (mislabel detection with self-influence).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
    return a


def _rank(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=0)


def spearman_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of each column of ``a [S, T]`` with the same column of ``b [S, T]``
    (average ranks for ties; NaN for a constant column)."""
    ra, rb = _rank(a), _rank(b)
    ra = ra - ra.mean(0)
    rb = rb - rb.mean(0)
    den = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(0) / np.where(den > 0, den, 1), np.nan)


class LDSResult(NamedTuple):
    """``mean``: LDS averaged over targets (NaN targets skipped); ``per_target [n_test]``."""

    mean: float
    per_target: np.ndarray


def lds(scores, masks, outputs) -> LDSResult:
    """Linear datamodeling score (Park et al. 2023).

    ``scores [n_test, n_train]`` attributions, ``masks [S, n_train]`` the training subsets (0/1),
    ``outputs [S, n_test]`` the measured outputs of models trained on each subset (e.g. the correct-class
    margin, averaged over runs). The prediction for subset s and target t is Σ_{i ∈ S_s} scores[t, i]; the
    LDS of target t is the Spearman correlation over subsets between predictions and outputs, and the
    result is its mean over targets. Outputs must increase with support (margin, log-prob, or −loss).
    """
    s, m, o = _np(scores, "scores"), _np(masks, "masks"), _np(outputs, "outputs")
    if s.ndim != 2 or m.ndim != 2 or o.ndim != 2:
        raise ValueError(f"scores, masks, outputs: expected 2-d arrays, got shapes {s.shape}, {m.shape}, {o.shape}")
    if m.shape[1] != s.shape[1]:
        raise ValueError(f"masks: expected {s.shape[1]} columns (n_train of scores), got {m.shape[1]}")
    if o.shape != (m.shape[0], s.shape[0]):
        raise ValueError(f"outputs: expected shape [{m.shape[0]}, {s.shape[0]}] (n_subsets, n_test), got {o.shape}")
    if m.shape[0] < 3:
        raise ValueError(f"masks: expected at least 3 subsets for a rank correlation, got {m.shape[0]}")
    pred = m @ s.T
    per = spearman_columns(pred, o)
    return LDSResult(float(np.nanmean(per)) if np.any(np.isfinite(per)) else float("nan"), per)


class MislabelResult(NamedTuple):
    """ROC-AUC, average precision, and the ROC curve (fpr, tpr) of a mislabel-detection statistic."""

    auc: float
    ap: float
    fpr: np.ndarray
    tpr: np.ndarray


def mislabel_detection(statistic, flipped) -> MislabelResult:
    """How well ``statistic [n]`` (larger = more suspicious, e.g. self-influence) ranks the planted label
    flips ``flipped [n]`` (bool) first: ROC-AUC and average precision (scikit-learn's definitions)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    s = _np(statistic, "statistic")
    f = np.asarray(flipped.cpu().numpy() if isinstance(flipped, Tensor) else flipped).astype(bool)
    if s.shape != f.shape or s.ndim != 1:
        raise ValueError(f"statistic, flipped: expected two 1-d arrays of the same length, got {s.shape} and {f.shape}")
    if f.all() or not f.any():
        raise ValueError("flipped: expected both flipped and clean examples, got only one kind")
    fpr, tpr, _ = roc_curve(f, s)
    return MislabelResult(float(roc_auc_score(f, s)), float(average_precision_score(f, s)), fpr, tpr)


def loo_correlation(scores, effects) -> tuple[float, float]:
    """(Pearson, Spearman) correlation between attribution scores and leave-one-out effects, both
    ``[n_removed, n_test]`` (flattened)."""
    from scipy.stats import pearsonr, spearmanr

    a, b = _np(scores, "scores").ravel(), _np(effects, "effects").ravel()
    if a.shape != b.shape:
        raise ValueError(f"scores, effects: expected the same shape, got {a.shape} and {b.shape}")
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x)
