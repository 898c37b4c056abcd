"""The attribution report: each test example next to its proponents and opponents, shown as what they are.

Examples are shown as images (``[H, W]``, ``[C, H, W]`` inputs, or flat inputs of a square size such as the
64 pixels of an 8×8 digit) or as text (strings given in ``Entry.examples``), each with its index, label and
score; training examples known to be mislabelled (``Entry.flagged``, e.g. planted label flips) are marked.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import escape, image_to_img, table, write_page

__all__ = ["example_cards", "collect_examples", "attribution_cards", "predicted_classes",
           "write_attribution_report"]


def _as_display(x: Any) -> Any:
    """An image array, a string, or None (nothing sensible to show) for one example's input."""
    if isinstance(x, str):
        return x
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.number):
        return None
    if x.ndim == 2 and min(x.shape) >= 4:
        return x
    if x.ndim == 3 and (x.shape[0] in (1, 3) or x.shape[-1] in (1, 3)):
        return x
    if x.ndim == 1 and x.size >= 16 and np.issubdtype(x.dtype, np.floating):
        side = int(round(math.sqrt(x.size)))
        if side * side == x.size:
            return x.reshape(side, side)
    return None


def collect_examples(data: Any, wanted: Sequence[int]) -> dict[int, tuple[Any, Any]]:
    """``{index: (display, label)}`` for the ``wanted`` example indices of ``data`` (an iterable of ``(x, y)``
    / ``(x, y, ...)`` tuples or dicts with ``labels``), in one pass that keeps only those examples.

    >>> import torch
    >>> out = collect_examples([(torch.zeros(2, 64), torch.tensor([3, 4]))], [1])
    >>> out[1][0].shape, out[1][1]
    ((8, 8), 4)
    """
    want = set(int(i) for i in wanted)
    out: dict[int, tuple[Any, Any]] = {}
    if not want or data is None:
        return out
    start = 0
    for batch in data:
        if isinstance(batch, Mapping):
            x = next((batch[k] for k in ("pixel_values", "image", "x", "input") if k in batch), None)
            y = batch.get("labels", batch.get("label"))
        elif isinstance(batch, (tuple, list)) and batch:
            x = batch[0]
            y = batch[1] if len(batch) > 1 else None
        else:
            x, y = batch, None
        n = int(len(x)) if x is not None and hasattr(x, "__len__") else (int(len(y)) if y is not None else 0)
        for i in range(start, start + n):
            if i in want:
                xi = None if x is None else _as_display(x[i - start])
                yi = None
                if y is not None and hasattr(y, "__getitem__"):
                    v = y[i - start]
                    v = v.item() if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1 else v
                    yi = v if isinstance(v, (int, float, str)) else None
                out[i] = (xi, yi)
        start += n
        if start > max(want):
            break
    return out


def example_cards(items: Sequence[dict[str, Any]]) -> str:
    """HTML cards, one per dict ``{display, title, lines, role ('test'|'pro'|'opp'), flagged}``."""
    parts = []
    for it in items:
        disp = it.get("display")
        cls = ["card", it.get("role", "")]
        if isinstance(disp, str):
            cls.append("text")
            body = f"<div class='txt'>{escape(disp)}</div>"
        elif disp is not None:
            body = image_to_img(disp, alt=it.get("title", "example"))
        else:
            body = ""
        if it.get("flagged"):
            cls.append("flag")
        lines = [f"<b>{escape(it.get('title', ''))}</b>"] + [
            f"<span class='score'>{escape(s)}</span>" if s.startswith(("score", "self-influence")) else escape(s)
            for s in it.get("lines", [])]
        if it.get("flagged"):
            lines.append(f"<span class='flagtxt'>{escape(it.get('flag_text', 'mislabelled'))}</span>")
        parts.append(f"<div class='{' '.join(c for c in cls if c)}'>{body}<div>{'<br>'.join(lines)}</div></div>")
    return "<div class='cards'>" + "".join(parts) + "</div>"


def _label_str(label: Any, names: Sequence[str] | None) -> str:
    if label is None:
        return ""
    if names is not None and isinstance(label, int) and 0 <= label < len(names):
        return f"label {names[label]}"
    return f"label {label}"


