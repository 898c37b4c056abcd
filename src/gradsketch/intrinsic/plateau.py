"""When to double d in the one-run search: a plateau test that is robust to evaluation noise.

The one-run search (Schioppa 2024, §5) doubles d when "the metric improved by less than δ in the last c
steps". Taken literally (``rule="step"``: m_k − m_{k−1} < δ) this compares two noisy numbers: with
accuracy on n evaluation examples, one evaluation is off by about √(p(1−p)/n) (0.03 for p = 0.7,
n = 256), six times δ = 0.005, so the test fires on noise while the metric is still rising and the
search runs away to a d several times too large (MiniLM: 512 where fixed-d runs reach τ at 128).

``rule="trend"`` (the default) tests the *trend* of the current stage instead. With y_1..y_W the last W
evaluations of the stage (the first of a stage is the one at which it began), fit y_j = a + b·j by least
squares:

    b = Σ (j − j̄)(y_j − ȳ) / S,   S = Σ (j − j̄)² = W(W² − 1)/12,   se(b) = σ / √S,

where σ is the noise of one evaluation: measured from the residuals, s² = Σ r_j² / (W − 2), unless a
value is given (``noise``; e.g. the binomial bound √(p(1−p)/n) for accuracy on n examples). The stage
has plateaued when, for some window length W in ``min_window``..``max_window`` (at most the stage's
length), the upper confidence bound of the gain per evaluation is below δ:

    b + q·se(b) < δ,   q = t_{1−α', W−2} (σ measured) or z_{1−α'} (σ given),   α' = α / #window lengths.

Several window lengths are tried because a stage typically rises fast and then flattens: the short
recent windows see the flat part as soon as it begins (a long window that still holds the rise has a
positive slope and large residuals), the long ones have the power to see a flat trend under large noise.

Failure probability (the standard regression t-/z-test, Bonferroni over the window lengths): if over
the last ``max_window`` evaluations the metric follows a + β·j plus independent N(0, σ²) noise with a
true gain β ≥ δ per evaluation (still improving at the rate the user asked for), one call declares a
plateau with probability ≤ α; over the T calls of a stage, at most T·α (union bound; consecutive calls
share most of their data, so in practice far less). A flat stage (β ≤ 0) is declared a plateau once a
window is long enough that q·se(b) < δ, with probability ≥ 1/2 then and → 1 as W grows. The evaluation
set's size enters through σ: a smaller evaluation set scatters more, so a stage is tested over more
evaluations before d doubles. No test is made before the stage has ``min_window`` evaluations. Curvature
left in a window inflates s and b, which only delays the doubling (the conservative direction: a late
doubling costs steps, an early one over-estimates D_int).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .._validation import check_choice, check_int, check_real

__all__ = ["PLATEAU_RULES", "MIN_WINDOW", "MAX_WINDOW", "PlateauTest", "trend_test", "binomial_noise"]

#: plateau rules of the one-run search: "trend" (noise-robust, default) and "step" (m_k − m_{k−1} < δ)
PLATEAU_RULES = ("trend", "step")
#: default window lengths of the trend test (evaluations of a stage)
MIN_WINDOW, MAX_WINDOW = 5, 10


@dataclass(frozen=True)
class PlateauTest:
    """One decision of :func:`trend_test`: slope ``b`` (gain per evaluation), its standard error, the
    quantile ``q`` used, the upper bound ``b + q·se``, the window ``W`` and noise σ used, and ``plateau``."""

    slope: float
    stderr: float
    q: float
    upper: float
    window: int
    noise: float
    plateau: bool


def binomial_noise(p: float, n: int) -> float:
    """Standard deviation of an accuracy measured on ``n`` examples whose true value is ``p``: √(p(1−p)/n)
    (binomial; p is clipped to [1/n, 1 − 1/n] so that a measured 0 or 1 does not claim zero noise).

    >>> round(binomial_noise(0.7, 256), 4)
    0.0286
    """
    n = check_int(n, "n", minimum=1)
    p = check_real(p, "p", minimum=0.0, maximum=1.0)
    p = min(max(p, 1.0 / n), 1.0 - 1.0 / n) if n > 1 else 0.5
    return math.sqrt(p * (1.0 - p) / n)


def _slope_test(ys: list[float], delta: float, alpha: float, noise: float | None) -> PlateauTest:
    """Least-squares slope of ``ys`` against 0..W−1 and its one-sided upper (1−α) bound."""
    w = len(ys)
    jbar = (w - 1) / 2.0
    ybar = sum(ys) / w
    sxx = w * (w * w - 1) / 12.0
    b = sum((j - jbar) * (y - ybar) for j, y in enumerate(ys)) / sxx
    if noise is None:
        from scipy.stats import t as student_t

        rss = sum((y - ybar - b * (j - jbar)) ** 2 for j, y in enumerate(ys))
        sigma = math.sqrt(rss / (w - 2))
        q = float(student_t.ppf(1.0 - alpha, w - 2))
    else:
        from scipy.stats import norm

        sigma = float(noise)
        q = float(norm.ppf(1.0 - alpha))
    se = sigma / math.sqrt(sxx)
    if se < 1e-12 * max(1.0, abs(ybar)):  # rounding noise of an exact line
        se = 0.0
    upper = b + q * se
    return PlateauTest(slope=b, stderr=se, q=q, upper=upper, window=w, noise=sigma, plateau=bool(upper < delta))


def trend_test(metrics: Sequence[float], delta: float, alpha: float = 0.05, noise: float | None = None,
               min_window: int = MIN_WINDOW, max_window: int = MAX_WINDOW) -> PlateauTest | None:
    """The ``"trend"`` plateau test (module docstring) on the evaluations ``metrics`` of the current stage,
    oldest first. Returns None while fewer than ``min_window`` evaluations are available (or a non-finite
    one is among the last ``max_window``), else a :class:`PlateauTest` whose ``plateau`` says whether to
    double d: the first window that declares a plateau, or the longest one tested.

    Math: for each W in min_window..min(len, max_window), the least-squares slope b of the last W values
    against 0..W−1, se(b) = σ/√S with S = W(W²−1)/12; plateau iff some window has b + q·se(b) < δ, with
    q = t_{1−α',W−2} (σ from that window's residuals) or z_{1−α'} (σ = ``noise``), α' = α/(max_window −
    min_window + 1) (Bonferroni over the windows, so one call errs with probability ≤ α). Source: the
    ordinary regression slope test (e.g. Wasserman, All of Statistics, §13.3); its use here is this module's.

    >>> t = trend_test([0.50, 0.52, 0.54, 0.56, 0.58], delta=0.005)   # exact line, gain 0.02 > δ
    >>> round(t.slope, 6), t.stderr, t.plateau
    (0.02, 0.0, False)
    >>> trend_test([0.6, 0.6, 0.6, 0.6, 0.6], delta=0.005).plateau     # flat and noiseless
    True
    >>> trend_test([0.6, 0.6, 0.6], delta=0.005) is None               # too few evaluations
    True
    """
    delta = check_real(delta, "delta", minimum=0.0, min_inclusive=False)
    alpha = check_real(alpha, "alpha", minimum=0.0, maximum=0.5, min_inclusive=False, max_inclusive=False)
    check_real(noise, "noise", minimum=0.0, allow_none=True)
    min_window = check_int(min_window, "min_window", minimum=3)
    max_window = check_int(max_window, "max_window", minimum=min_window)
    if len(metrics) < min_window:
        return None
    ys = [float(v) for v in metrics[-max_window:]]
    if not all(math.isfinite(v) for v in ys):
        return None
    a_each = alpha / (max_window - min_window + 1)
    last = None
    for w in range(min_window, len(ys) + 1):
        last = _slope_test(ys[len(ys) - w:], delta, a_each, noise)
        if last.plateau:
            return last
    return last


def check_plateau_options(rule: str, alpha: float, noise: float | str | None, min_window: int,
                          max_window: int) -> None:
    """Validate the plateau options of :func:`gradsketch.intrinsic.intrinsic_dimension` (ValueError naming
    the argument)."""
    check_choice(rule, "plateau", PLATEAU_RULES)
    check_real(alpha, "alpha", minimum=0.0, maximum=0.5, min_inclusive=False, max_inclusive=False)
    if isinstance(noise, str):
        if noise != "binomial":
            raise ValueError(f"noise: expected None, a non-negative number or 'binomial', got {noise!r}")
    else:
        check_real(noise, "noise", minimum=0.0, allow_none=True)
    check_int(min_window, "min_window", minimum=3)
    check_int(max_window, "max_window", minimum=min_window)
