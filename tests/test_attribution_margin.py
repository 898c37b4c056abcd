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


def test_trak_takes_the_output_function_declared_on_the_task():
    """Task(..., margin_fn=) declares TRAK's output function (as kronfluence/trak tasks do); TRAK then scores
    exactly as with the margin_fn option, and the option overrides the Task's."""
    from gradsketch import TRAK, Task, losses
    from gradsketch.attribution import batches

    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    data = batches(X, y, batch_size=5)
    margin = classification_margin()
    declared = Task.from_classifier(model, margin_fn=margin)
    plain = Task.from_classifier(model)
    assert declared.margin_fn is margin and losses.classification_margin is classification_margin
    a = TRAK(declared).fit(data, progress=False)
    b = TRAK(plain, margin_fn=margin).fit(data, progress=False)
    torch.testing.assert_close(a.score(data, progress=False), b.score(data, progress=False), rtol=1e-12, atol=0)
    # the Task's output function is used (not the loss): the scores differ from loss-gradient TRAK
    c = TRAK(plain).fit(data, progress=False)
    assert not torch.allclose(a.score(data, progress=False), c.score(data, progress=False))

    def neg_margin(m, batch):  # the option wins over the Task's declaration
        return -margin(m, batch)

    d = TRAK(declared, margin_fn=neg_margin).fit(data, progress=False)
    e = TRAK(plain, margin_fn=neg_margin).fit(data, progress=False)
    torch.testing.assert_close(d.score(data, progress=False), e.score(data, progress=False), rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="margin_fn: expected a callable"):
        Task.from_classifier(model, margin_fn="margin")
