"""``sketch_from_spec``: rebuild any sketch from its ``.spec``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Sketch
from .block import MIN_GROUP, BlockSketch
from .factored import FactoredSketch
from .kinds import sketch


def sketch_from_spec(spec: Mapping[str, Any]) -> Sketch | BlockSketch | Any:
    """Rebuild a ``Sketch``, ``BlockSketch`` or ``FactoredSketch`` from its ``.spec``.

    >>> import torch
    >>> S = BlockSketch([10, 20], d=8, kind="sjlt", seed=3)
    >>> bool(torch.equal(sketch_from_spec(S.spec).matrix(), S.matrix()))
    True
    """
    if isinstance(spec, Mapping) and spec.get("type") == "FactoredSketch":
        return FactoredSketch.from_spec(dict(spec))
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"spec: expected a dict with a 'kind' key, got {spec!r}")
    spec = dict(spec)
    if spec["kind"] == "block":
        sizes = spec["sizes"]
        names = spec.get("names")
        sz: Any = dict(zip(names, sizes)) if names else sizes
        return BlockSketch(sz, spec["d"], kind=spec["inner_kind"], seed=spec["seed"],
                           min_group=spec.get("min_group", MIN_GROUP), **spec.get("options", {}))
    return sketch(**spec)
