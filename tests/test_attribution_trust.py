"""Issue 12 through the Attributor: shuffling loaders refused, changed data re-featurised on request (only the
changed chunks), skipped (non-finite) examples recorded with their dataset index, the Arnoldi cache named and
recomputed when damaged and optional when it cannot be written."""

from __future__ import annotations

import errno
import importlib.util
import os
import warnings
from pathlib import Path

import pytest
import torch
from _helpers import count_featurised_rows
from test_nan_paths import BAD, M, loss
from test_nan_paths import data as nan_data
from torch.utils.data import DataLoader, TensorDataset

from gradsketch.attribution import Attributor
from gradsketch.model import Task
from gradsketch.store import DataChangedError, GradientStore

CHILD = Path(__file__).with_name("_attribution_child.py")
_spec = importlib.util.spec_from_file_location("_attribution_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


def files(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


def test_shuffling_loader_is_refused_by_fit_and_featurise(tmp_path):
    task, batches = child.setup()
    X = torch.cat([b[0] for b in batches])[:40]
    y = torch.cat([b[1] for b in batches])[:40]
    shuffled = DataLoader(TensorDataset(X, y), batch_size=10, shuffle=True)
    for store in (None, tmp_path / "s"):
        with pytest.raises(ValueError, match=r"train_data: expected the examples in a fixed order, got a DataLoader "
                                             r"with a RandomSampler .*shuffle=False"):
            child.attributor(task, store).fit(shuffled, progress=False)
    with pytest.raises(ValueError, match=r"train_data: expected the examples in a fixed order"):
        child.attributor(task, tmp_path / "s").featurise(shuffled, progress=False)
    assert not (tmp_path / "s" / "features_0").exists()  # refused before anything was written
    child.attributor(task, None).fit(DataLoader(TensorDataset(X, y), batch_size=10), progress=False)


def test_refeaturise_on_changed_data_recomputes_only_those_chunks(tmp_path, monkeypatch):
    task, batches = child.setup()
    batches = batches[:8]
    child.attributor(task, tmp_path / "s").fit(batches, progress=False)
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    y[[25, 71]] = (y[[25, 71]] + 1) % 3  # chunks 1 (20:40) and 3 (60:80)
    relabelled = [(X[s:s + 10], y[s:s + 10]) for s in range(0, 80, 10)]
    with pytest.raises(DataChangedError, match=r"chunk 1 \(examples 20:40\), chunk 3 \(examples 60:80\).*"
                                               r"on_data_change='refeaturise'"):
        child.attributor(task, tmp_path / "s").fit(relabelled, progress=False)
    seen = count_featurised_rows(monkeypatch)
    a = child.attributor(task, tmp_path / "s", on_data_change="refeaturise").fit(relabelled, progress=False)
    monkeypatch.undo()
    assert sorted(seen) == [*range(20, 40), *range(60, 80)]
    fresh = child.attributor(task, tmp_path / "fresh").fit(relabelled, progress=False)
    assert files(tmp_path / "s" / "features_0") == files(tmp_path / "fresh" / "features_0")
    torch.testing.assert_close(a.score(relabelled[:1], progress=False), fresh.score(relabelled[:1], progress=False))


@pytest.mark.parametrize("store", [False, True])
def test_skipped_examples_are_recorded_with_their_dataset_index(tmp_path, store):
    task = Task(M(), loss)
    b = nan_data()  # batches of 7 and 13; the bad examples 10, 11, 13, 14 are in the second
    a = Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=8, seed=0), nan_policy="skip",
                   store=tmp_path / "s" if store else None, chunk_rows=5)
    a.fit(b, progress=False)
    assert a.skipped_indices_ == BAD
    if store:  # recorded in the store: a later fit that computes nothing still knows them
        assert GradientStore.open(tmp_path / "s" / "features_0").skipped_rows() == BAD
        again = Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=8, seed=0), nan_policy="skip",
                           store=tmp_path / "s", chunk_rows=5).fit(b, progress=False)
        assert again.skipped_indices_ == BAD