def attribution_cards(test_idx: Sequence[int], topk: Any, test_ex: Mapping[int, tuple[Any, Any]],
                      train_ex: Mapping[int, tuple[Any, Any]], n_each: int, flagged: Any = None,
                      flag_text: str = "mislabelled", test_caption: Mapping[int, str] | None = None,
                      label_names: Sequence[str] | None = None) -> str:
    """For each test example: a row with the test example, its ``n_each`` proponents (largest scores) and
    ``n_each`` opponents (most negative scores), each card with index, label, score and the flag mark."""
    flags = None if flagged is None else np.asarray(flagged, dtype=bool)
    rows = []
    for t in test_idx:
        disp, lab = test_ex.get(int(t), (None, None))
        extra = [] if test_caption is None or int(t) not in test_caption else [test_caption[int(t)]]
        test_card = example_cards([{"display": disp, "title": f"test #{t}", "role": "test",
                                    "lines": [s for s in [_label_str(lab, label_names)] if s] + extra}])
        groups = [f"<div class='group'><div class='gtitle'>test example</div>{test_card}</div>"]
        for name, vals, idx, role in (("proponents (largest scores)", topk.values, topk.indices, "pro"),
                                      ("opponents (most negative scores)", topk.opponent_values,
                                       topk.opponent_indices, "opp")):
            items = []
            for j in range(min(n_each, idx.shape[1])):
                i = int(idx[t, j])
                d_i, l_i = train_ex.get(i, (None, None))
                fl = bool(flags[i]) if flags is not None and i < flags.size else False
                items.append({"display": d_i, "title": f"train #{i}", "role": role, "flagged": fl,
                              "flag_text": flag_text,
                              "lines": [s for s in [_label_str(l_i, label_names)] if s]
                              + [f"score {float(vals[t, j]):+.3g}"]})
            groups.append(f"<div class='group'><div class='gtitle'>{name}</div>{example_cards(items)}</div>")
        rows.append("<div class='row'>" + "".join(groups) + "</div>")
    legend = ("<p class='legend note'><span><i class='sw' style='border-color:#1f4e9c'></i>test example</span>"
              "<span><i class='sw' style='border-color:#2e7d32'></i>proponent: training on it lowers the test "
              "loss</span><span><i class='sw' style='border-color:#c62828'></i>opponent: training on it raises "
              "the test loss</span>"
              + ("" if flags is None else "<span><i class='sw' style='border-color:#e65100;background:#fff3e0'></i>"
                 f"training example marked '{escape(flag_text)}'</span>") + "</p>")
    return legend + "".join(rows)


