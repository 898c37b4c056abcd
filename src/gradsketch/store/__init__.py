"""gradsketch.store: sketched per-example gradients on disk (memory-mapped .npy + JSON manifest).

Resumable, checksummed, and writable by several processes on disjoint row ranges; see
``gradient_store.py`` for the on-disk format and its crash-safety argument.
"""

from .fill import fill
from .fingerprint import fingerprint_model
from .gradient_store import CorruptChunkError, GradientStore

__all__ = ["CorruptChunkError", "GradientStore", "fill", "fingerprint_model"]