def _arnoldi(task, path):
    return Attributor(task, "arnoldi", sketch=dict(kind="sjlt", d=16, seed=0), store=path, n_iters=8, top_k=4,
                      store_dtype="float32", chunk_rows=20)


def test_truncated_arnoldi_cache_is_named_and_recomputed(tmp_path):
    task, batches = child.setup()
    batches = batches[:4]
    ref = _arnoldi(task, tmp_path).fit(batches, progress=False).score(batches[:1], progress=False)
    (cache,) = tmp_path.glob("arnoldi_*.pt")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match=rf"{cache}: unreadable cache file .*recomputing it"):
        got = _arnoldi(task, tmp_path).fit(batches, progress=False).score(batches[:1], progress=False)
    torch.testing.assert_close(got, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # rewritten intact: read back without a warning
        _arnoldi(task, tmp_path).fit(batches, progress=False)


def test_arnoldi_cache_is_optional_when_it_cannot_be_written(tmp_path, monkeypatch):
    task, batches = child.setup()
    batches = batches[:4]
    ref = _arnoldi(task, tmp_path / "ro").fit(batches, progress=False).score(batches[:1], progress=False)
    (tmp_path / "ro" / "arnoldi_0.pt").unlink()  # the feature store is complete; the cache must be recomputed

    real_replace = os.replace

    def read_only(src, dst, *a, **k):  # the cache's directory refuses new files (a read-only filesystem)
        if str(dst).endswith(".pt"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.warns(RuntimeWarning, match=r"arnoldi_0.pt: could not write the cache \(Read-only file system\); "
                                            r"continuing without it"):
        got = _arnoldi(task, tmp_path / "ro").fit(batches, progress=False).score(batches[:1], progress=False)
    torch.testing.assert_close(got, ref)
    assert not (tmp_path / "ro" / "arnoldi_0.pt").exists()
    assert not [p.name for p in (tmp_path / "ro").iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_cli_refuses_changed_data_and_refeaturises_on_request(tmp_path, monkeypatch):
    from test_demo import ENTRY
    from typer.testing import CliRunner

    from gradsketch.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.py").write_text(ENTRY)
    args = ["attribute", "e:make", "--method", "grad-dot", "--kind", "sjlt", "--d", "16", "--k", "2",
            "--out", "o", "--no-progress", "--no-self-influence"]
    runner = CliRunner()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    # relabel training example 20 (the entry's labels are x0 > 0)
    (tmp_path / "e2.py").write_text(ENTRY.replace("y = (X[:, 0] > 0).long()",
                                                  "y = (X[:, 0] > 0).long(); y[20] = 1 - y[20]"))
    args2 = [a if a != "e:make" else "e2:make" for a in args]
    r = runner.invoke(app, args2)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "chunk 0 (examples 0:48)" in " ".join(r.output.split())
    r = runner.invoke(app, [*args2, "--on-data-change", "refeaturise"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("d,exc,msg", [("abc", TypeError, r"sketch\['d'\]: expected an integer, got str"),
                                       (2.7, TypeError, r"sketch\['d'\]: expected an integer, got float \(2.7\)"),
                                       (0, ValueError, r"sketch\['d'\]: expected an integer >= 1, got 0")])
def test_sketch_dimension_is_checked_never_truncated(d, exc, msg):
    task, batches = child.setup()
    with pytest.raises(exc, match=msg):
        Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=d)).fit(batches[:1], progress=False)


def test_store_path_that_is_a_file_is_a_clear_error(tmp_path):
    task, _ = child.setup()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"store: expected a directory \(or a path to create one\), got the file"):
        Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=8), store=tmp_path / "afile")
    with pytest.raises(TypeError, match=r"store: expected a directory path or None, got int"):
        Attributor(task, "grad-dot", sketch=dict(kind="sjlt", d=8), store=5)
