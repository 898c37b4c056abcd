"""``FactoredSketch``: a whole-model sketch with Kronecker blocks for weight matrices (LoGra).

The class is a sketch like the others (a :class:`gradsketch.linalg.LinearOperator` of shape ``(d, n)``,
rebuilt from its spec by :func:`gradsketch.sketch_from_spec`); which parameters get which block is decided
from a model by ``task.factored_sketch(d, ...)`` (``gradsketch.gradients.factored``), and the hook engine that
applies the Kronecker blocks without forming weight gradients lives there too.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from .base import BlockSketchOperator

#: the leftover (non-Kronecker) block is applied as an explicit sparse matrix when it has at most this many
#: entries n_rest·d and at most this fraction of them non-zero (see FactoredSketch.rest_scatter)
REST_MATRIX_MAX = 2**26
REST_MATRIX_DENSITY = 1 / 64


class _Identity:
    """The identity on a [rows, cols] block (an embedded small layer of a :class:`FactoredSketch`)."""

    kind = "identity"

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = int(rows), int(cols)
        self.n = self.d = self.rows * self.cols

    def __call__(self, x: Tensor, nan_policy: str | None = None) -> Tensor:
        return x.clone()

    def T(self, y: Tensor, nan_policy: str | None = None) -> Tensor:
        return y.clone()

    def to(self, device: torch.device | str) -> _Identity:
        return self

    def factor_matrices(self, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        return [torch.eye(self.rows, dtype=dtype), torch.eye(self.cols, dtype=dtype)]


class FactoredSketch(BlockSketchOperator):
    """Whole-model sketch R^N -> R^d: Σ_p Φ_p(g_p) over the task's parameters p (independent blocks).

    Supported weights get a Kronecker ``qk`` sketch F_r ⊗ F_c of their [rows, cols] view (first dimension ×
    the rest); the others share one BlockSketch of ``kind`` (the "rest"). Build with
    :meth:`gradsketch.Task.factored_sketch`. ``S(xs)``: list of [..., n_p] -> [..., d]; ``S.T(y)``: [..., d] ->
    list of [..., n_p]; ``S.spec`` rebuilds it with :meth:`from_spec`.

    Each large weight's block sizes come from :func:`block_plan`: an exact factorisation d = d_r·d_c, or a
    small side kept whole (a 10-class head keeps its 10 output gradients exact) with the block embedded in a
    seeded slice of R^d, whichever has the smaller inner-product variance (the spec records the choice, so
    a spec always rebuilds the same map).

    Spec version 2 (what ``task.factored_sketch`` builds) adds two things that keep small tensors out of the rest:

    * **Biases folded into their weight's block.** A Linear/Conv2d bias is the gradient of an extra input
      column of ones, so [G | g_b] ([rows, cols + 1]; for transformers' Conv1D, whose rows are the inputs,
      [G; g_bᵀ], [rows + 1, cols]) gets one Kronecker sketch: the factored path just adds F_c's last column
      to F_c a_t, at no extra cost (the usual LoGra treatment of biases).
    * **Small layers embedded.** A weight (with its bias) too small for d = d_r·d_c (rows·cols < d, or no
      factorisation of d fits) but with rows·cols ≤ d is written as it is (block kind ``"identity"``: an
      exact isometry, no projection, no FLOPs) into the slice [offset, offset + rows·cols) of the output,
      offset drawn from the seed. Summed with the other, independent and zero-mean, random blocks this is
      still a sketch of the whole gradient with E‖Φg‖² = ‖g‖² and unbiased inner products. (A block spec
      of kind ``"qk"`` with an offset, a full rotation, is also accepted.)

    Version-1 specs (no ``"version"`` key) rebuild the earlier map exactly: no folding, no embedding.
    """

    def __init__(self, names: list[str], sizes: list[int], d: int, blocks: dict[str, Any],
                 shapes2d: dict[str, tuple[int, int]], rest: Any, spec: dict[str, Any]) -> None:
        self.names, self.sizes, self.d = list(names), [int(s) for s in sizes], int(d)
        self.n = int(sum(self.sizes))
        self.blocks = blocks                   # weight name -> qk Sketch (Kronecker)
        self.shapes2d = shapes2d               # weight name -> (rows, cols) of the weight itself
        #: weight name -> (bias name, "cols" | "rows"): the bias is the block's extra last column / row
        self.bias_of: dict[str, tuple[str, str]] = {
            w: (b[0], b[1]) for w, b in spec.get("bias_of", {}).items()}
        #: weight name -> first output coordinate of an embedded (d_p < d) block
        self.offsets: dict[str, int] = {w: int(o) for w, o in spec.get("offsets", {}).items()}
        folded = {b for b, _ in self.bias_of.values()}
        self.rest = rest                       # BlockSketch over rest_names, or None
        self.rest_names = [n for n in self.names if n not in blocks and n not in folded]
        self.spec = spec
        self._factors: dict[tuple[str, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}
        self._rest_cols: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor] | None] = {}
        first = next(iter(blocks.values()), None) if blocks else None
        dev = getattr(first, "device", None) or (rest.device if rest is not None else "cpu")
        self._init_operator(self.n, self.d, dev)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> FactoredSketch:
        from .block import BlockSketch
        from .kinds import sketch

        blocks = {n: (_Identity(*s["in_factors"]) if s["kind"] == "identity" else sketch(**s))
                  for n, s in spec["blocks"].items()}
        bias_of = spec.get("bias_of", {})
        shapes2d = {}
        for n, s in spec["blocks"].items():
            rows, cols = s["in_factors"]
            side = bias_of.get(n, [None, None])[1]
            shapes2d[n] = (rows - 1, cols) if side == "rows" else (rows, cols - 1) if side == "cols" else (rows, cols)
        rest = None if spec["rest"] is None else BlockSketch(**spec["rest"])
        return cls(spec["names"], spec["sizes"], spec["d"], blocks, shapes2d, rest, spec)

    def to(self, device: torch.device | str) -> FactoredSketch:
        for s in self.blocks.values():
            s.to(device)
        if self.rest is not None:
            self.rest.to(device)
        self._factors.clear()
        self._rest_cols.clear()
        self.device = torch.device(device)
        return self

    def factors(self, name: str, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """(F_r [d_r, rows'], F_c [d_c, cols']) of a Kronecker block, scale folded in (cached); rows'/cols'
        include the folded bias's extra row/column (the last one)."""
        key = (name, dtype, device)
        if key not in self._factors:
            fr, fc = self.blocks[name].factor_matrices(torch.float64)
            self._factors[key] = (fr.to(device, dtype), fc.to(device, dtype))
        return self._factors[key]

    def block_slice(self, name: str) -> slice:
        """Output coordinates of a Kronecker block: all of them, or an embedded block's slice."""
        off = self.offsets.get(name)
        return slice(0, self.d) if off is None else slice(off, off + self.blocks[name].d)

    def block_input(self, name: str, g: Tensor, gb: Tensor | None) -> Tensor:
        """``[..., n_w]`` weight gradient (and ``[..., n_b]`` folded bias gradient) -> the block's
        ``[..., rows'·cols']`` input."""
        if name not in self.bias_of:
            return g
        rows, cols = self.shapes2d[name]
        lead = g.shape[:-1]
        g2 = g.reshape(*lead, rows, cols)
        assert gb is not None
        if self.bias_of[name][1] == "cols":
            g2 = torch.cat([g2, gb.reshape(*lead, rows, 1).to(g2.dtype)], dim=-1)
        else:
            g2 = torch.cat([g2, gb.reshape(*lead, 1, cols).to(g2.dtype)], dim=-2)
        return g2.reshape(*lead, -1)

    def rest_scatter(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The leftover BlockSketch as explicit sparse columns (cached): ``(rows [q, n_rest], vals [q, n_rest])``
        with column j of its ``[d, n_rest]`` matrix equal to Σ_k vals[k, j]·e_{rows[k, j]} (q = the most
        non-zeros in a column; shorter columns padded with value 0), or None.

        Built only when the block is small and sparse: ``n_rest·d ≤ REST_MATRIX_MAX`` and at most
        max(8, ``REST_MATRIX_DENSITY·d``) non-zeros per column (an SJLT rest block, as the digits MLP's biases and
        unfactorable last layer get: d > n_rest). Then q ``scatter_add_`` calls along the rows of the
        ``[m, d]`` result replace the sketch call of every batch (the same linear map; entries come from
        applying the sketch to unit vectors in float64, so results agree up to rounding). Dense kinds give up
        after one chunk of columns."""
        key = (dtype, device)
        if key in self._rest_cols:
            return self._rest_cols[key]
        found: tuple[Tensor, Tensor] | None = None
        rest, names = self.rest, set(self.rest_names)
        sizes = [s for n, s in zip(self.names, self.sizes) if n in names]
        n_rest = sum(sizes)
        if rest is not None and n_rest * self.d <= REST_MATRIX_MAX:
            qmax = max(8, int(REST_MATRIX_DENSITY * self.d))
            rows: list[Tensor] = []
            vals: list[Tensor] = []
            with torch.no_grad():
                for lo in range(0, n_rest, 512):
                    hi = min(n_rest, lo + 512)
                    eye = torch.zeros(hi - lo, n_rest, dtype=torch.float64, device=rest.device)
                    eye[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
                    cols = rest(list(torch.split(eye, sizes, dim=1)), nan_policy="propagate")  # [k, d]: Mᵀ rows
                    q = int((cols != 0).sum(1).max())
                    if q > qmax:
                        break
                    # the q largest-magnitude entries of each column hold all of its non-zeros
                    v, r = cols.abs().topk(max(q, 1), dim=1)
                    rows.append(r)
                    vals.append(torch.gather(cols, 1, r) * (v != 0))
                else:
                    q = max(t.shape[1] for t in rows)
                    r_all = torch.cat([torch.nn.functional.pad(t, (0, q - t.shape[1])) for t in rows])
                    v_all = torch.cat([torch.nn.functional.pad(t, (0, q - t.shape[1])) for t in vals])
                    found = (r_all.T.contiguous().to(device), v_all.T.contiguous().to(device, dtype))
        self._rest_cols[key] = found
        return found

    def _split(self, xs: Any) -> list[Tensor]:
        xs = list(xs.values()) if isinstance(xs, dict) else list(xs)
        if len(xs) != len(self.names):
            raise ValueError(f"xs: expected {len(self.names)} tensors (one per parameter), got {len(xs)}")
        return xs

    def __call__(self, xs: Any, out_dtype: torch.dtype | None = None, nan_policy: str | None = None) -> Tensor:
        """Σ_p Φ_p x_p: a list (or dict) of ``[..., n_p]`` tensors, one per parameter, -> ``[..., d]``."""
        if isinstance(xs, Tensor):  # the concatenated [..., n] vector
            if xs.shape[-1] != self.n:
                raise ValueError(f"xs: expected a list of per-parameter tensors or a tensor [..., {self.n}], got "
                                 f"shape {tuple(xs.shape)}")
            xs = list(torch.split(xs, self.sizes, dim=-1))
        xs = self._split(xs)
        out = None
        byname = dict(zip(self.names, xs))
        lead = xs[0].shape[:-1]
        for n, s in self.blocks.items():
            bias = self.bias_of.get(n)
            y = s(self.block_input(n, byname[n], None if bias is None else byname[bias[0]]), nan_policy=nan_policy)
            if n in self.offsets:
                full = torch.zeros(*lead, self.d, dtype=y.dtype, device=y.device)
                full[..., self.block_slice(n)] = y
                y = full
            out = y if out is None else out + y
        if self.rest is not None:
            y = self.rest([byname[n] for n in self.rest_names], nan_policy=nan_policy)
            out = y if out is None else out + y
        out = cast(Tensor, out)  # at least one block (a sketch covers n >= 1 parameters)
        return out if out_dtype is None else out.to(out_dtype)

    def _adjoint_rows(self, y: Tensor, out_dtype: torch.dtype | None = None, nan_policy: str | None = None
                      ) -> list[Tensor]:
        """Φᵀy split into the parameters' blocks: ``[..., d]`` -> list of ``[..., n_p]`` (``S.T(y)``)."""
        res: dict[str, Tensor] = {}
        lead = y.shape[:-1]
        for n, s in self.blocks.items():
            z = s.T(y[..., self.block_slice(n)], nan_policy=nan_policy)
            bias = self.bias_of.get(n)
            if bias is None:
                res[n] = z
                continue
            rows, cols = self.shapes2d[n]
            if bias[1] == "cols":
                z2 = z.reshape(*lead, rows, cols + 1)
                res[n], res[bias[0]] = z2[..., :cols].reshape(*lead, -1), z2[..., cols]
            else:
                z2 = z.reshape(*lead, rows + 1, cols)
                res[n], res[bias[0]] = z2[..., :rows, :].reshape(*lead, -1), z2[..., rows, :]
        if self.rest is not None:
            r = self.rest.T(y, nan_policy=nan_policy)
            r = list(r.values()) if isinstance(r, dict) else list(r)
            res.update(zip(self.rest_names, r))
        return [res[n] for n in self.names]

    def __repr__(self) -> str:
        return (f"FactoredSketch(n={self.n}, d={self.d}, kronecker_blocks={len(self.blocks)}, "
                f"folded_biases={len(self.bias_of)}, embedded={len(self.offsets)}, "
                f"other_blocks={len(self.rest_names)})")