def write_attribution_report(path: str | os.PathLike, entry: Any, topk: Any, summary: Mapping[str, Any],
                             self_influence: Any = None, n_show: int = 8, n_each: int = 5) -> str:
    """The report of ``gradsketch attribute``: setup, proponents/opponents of the first ``n_show`` test
    examples as cards (see :func:`attribution_cards`), the highest self-influence training examples, notes
    and timings. ``entry`` is the :class:`gradsketch.entry.Entry` (data, optional ``examples``, ``labels``,
    ``flagged``); ``topk`` a :class:`gradsketch.attribution.TopK`. Returns the path written."""
    n_test = int(topk.indices.shape[0])
    show = list(range(min(n_show, n_test)))
    k = int(topk.indices.shape[1])
    n_each = min(n_each, k)
    train_ids = sorted({int(topk.indices[t, j]) for t in show for j in range(n_each)}
                       | {int(topk.opponent_indices[t, j]) for t in show for j in range(n_each)})
    si_top: list[int] = []
    if self_influence is not None:
        si = np.asarray(self_influence, dtype=float)
        si_top = [int(i) for i in np.argsort(-si)[:min(12, si.size)]]
    test_ex = _views(entry, "test", show)
    train_ex = _views(entry, "train", sorted(set(train_ids) | set(si_top)))
    flagged = getattr(entry, "flagged", None)
    preds = predicted_classes(getattr(entry, "model", None), getattr(entry, "test", None), show)
    caption = {t: f"predicted {p}" for t, p in preds.items()}
    setup = [[key, str(summary.get(key))] for key in ("entry", "command", "method", "sketch", "mode", "kernel", "store",
                                                      "n_train", "n_test", "k") if key in summary]
    sections = [("Setup", table(setup, ["", ""]))]
    sections.append((f"Proponents and opponents of the first {len(show)} test examples",
                     attribution_cards(show, topk, test_ex, train_ex, n_each, flagged=flagged,
                                       test_caption=caption)
                     + "<p class='note'>The full top-k of every test example is in attribution.npz "
                       "(indices, values, opponent_indices, opponent_values).</p>"))
    if si_top:
        si = np.asarray(self_influence, dtype=float)
        items = []
        flags = None if flagged is None else np.asarray(flagged, dtype=bool)
        for rank, i in enumerate(si_top, 1):
            d_i, l_i = train_ex.get(i, (None, None))
            items.append({"display": d_i, "title": f"train #{i}", "role": "", "flagged": bool(flags[i]) if
                          flags is not None else False,
                          "lines": [s for s in [_label_str(l_i, None)] if s] + [f"rank {rank}",
                                                                               f"self-influence {si[i]:.3g}"]})
        sections.append(("Highest self-influence (candidates for mislabelled examples)", example_cards(items)))
    notes = list(summary.get("notes") or [])
    if notes:
        sections.append(("Notes", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"))
    timings = summary.get("timings_s") or {}
    if timings:
        sections.append(("Timing", table([[k_, f"{v:.2f} s"] for k_, v in timings.items()], ["step", "wall time"])))
    write_page(path, f"gradsketch attribute: {summary.get('entry', '')}", sections)
    return os.fspath(path)


def predicted_classes(model: Any, data: Any, ids: Sequence[int]) -> dict[int, int]:
    """``{index: argmax class}`` for the ``ids`` of ``data`` (batches ``(x, ...)``), from a model whose output
    is logits ``[B, C]`` (or carries ``.logits``); empty when a layer in train mode would make the forward pass
    change the model or its output (BatchNorm statistics, dropout) or when the output is not a classifier's.

    >>> import torch
    >>> m = torch.nn.Linear(2, 3)
    >>> sorted(predicted_classes(m, [(torch.zeros(4, 2), None)], [1, 3]))
    [1, 3]
    """
    import torch

    want = {int(i) for i in ids}
    if not want or data is None or not isinstance(model, torch.nn.Module):
        return {}
    for mod in model.modules():
        if mod.training and (getattr(mod, "running_mean", None) is not None
                             or (isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0)):
            return {}
    out: dict[int, int] = {}
    start = 0
    with torch.no_grad():
        for batch in data:
            if not isinstance(batch, (tuple, list)) or not batch or not isinstance(batch[0], torch.Tensor):
                return {}
            n = int(batch[0].shape[0])
            if want & set(range(start, start + n)):
                try:
                    z = model(batch[0])
                except (RuntimeError, TypeError, ValueError):
                    return {}
                z = getattr(z, "logits", z)
                if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != n:
                    return {}
                pred = z.argmax(1).tolist()
                out.update({i: int(pred[i - start]) for i in range(start, start + n) if i in want})
            start += n
            if start > max(want):
                break
    return out


def _views(entry: Any, split: str, ids: Sequence[int]) -> dict[int, tuple[Any, Any]]:
    """Display forms from ``entry.examples[split]`` / ``entry.labels[split]`` when given, else from the data."""
    given = (getattr(entry, "examples", None) or {}).get(split)
    labels = (getattr(entry, "labels", None) or {}).get(split)
    found = collect_examples(getattr(entry, split, None), ids) if given is None or labels is None else {}
    out = {}
    for i in ids:
        disp, lab = found.get(i, (None, None))
        if given is not None and i < len(given):
            disp = given[i] if isinstance(given[i], str) else _as_display(np.asarray(given[i]))
            if disp is None and not isinstance(given[i], str):
                disp = np.asarray(given[i])
        if labels is not None and i < len(labels):
            v = labels[i]
            lab = v.item() if hasattr(v, "item") else v
        out[i] = (disp, lab)
    return out
