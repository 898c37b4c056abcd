"""Common mistakes get a message that names the fix (issue 19): one batch (X, Y) passed where an iterable of
batches is expected, a top-k larger than the training set, dict batches read as tuples, --d above N."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradsketch


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    task = gradsketch.Task.from_classifier(model)
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    return task, X, y


def test_one_batch_instead_of_a_list_of_batches_names_the_fix():
    task, X, y = setup()
    msg = r"train_data: expected an iterable of batches such as \[\(X, Y\)\] .* wrap it in a list: \[\(X, Y\)\]"
    with pytest.raises(TypeError, match=msg):
        gradsketch.Attributor(task, "grad-dot").fit((X, y), progress=False)
    att = gradsketch.Attributor(task, "grad-dot").fit([(X, y)], progress=False)  # the fix works
    with pytest.raises(TypeError, match=r"test_data: expected an iterable of batches"):
        att.topk((X[:3], y[:3]), k=2, progress=False)
    with pytest.raises(TypeError, match=r"data: expected an iterable of batches"):
        task.hessian((X, y))
    # a list of batches, or a tuple of batches, is accepted
    gradsketch.Attributor(task, "grad-dot").fit(((X[:6], y[:6]), (X[6:], y[6:])), progress=False)


def test_topk_larger_than_the_training_set_says_so():
    task, X, y = setup()
    att = gradsketch.Attributor(task, "grad-dot").fit([(X, y)], progress=False)
    with pytest.warns(UserWarning, match=r"k: 50 is larger than the 12 training examples; returning all 12"):
        top = att.topk([(X[:2], y[:2])], k=50, progress=False)
    assert top.indices.shape == (2, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att.topk([(X[:2], y[:2])], k=12, progress=False)  # k = n_train: no warning


def test_float64_model_with_float32_data_names_both_dtypes_and_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64))
    task = gradsketch.Task.from_classifier(model)
    X, y = torch.randn(6, 4), torch.randint(0, 3, (6,))  # float32 inputs
    msg = (r"batch: the model's parameters are float64 but the batch holds float32 tensors .*convert the data "
           r"\(e\.g\. x\.to\(torch\.float64\)\) or the model \(model\.to\(torch\.float32\)\)")
    with pytest.raises(TypeError, match=msg):
        gradsketch.Attributor(task, "grad-dot").fit([(X, y)], progress=False)
    gradsketch.Attributor(task, "grad-dot").fit([(X.double(), y)], progress=False)  # the fix works


@pytest.mark.parametrize("loss", ["index", "unpack"])
def test_dict_batches_with_a_loss_that_reads_tuples_name_the_fix(loss):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])

    def by_index(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")

    def by_unpack(m, b):
        x, t = b
        return nn.functional.cross_entropy(m(x), t, reduction="none")

    task = gradsketch.Task(model, by_index if loss == "index" else by_unpack)
    with pytest.raises(TypeError, match=r"loss_fn: the batches are dicts \(keys \['x', 'y'\]\) but the loss reads "
                                        r"them as tuples .*expected a loss that indexes the batch by key \(e.g. "
                                        r"batch\['x'\]"):
        gradsketch.Attributor(task, "grad-dot").fit([{"x": X, "y": y}], progress=False)
    # the same loss on tuple batches works
    gradsketch.Attributor(task, "grad-dot").fit([(X, y)], progress=False)


def test_cli_says_when_d_is_larger_than_the_parameter_count():
    from gradsketch.attribution.pipeline import AttributeConfig, run_attribute
    from gradsketch.entry import Entry

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    ent = Entry(model, "cross_entropy", [(X, y)], [(X[:2], y[:2])])
    summary = run_attribute(ent, AttributeConfig(method="grad-dot", d=64), out=_tmp(), progress=False)
    assert "d = 64 is larger than the 8 parameters: used d = 8" in summary["notes"]


def _tmp():
    import tempfile

    return tempfile.mkdtemp()


def test_per_example_loss_where_train_wants_a_scalar_names_the_fix():
    from gradsketch.intrinsic import train

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    per_example = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    with pytest.raises(ValueError, match=r"loss_fn: expected the batch's mean loss \(a scalar tensor\), got shape "
                                         r"\[8\]; a per-example loss \[B\] .* return loss.mean\(\)"):
        train(model, (X, y), loss_fn=per_example, steps=2, progress=False)
    # and the reverse (a scalar where Task wants [B]) names reduction='none'
    task = gradsketch.Task(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match=r"got a scalar; return unreduced losses \(e.g. F.cross_entropy\(\.\.\., "
                                         r"reduction='none'\)\)"):
        task.grads((X, y))


def test_cli_kernel_option_reaches_trak_and_is_refused_elsewhere():
    from gradsketch.attribution.pipeline import AttributeConfig, run_attribute
    from gradsketch.entry import Entry

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ent = Entry(model, "cross_entropy", [(X, y)], [(X[:2], y[:2])])
    out = _tmp()
    run_attribute(ent, AttributeConfig(method="trak", d=0, kernel="ggn"), out=out, progress=False)
    assert list((Path(out) / "store").glob("ggn_kernel_*.pt")), "the GGN kernel was not built"
    # every TRAK kernel is accepted and changes the scores
    scores, summaries = {}, {}
    for kernel in ("features", "ggn_trace", None):   # None: the default, "auto"
        o = _tmp()
        run_attribute(ent, AttributeConfig(method="trak", d=0, kernel=kernel, self_influence=True), out=o,
                      progress=False)
        scores[kernel] = np.load(Path(o) / "attribution.npz")["self_influence"]
        summaries[kernel] = json.loads((Path(o) / "summary.json").read_text())
    assert np.abs(scores["features"] / np.abs(scores["features"]).max()
                  - scores["ggn_trace"] / np.abs(scores["ggn_trace"]).max()).max() > 1e-3
    # the entry's classifier declares its outputs: "auto" ran ggn_trace, and the summary says so
    assert summaries[None]["kernel"] == "ggn_trace" and summaries["features"]["kernel"] == "features"
    np.testing.assert_array_equal(scores[None], scores["ggn_trace"])
    with pytest.raises(ValueError, match="kernel: only TRAK has a kernel option"):
        AttributeConfig(method="arnoldi", kernel="ggn")
    with pytest.raises(ValueError, match="kernel: expected one of"):
        AttributeConfig(method="trak", kernel="hessian")
