"""Post-hoc correlation mode decomposition (CMD) of a weight trajectory (Brokman et al., ICLR 2024, §3).

Model: every weight follows an affine copy of its mode's reference weight, ``w_i(t) ≈ a_i · w_r(m_i)(t) + b_i``.
Steps (ALGORITHMS.md §6): sample K weights, cluster their |correlation| matrix (complete linkage) into M
modes, pick as reference the member with the highest mean |correlation| inside its mode, then stream
over all N weights: assign each to the reference it is most |correlated| with and fit ``(a_i, b_i)`` by
least squares, ``a_i = cov(w_i, w_r) / var(w_r)``, ``b_i = mean(w_i) - a_i · mean(w_r)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from ._layout import Layout
from ._source import Source

CONSTANT = -1  # mode label of a weight that never moves (correlation undefined): a = 0, b = its value
KEPT = -2      # mode label of a weight kept as recorded (BatchNorm statistics with bn="keep")
SAMPLINGS = ("layer", "uniform", "variance")


@dataclass
class CMDResult:
    """Result of :func:`cmd` over ``N`` weights, ``E`` snapshots and ``M`` modes.

    ``modes [N]`` (int32; ``-1`` constant weight, ``-2`` kept as recorded), ``a [N]``, ``b [N]``,
    ``ref_index [M]`` (weight index of each reference), ``ref_traj [M, E]`` (float64 reference trajectories),
    ``sample_index [K]`` / ``sample_modes [K]`` (the clustered sample), ``kept_index`` / ``kept_values
    [n_kept, E]``, ``layers`` ``(name, start, stop)``, ``layer_error`` (relative Frobenius error of the
    reconstruction per layer over all snapshots: ``‖W - Ŵ‖_F / ‖W‖_F``), ``layer_mode_counts [L, M]``
    (mode membership per layer), ``rel_error`` (the same over all weights), ``layout`` (when known).
    """

    modes: np.ndarray
    a: np.ndarray
    b: np.ndarray
    ref_index: np.ndarray
    ref_traj: np.ndarray
    sample_index: np.ndarray
    sample_modes: np.ndarray
    kept_index: np.ndarray
    kept_values: np.ndarray
    layers: list[tuple[str, int, int]]
    layer_error: dict[str, float]
    layer_mode_counts: np.ndarray
    rel_error: float
    n_constant: int
    layout: Layout | None = None
    start: int = 0
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.a.shape[0])

    @property
    def n_modes(self) -> int:
        return int(self.ref_index.shape[0])

    @property
    def n_snapshots(self) -> int:
        return int(self.ref_traj.shape[1])

    def weights_from_references(self, r) -> torch.Tensor:
        """CMD weights ``[N]`` for reference values ``r [M]``: ``a ⊙ r[modes] + b`` (kept weights read 0 here)."""
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (self.n_modes,):
            raise ValueError(f"r: expected shape [{self.n_modes}], got {tuple(r.shape)}")
        idx = np.maximum(self.modes, 0)
        w = (self.a * r[idx].astype(self.a.dtype)) + self.b
        return torch.from_numpy(w)

    def reconstruct(self, t: int | None = None) -> torch.Tensor:
        """Reconstructed weights: ``[N]`` at snapshot ``t`` (negative counts from the end), or ``[N, E]`` for all.

        ``t`` counts the snapshots CMD saw (those from ``start`` on). ``Ŵ(t) = a ⊙ w_r(t)[modes] + b``.

        >>> import torch
        >>> t = torch.linspace(0, 1, 6, dtype=torch.float64) ** 2
        >>> X = torch.stack([t, 2 * t + 1, -t + 3])
        >>> res = cmd(X, n_modes=1, n_samples=3)
        >>> res.reconstruct().shape, bool(torch.allclose(res.reconstruct(-1), X[:, -1]))
        (torch.Size([3, 6]), True)
        """
        e = self.n_snapshots
        if t is None:
            out = torch.stack([self.reconstruct(k) for k in range(e)], dim=1)
            return out
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"t: expected an int snapshot index or None, got {type(t).__name__}")
        if not -e <= t < e:
            raise IndexError(f"t: snapshot {t} out of range for {e} snapshots")
        t = int(t) % e
        w = self.weights_from_references(self.ref_traj[:, t])
        if self.kept_index.size:
            w[torch.from_numpy(self.kept_index)] = torch.from_numpy(self.kept_values[:, t].astype(self.a.dtype))
        return w


def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _layer_quota(k: int, caps: np.ndarray) -> np.ndarray:
    """Split ``k`` samples over layers: half equally, half in proportion to size, capped by ``caps``."""
    n_l = int((caps > 0).sum())
    q = np.zeros_like(caps)
    if n_l == 0:
        return q
    q = np.minimum(caps, k // (2 * n_l) * (caps > 0))
    while q.sum() < k:
        room = caps - q
        if room.sum() == 0:
            break
        need = k - int(q.sum())
        share = room / room.sum() * need
        add = np.minimum(room, np.floor(share).astype(np.int64))
        if add.sum() == 0:  # hand out the remainder one by one, largest room first
            for i in np.argsort(-room, kind="stable")[:need]:
                if room[i] > 0:
                    add[i] += 1
        q = q + add
    return q


def _sample(src: Source, k: int, sampling: str, cand: np.ndarray, std: np.ndarray, rng) -> np.ndarray:
    if sampling == "uniform":
        pool = np.flatnonzero(cand)
        return np.sort(rng.choice(pool, size=k, replace=False))
    if sampling == "variance":
        pool = np.flatnonzero(cand)
        p = np.maximum(std[pool].astype(np.float64), np.finfo(np.float64).tiny)  # moving => positive weight
        p /= p.sum()
        return np.sort(rng.choice(pool, size=k, replace=False, p=p))
    caps = np.array([int(cand[s:e].sum()) for _, s, e in src.layers], dtype=np.int64)
    quota = _layer_quota(k, caps)
    picks = []
    for (_, s, e), q in zip(src.layers, quota):
        if q:
            pool = s + np.flatnonzero(cand[s:e])
            picks.append(rng.choice(pool, size=int(q), replace=False))
    return np.sort(np.concatenate(picks))


def _cluster(corr: np.ndarray, m: int) -> np.ndarray:
    """Complete-linkage clusters (labels 0..M'-1, largest first) of the rows of ``|corr|``.

    As in the authors' code, the distance between two weights is the Euclidean distance between their
    rows of the |correlation| matrix (weights that correlate alike with everything are close).
    """
    k = corr.shape[0]
    if m == 1 or k == 1:
        return np.zeros(k, dtype=np.int64)
    z = linkage(pdist(corr), method="complete")
    lab = fcluster(z, t=m, criterion="maxclust") - 1
    sizes = np.bincount(lab)
    first = np.array([np.flatnonzero(lab == c)[0] for c in range(len(sizes))])
    order = np.lexsort((first, -sizes))  # largest first, ties by first member
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[lab]


def cmd(trajectory, n_modes: int = 10, *, n_samples: int = 1000, sampling: str = "layer", seed: int = 0,
        layout: Layout | None = None, layers: list[tuple[str, int, int]] | None = None, bn: str = "model",
        start: int = 0, block: int = 2**16, progress: bool = False) -> CMDResult:
    """Post-hoc correlation mode decomposition of a trajectory ``[N weights, E snapshots]``.

    ``trajectory``: a :class:`~gradsketch.dynamics.Trajectory` (read in column blocks of ``block`` weights;
    never loads ``N × E``), or a tensor / ndarray ``[N, E]`` (float64 input gives float64 ``a``, ``b``).
    ``n_modes`` M (the clustering may return fewer when the sample has fewer distinct groups),
    ``n_samples`` K (capped at the number of non-constant weights; M > K raises), ``sampling``:
    ``"layer"`` (half the sample equally over layers, half by layer size), ``"uniform"`` or ``"variance"``
    (probability ∝ the weight's temporal standard deviation). ``layout`` / ``layers`` name the groups
    (default: the trajectory's layout, else one group). ``bn="model"`` treats BatchNorm running statistics
    like weights (as the paper does); ``bn="keep"`` keeps them as recorded (needs a layout with buffers).
    ``start`` drops the first snapshots. Math: ``w_i(t) ≈ a_i w_r(m_i)(t) + b_i`` (Brokman et al. 2024, Eq. 2).

    Weights whose trajectory is constant (correlation undefined) are never sampled; they get mode -1,
    ``a = 0`` and ``b`` = their value, so they are reconstructed exactly; no output is NaN.

    >>> import torch
    >>> t = torch.linspace(0, 1, 8, dtype=torch.float64)
    >>> r1, r2 = t ** 2, torch.cos(4 * t)
    >>> X = torch.stack([r1, 3 * r1 - 1, r2, -2 * r2 + 5, 0 * t + 7])
    >>> res = cmd(X, n_modes=2, n_samples=4)
    >>> res.modes.tolist(), res.a.round(6).tolist()
    ([0, 0, 1, 1, -1], [1.0, 3.0, 1.0, -2.0, 0.0])
    """
    if bn not in ("model", "keep"):
        raise ValueError(f"bn: expected 'model' or 'keep', got {bn!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling: expected one of {SAMPLINGS}, got {sampling!r}")
    m = _check_int(n_modes, "n_modes")
    k = _check_int(n_samples, "n_samples")
    block = _check_int(block, "block")
    start = _check_int(start, "start", low=0)
    if m > k:
        raise ValueError(f"n_modes: expected at most n_samples={k} modes, got {m}")
    src = Source(trajectory, layers=layers, layout=layout)
    e = src.e - start
    if e < 3:
        raise ValueError(f"trajectory: expected at least 3 snapshots (after start={start}) for correlations, "
                         f"got {e}")
    n = src.n
    kept = np.zeros(n, dtype=bool)
    if bn == "keep":
        if src.layout is None:
            raise ValueError("bn: 'keep' needs to know which weights are buffers; pass layout= or a Trajectory")
        kept = src.layout.buffer_mask()
    from tqdm.auto import tqdm

    def blocks(desc):
        it = src.blocks(block)
        if progress:
            it = tqdm(it, total=math.ceil(n / block), desc=desc)
        for s, t, x in it:
            yield s, t, x[:, start:]

    # pass 1: which weights move, and how much
    std = np.empty(n, dtype=np.float32)
    moving = np.empty(n, dtype=bool)
    for s, t, x in blocks("cmd: statistics"):
        moving[s:t] = x.max(axis=1) > x.min(axis=1)
        std[s:t] = x.std(axis=1)
    cand = moving & ~kept
    n_cand = int(cand.sum())
    if n_cand < m:
        raise ValueError(f"trajectory: only {n_cand} weights move (non-constant and not kept), fewer than "
                         f"n_modes={m}")
    k = min(k, n_cand)
    rng = np.random.default_rng(seed)
    sample = _sample(src, k, sampling, cand, std, rng)
    del std
    s_traj = src.columns(sample, block)[:, start:]
    corr = np.abs(np.corrcoef(s_traj))
    np.fill_diagonal(corr, 1.0)
    sample_modes = _cluster(corr, m)
    m = int(sample_modes.max()) + 1
    ref_pos = np.empty(m, dtype=np.int64)
    for c in range(m):
        mem = np.flatnonzero(sample_modes == c)
        ref_pos[c] = mem[np.argmax(corr[np.ix_(mem, mem)].mean(axis=0))]
    ref_index = sample[ref_pos]
    ref = s_traj[ref_pos]                        # [M, E]
    ref_mean = ref.mean(axis=1)
    ref_c = ref - ref_mean[:, None]
    ref_norm = np.linalg.norm(ref_c, axis=1)     # > 0: references move
    ref_hat = ref_c / ref_norm[:, None]

    # pass 2: assign every weight to its best-correlated reference and fit (a, b)
    out = src.out_dtype
    modes = np.empty(n, dtype=np.int32)
    a = np.empty(n, dtype=out)
    b = np.empty(n, dtype=out)
    starts = np.array([s for _, s, _ in src.layers])
    n_layers = len(src.layers)
    sse = np.zeros(n_layers)
    ss = np.zeros(n_layers)
    counts = np.zeros((n_layers, m), dtype=np.int64)
    kept_idx = np.flatnonzero(kept)
    kept_vals = []
    for s, t, x in blocks("cmd: assign and fit"):
        kb = kept[s:t]
        if kb.any():
            kept_vals.append(x[kb])
        mu = x.mean(axis=1)
        ss_rows = np.einsum("ij,ij->i", x, x)
        xc = np.subtract(x, mu[:, None], out=x)  # centred in place (blocks are fresh copies)
        xn = np.sqrt(np.einsum("ij,ij->i", xc, xc))
        proj = xc @ ref_hat.T                    # [b, M] = ‖xc‖ · corr
        with np.errstate(invalid="ignore", divide="ignore"):
            c_abs = np.abs(proj) / np.where(xn > 0, xn, 1.0)[:, None]
        mo = np.argmax(c_abs, axis=1)
        ai = proj[np.arange(len(mo)), mo] / ref_norm[mo]
        const = ~moving[s:t]
        ai[const] = 0.0
        bi = mu - ai * ref_mean[mo]
        mo = mo.astype(np.int32)
        mo[const] = CONSTANT
        if kb.any():
            mo[kb] = KEPT
            ai[kb] = 0.0
            bi[kb] = 0.0
        # residual x - a w_r - b = xc - a (w_r - mean w_r), computed explicitly (no cancellation)
        tmp = ref_c[np.maximum(mo, 0)]
        tmp *= ai[:, None]
        xc -= tmp
        del tmp
        sse_rows = np.einsum("ij,ij->i", xc, xc)
        sse_rows[kb] = 0.0
        lid = np.searchsorted(starts, np.arange(s, t), side="right") - 1
        sse += np.bincount(lid, weights=sse_rows, minlength=n_layers)
        ss += np.bincount(lid, weights=ss_rows, minlength=n_layers)
        good = mo >= 0
        np.add.at(counts, (lid[good], mo[good]), 1)
        modes[s:t], a[s:t], b[s:t] = mo, ai, bi
    modes[ref_index] = np.arange(m, dtype=np.int32)  # a reference is its own mode, exactly
    a[ref_index] = 1.0
    b[ref_index] = 0.0
    layer_error = {name: float(math.sqrt(sse[i] / ss[i])) if ss[i] > 0 else 0.0
                   for i, (name, _, _) in enumerate(src.layers)}
    rel = float(math.sqrt(sse.sum() / ss.sum())) if ss.sum() > 0 else 0.0
    kv = np.concatenate(kept_vals) if kept_vals else np.zeros((0, e))
    return CMDResult(modes=modes, a=a, b=b, ref_index=ref_index, ref_traj=ref, sample_index=sample,
                     sample_modes=sample_modes, kept_index=kept_idx, kept_values=kv, layers=list(src.layers),
                     layer_error=layer_error, layer_mode_counts=counts, rel_error=rel,
                     n_constant=int((~moving & ~kept).sum()), layout=src.layout, start=start,
                     info={"n_samples": k, "sampling": sampling, "seed": seed, "bn": bn})
