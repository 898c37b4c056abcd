"""score/topk on test data that does not match the task: one clear error at the first test batch that names
test_data, says what is expected and chains the original exception; empty test data."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from gradsketch.attribution import Attributor

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


@pytest.fixture(scope="module")
def fitted():
    task, data = child.setup()
    data = data[:4]
    one = Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=16, seed=0)).fit(data, progress=False)
    sd = {k: v.clone() for k, v in task.model.state_dict().items()}
    # several model states take the other scoring path (features per state, then regrouped)
    ens = Attributor(task, "trak", sketch=dict(kind="sjlt", d=16, seed=0), checkpoints=[sd, sd])\
        .fit(data, progress=False)
    return data, {"single": one, "ensemble": ens}


X, Y = torch.randn(4, 6), torch.tensor([0, 1, 2, 1])
BAD = {
    "feature width": ([(torch.randn(4, 7), Y)], RuntimeError),
    # KeyError 0 from the loss; a Task that checks this batch first (the ensemble's model copies) names the
    # tuple-reading loss: a TypeError chained from the KeyError
    "dict batch": ([{"x": X, "y": Y}], (KeyError, TypeError)),
    "float64 inputs": ([(X.double(), Y)], RuntimeError),
    "label out of range": ([(X, torch.tensor([0, 7, 1, 2]))], IndexError),
}


@pytest.mark.parametrize("which", ["single", "ensemble"])
@pytest.mark.parametrize("call", ["score", "topk"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_mismatched_test_batches_give_one_clear_error(fitted, which, call, case):
    _, atts = fitted
    bad, cause = BAD[case]
    a = atts[which]
    fn = a.score if call == "score" else (lambda d, progress: a.topk(d, 2, progress=progress))
    with pytest.raises(ValueError) as e:
        fn(bad + bad, progress=False)
    msg = str(e.value)
    assert msg.startswith("test_data: the first test batch failed in the model's forward/loss"), msg
    assert "test batches must have the same structure as the training batches" in msg
    assert isinstance(e.value.__cause__, cause), repr(e.value.__cause__)
    assert type(e.value.__cause__).__name__ in msg  # the original error is named in the message too


def test_checked_once_at_the_first_batch_only(fitted, monkeypatch):
    """The check wraps the first batch; later batches run as they did (no per-batch try/except): a bad later
    batch raises the model's own error, and a first batch with NaN keeps the NaN error."""
    data, atts = fitted
    a = atts["single"]
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        a.score(data[:2] + BAD["feature width"][0], progress=False)
    nan = [(torch.full((2, 6), float("nan")), torch.tensor([0, 1]))]
    with pytest.raises(FloatingPointError, match="test_data: non-finite loss"):
        a.score(nan, progress=False)
    torch.testing.assert_close(a.score(data[:2], progress=False), a.score(data, progress=False)[:20])


@pytest.mark.parametrize("which", ["single", "ensemble"])
def test_empty_test_data(fitted, which):
    _, atts = fitted
    a = atts[which]
    with pytest.raises(ValueError, match="test_data: expected at least one example, got an empty dataset"):
        a.score([], progress=False)
    with pytest.raises(ValueError, match="test_data: expected at least one example, got an empty dataset"):
        a.topk([], 3, progress=False)
    empty_batch = [(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))]
    with pytest.raises(ValueError, match="test_data: the first test batch is not a batch of examples .*empty"):
        a.score(empty_batch, progress=False)
    with pytest.raises(ValueError, match="test_data: the first test batch is not a batch of examples"):
        a.topk(["not a batch"], 3, progress=False)
