"""Store identity = what the rows are: methods with the same rows share a store (the second only finalises),
methods with other rows are refused naming what differs; the same through ``gradsketch attribute``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_demo import ENTRY as DEMO_ENTRY  # the user entry point make() of the CLI tests
from typer.testing import CliRunner

from gradsketch.attribution import Attributor, _features, classification_margin
from gradsketch.cli import app
from gradsketch.store import GradientStore

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

SK = dict(kind="sjlt", d=16, seed=0)


def snapshot(store_dir):
    """Every file of every feature store under ``store_dir`` with its mtime and size."""
    return {str(p.relative_to(store_dir)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(Path(store_dir).glob("features_*/**/*")) if p.is_file()}


@pytest.fixture
def trak_store(tmp_path):
    task, data = child.setup()
    data = data[:8]
    Attributor(task, "trak", sketch=SK, store=tmp_path / "s", store_dtype="float32", chunk_rows=20)\
        .fit(data, progress=False)
    return task, data, tmp_path / "s"


@pytest.mark.parametrize("method,opts", [
    ("grad-dot", {}), ("grad-cos", {}), ("tracin", "current"), ("influence", dict(damping=1.0)),
    ("arnoldi", dict(n_iters=6, top_k=3))])
def test_methods_with_the_same_rows_reuse_the_store(trak_store, tmp_path, monkeypatch, method, opts):
    """trak without margin_fn wrote loss-gradient rows: every loss-gradient method finalises on them
    without featurising anything (no new chunk, _rows never called) and scores as on a fresh store."""
    task, data, store = trak_store
    if opts == "current":  # tracin at the current model state (the same fingerprint as trak's rows)
        opts = dict(checkpoints=[({k: v.clone() for k, v in task.model.state_dict().items()}, 0.5)])
    fresh = Attributor(task, method, sketch=SK, store=tmp_path / "fresh", store_dtype="float32", chunk_rows=20,
                       **opts).fit(data, progress=False).score(data[:2], progress=False)
    before = snapshot(store)

    def no_featurisation(*a, **k):
        raise AssertionError("the training set was featurised again")

    monkeypatch.setattr(_features, "_rows", no_featurisation)
    a = Attributor(task, method, sketch=SK, store=store, store_dtype="float32", chunk_rows=20, **opts)
    a.fit(data, progress=False)
    monkeypatch.undo()
    assert snapshot(store) == before
    assert torch.equal(a.score(data[:2], progress=False), fresh)


def test_methods_with_other_rows_are_refused_naming_what_differs(trak_store):
    task, data, store = trak_store
    before = snapshot(store)
    cases = [
        (dict(method="trak", margin_fn=classification_margin()),
         [r"rows: the store holds 'loss-gradient': per-example gradients of the loss",
          r"this fit needs 'output-gradient': per-example gradients of TRAK's margin_fn"]),
        (dict(method="grad-dot", mode="implicit"),
         [r"mode: the rows were computed with mode='explicit', this fit uses mode='implicit'"]),
        (dict(method="grad-dot", sketch=dict(SK, seed=3)), [r"sketch spec differs \(.*seed: expected 3, found 0"]),
        (dict(method="grad-dot", store_dtype="float16"), [r"store_dtype: expected 'float16', found 'float32'"]),
        (dict(method="arnoldi", sketch=None, n_iters=6, top_k=3),
         [r"this fit needs 'arnoldi-projection\+gradient'", r"sketch spec differs"]),
    ]
    for kw, patterns in cases:
        kw = {"sketch": SK, "store_dtype": "float32", **kw}
        a = Attributor(task, store=store, **kw)
        with pytest.raises(_features.StoreMismatchError) as e:
            a.fit(data, progress=False)
        msg = str(e.value)
        assert "cannot be reused" in msg and "use another store path" in msg, msg
        for p in patterns:
            assert re.search(p, msg), (kw, msg)
        assert isinstance(e.value, ValueError)
    with pytest.raises(_features.StoreMismatchError, match="dataset size: the store has 80 rows, train_data has "
                                                           "70 examples"):
        Attributor(task, "grad-dot", sketch=SK, store=store, store_dtype="float32").fit(data[:7], progress=False)
    with torch.no_grad():
        next(task.model.parameters()).add_(0.01)
    with pytest.raises(_features.StoreMismatchError, match="model fingerprint: the rows were computed with other "
                                                           "model parameters"):
        Attributor(task, "grad-dot", sketch=SK, store=store, store_dtype="float32").fit(data, progress=False)
    assert snapshot(store) == before  # nothing written by a refused fit


def test_store_from_an_older_version_is_refused_clearly(tmp_path):
    task, data = child.setup()
    data = data[:4]
    from gradsketch.store import fingerprint_model

    sk = task.block_sketch(16, kind="sjlt", seed=0)
    GradientStore.create_or_open(tmp_path / "features_0", 40, 16, {"sketch": sk.spec, "features": "loss-gradient"},
                                 fingerprint_model(task.model), dtype="float32", metadata={"method": "trak"}).close()
    with pytest.raises(_features.StoreMismatchError) as e:
        Attributor(task, "grad-dot", sketch=SK, store=tmp_path, store_dtype="float32").fit(data, progress=False)
    msg = str(e.value)
    assert "mode: the rows were computed with mode='<unrecorded>'" in msg
    assert "older gradsketch that recorded the method" in msg


ENTRY = DEMO_ENTRY + '''
def bad_test():
    model, loss_fn, train, test = make()
    return model, loss_fn, train, [(torch.randn(4, 7), torch.zeros(4, dtype=torch.long))]
'''


def flat(text):
    """CLI output without the rich error box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture
def entry_dir(tmp_path, monkeypatch):
    (tmp_path / "user_entry.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_second_method_reuses_the_store_and_refusal_is_a_usage_error(entry_dir):
    base = ["attribute", "user_entry:make", "--d", "32", "--out", "o", "--no-progress"]
    r = CliRunner().invoke(app, [*base, "--method", "trak"])
    assert r.exit_code == 0, r.output
    before = snapshot(entry_dir / "o" / "store")
    assert before
    r = CliRunner().invoke(app, [*base, "--method", "grad-dot"])
    assert r.exit_code == 0, r.output
    assert snapshot(entry_dir / "o" / "store") == before  # grad-dot only finalised on trak's rows
    r = CliRunner().invoke(app, [*base, "--method", "grad-dot", "--seed", "1"])
    out = flat(r.output)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, ValueError)
    assert re.search(r"Invalid value for '?--store/--out'?: store: the feature store", out), out
    assert "cannot be reused" in out and "sketch spec differs" in out and "seed: expected 1, found 0" in out, out
    assert snapshot(entry_dir / "o" / "store") == before


def test_cli_bad_test_data_is_a_usage_error(entry_dir):
    r = CliRunner().invoke(app, ["attribute", "user_entry:bad_test", "--method", "grad-dot", "--d", "32",
                                 "--out", "o", "--no-progress"])
    out = flat(r.output)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "test_data: the first test batch failed in the model's forward/loss" in out, out


def test_cli_ranks_then_plain_run_equals_single_run(entry_dir):
    base = ["attribute", "user_entry:make", "--method", "trak", "--d", "32", "--no-progress"]
    r = CliRunner().invoke(app, [*base, "--out", "single"])
    assert r.exit_code == 0, r.output
    for rank in (1, 0):
        r = CliRunner().invoke(app, [*base, "--out", "ranks", "--rank", str(rank), "--world-size", "2"])
        assert r.exit_code == 0, r.output
        assert f"rank {rank}/2: featurised its share" in flat(r.output)
    assert not (entry_dir / "ranks" / "attribution.npz").exists()
    before = snapshot(entry_dir / "ranks" / "store")
    r = CliRunner().invoke(app, [*base, "--out", "ranks"])
    assert r.exit_code == 0, r.output
    assert snapshot(entry_dir / "ranks" / "store") == before
    a, b = np.load(entry_dir / "single" / "attribution.npz"), np.load(entry_dir / "ranks" / "attribution.npz")
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])
    r = CliRunner().invoke(app, [*base, "--out", "x", "--rank", "0"])
    assert r.exit_code == 2 and "both --rank and --world-size" in flat(r.output), r.output
    r = CliRunner().invoke(app, [*base, "--out", "x", "--rank", "2", "--world-size", "2"])
    assert r.exit_code == 2 and "0 <= rank < world_size" in flat(r.output), r.output


def test_options_are_written_into_the_manifest(trak_store):
    """The fit's options are a record in the manifest (``extra``); the store's identity is unchanged."""
    task, data, store = trak_store
    extra = GradientStore.open(store / "features_0").extra["attribution"]
    assert extra["method"] == "trak" and extra["options"]["ridge"] == 1.0
    assert extra["options"]["store_dtype"] == "float32" and extra["row_options"] == {"nan_policy": "raise"}
    # another ridge changes nothing in the rows: the store is reused (finalised only)
    before = snapshot(store)
    Attributor(task, "trak", sketch=SK, store=store, store_dtype="float32", chunk_rows=20, ridge=0.5)\
        .fit(data, progress=False)
    assert snapshot(store) == before


def test_a_row_relevant_option_that_differs_is_refused_naming_it(trak_store, tmp_path):
    task, data, store = trak_store
    with pytest.raises(ValueError, match=r"option nan_policy: the rows were computed with nan_policy='raise', this "
                                         r"fit uses nan_policy='skip' \(to reuse these rows pass the nan_policy"):
        Attributor(task, "grad-dot", sketch=SK, store=store, store_dtype="float32", chunk_rows=20,
                   nan_policy="skip").fit(data, progress=False)
    # two output functions give two kinds of output-gradient rows: the second is refused, naming both
    m1 = classification_margin()

    def m2(model, batch):
        return model(batch[0]).logsumexp(1)

    Attributor(task, "trak", sketch=SK, store=tmp_path / "m", margin_fn=m1).fit(data, progress=False)
    with pytest.raises(ValueError, match=r"option margin_fn: the rows were computed with margin_fn="
                                         r"'gradsketch\.model\.losses\.classification_margin\.<locals>\."
                                         r"margin_fn\(input_key=0, target_key=1\)#[0-9a-f]+', this fit uses margin_fn="
                                         r"'test_attribution_store_reuse\..*m2\(\)#"):
        Attributor(task, "trak", sketch=SK, store=tmp_path / "m", margin_fn=m2).fit(data, progress=False)
    # the same output function built again is the same rows
    Attributor(task, "trak", sketch=SK, store=tmp_path / "m", margin_fn=classification_margin())\
        .fit(data, progress=False)
