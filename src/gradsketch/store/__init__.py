"""gradsketch.store: sketched per-example gradients on disk (memory-mapped .npy + JSON manifest).

Resumable, checksummed, and writable by several processes at once; see ``gradient_store.py`` for the
on-disk format and its crash-safety argument. The store owns writing, locking (:class:`ChunkLock`), filling
(:func:`fill_stream`, the one fill loop; :func:`fill` per chunk) and its identity
(:meth:`GradientStore.differences`).
"""

from .fill import ChunkLock, DataChangedError, check_sequential, fill, fill_stream, write_missing
from .fingerprint import fingerprint_model
from .gradient_store import CorruptChunkError, GradientStore, StoreFileError

__all__ = ["CorruptChunkError", "GradientStore", "fill", "fill_stream", "ChunkLock", "write_missing",
           "fingerprint_model", "DataChangedError", "StoreFileError", "check_sequential"]
