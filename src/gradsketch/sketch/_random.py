"""Deterministic randomness: every random object is drawn from a CPU generator seeded from its spec."""

from __future__ import annotations

import hashlib
import json

import torch


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed from ``seed`` and any JSON-serialisable tags (stable across runs and machines)."""
    blob = json.dumps([int(seed), *[str(t) for t in tags]], separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`derive_seed`."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *tags))
    return g
