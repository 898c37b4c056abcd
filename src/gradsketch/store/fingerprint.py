"""fingerprint_model: a sha256 over a model's parameter names, shapes, dtypes and values."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

DEFAULT_FULL_NUMEL = 2**22
SAMPLES_PER_TENSOR = 2**20


def _named_tensors(model_or_named_params):
    if hasattr(model_or_named_params, "named_parameters"):
        items = list(model_or_named_params.named_parameters())
    elif isinstance(model_or_named_params, Mapping):
        items = list(model_or_named_params.items())
    else:
        try:
            items = [(str(n), t) for n, t in model_or_named_params]
        except (TypeError, ValueError):
            raise TypeError("model_or_named_params: expected an nn.Module, a dict name -> tensor or an "
                            f"iterable of (name, tensor), got {type(model_or_named_params).__name__}"
                            ) from None
    return items


def fingerprint_model(model_or_named_params, *, full_numel: int = DEFAULT_FULL_NUMEL) -> str:
    """``"sha256:<hex>"`` identifying a model's parameters (names, order, shapes, dtypes and values).

    Tensors with at most ``full_numel`` elements are hashed in full; larger ones contribute their first
    and last 4096 elements plus an evenly strided subsample of ~2**20 elements (cheap for billion-
    parameter models, and any real change of weights such as a training step changes it). The hash
    is computed on CPU bytes, so it does not depend on the device the model is on.
    """
    import torch

    h = hashlib.sha256(b"gradsketch.fingerprint.v1\0")
    items = _named_tensors(model_or_named_params)
    h.update(f"{len(items)}\0".encode())
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_or_named_params: expected tensors, got {type(t).__name__} "
                            f"for {name!r}")
        t = t.detach()
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP2 shard): the global tensor (one all-gather per tensor,
            t = t.full_tensor()       # every rank fingerprints at the same points), so shards hash as the whole
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        flat = t.reshape(-1)
        n = flat.numel()
        if n > full_numel:
            stride = max(1, n // SAMPLES_PER_TENSOR)
            flat = torch.cat([flat[:4096], flat[::stride], flat[-4096:]])
        data = flat.contiguous().cpu()
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
