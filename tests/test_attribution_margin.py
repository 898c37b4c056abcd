"""classification_margin on Hugging Face outputs and dict batches (issue 19), against the closed form
z_y − logsumexp_{j≠y} z_j computed from the logits."""

from __future__ import annotations

import pytest
import torch

from gradsketch.attribution import classification_margin


def expected(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = z.double()
    out = []
    for zi, yi in zip(z, y.tolist()):
        others = torch.cat([zi[:yi], zi[yi + 1:]])
        out.append(zi[yi] - torch.logsumexp(others, 0))
    return torch.stack(out)


def test_margin_on_a_hugging_face_classifier_with_dict_batches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        m_default = classification_margin()(model, batch)            # every non-label entry as kwargs
        m_named = classification_margin("input_ids", "labels")(model, batch)  # the failing call of the issue
    torch.testing.assert_close(m_default, expected(z, batch["labels"]).to(m_default), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        z1 = model(ids).logits  # input_ids positionally: attention mask defaults to all ones
    torch.testing.assert_close(m_named, expected(z1, batch["labels"]).to(m_named), rtol=1e-12, atol=1e-12)


def test_margin_on_dict_batches_and_dict_outputs_of_a_plain_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 4).double()

        def forward(self, x):
            return {"logits": self.lin(x)}

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    m = classification_margin()(net, {"x": x, "labels": y})
    torch.testing.assert_close(m, expected(net.lin(x), y), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"batch: expected the labels under 'labels'"):
        classification_margin()(net, {"x": x, "y": y})
