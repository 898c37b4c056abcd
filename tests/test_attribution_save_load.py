"""Attributor.save / Attributor.load: the loaded attributor scores exactly like the fitted one, for every
built-in method, in memory and store-backed; the files are untrusted input (no unpickling) and every edit,
truncation or wrong task is refused naming what was expected and what arrived."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from gradsketch import Attributor, Task
from gradsketch.attribution import AttributorFileError, classification_margin

DT = torch.float64


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(14, 4, dtype=DT), torch.randint(0, 3, (14,))
    train = [(X[:8], y[:8]), (X[8:], y[8:])]
    test = [(torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,)))]
    return Task.from_classifier(model), train, test


CASES = [
    ("grad-dot", {}),
    ("grad-cos", {"sketch": {"d": 16, "kind": "dense", "seed": 1}}),
    ("tracin", {"checkpoints": "two"}),
    ("trak", {"sketch": {"d": 12, "kind": "sjlt", "seed": 2}}),
    ("trak", {"margin_fn": "opt"}),                       # d = 43 > n = 14: the Woodbury kernel
    ("trak", {"models": "two"}),
    ("arnoldi", {"n_iters": 30, "top_k": 6}),             # projections on eigenvectors
    ("arnoldi", {"n_iters": 20, "top_k": 5, "sketch": {"d": 20, "seed": 3}}),
    ("influence", {}),                                    # explicit, exact gradients
    ("influence", {"solver": "cg", "sketch": {"d": 10, "seed": 4}, "tol": 1e-13}),
    ("ekfac", {}),
    ("kfac", {"sketch": {"d": 10, "seed": 5}}),
    ("grad-dot", {"sketch": {"d": 16, "seed": 6}, "mode": "factored"}),
]


def _opts(task, kw):
    kw = dict(kw)
    sd = {k: v.clone() + 0.01 for k, v in task.model.state_dict().items()}
    if kw.get("checkpoints") == "two":
        kw["checkpoints"] = [(task.model.state_dict(), 0.5), (sd, 0.25)]
    if kw.get("models") == "two":
        kw["models"] = [task.model.state_dict(), sd]
    if kw.get("margin_fn") == "opt":
        kw["margin_fn"] = classification_margin()
    return kw


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_loaded_attributor_scores_like_the_fitted_one(tmp_path, method, kw):
    task, train, test = _setup()
    kw = _opts(task, kw)
    a = Attributor(task, method, **kw).fit(train, progress=False)
    a.save(tmp_path / "a")
    extra = {"margin_fn": kw["margin_fn"]} if "margin_fn" in kw else {}
    b = Attributor.load(tmp_path / "a", task, **extra)
    assert type(b) is type(a) and b.method == a.method and (b.n_train_, b.d_) == (a.n_train_, a.d_)
    exact = kw.get("solver") not in ("cg", "lissa")  # iterative kernels are saved as their matrix
    # the same tensors: equal up to float64 summation order (a saved factor is contiguous, eigh's is not)
    tol = dict(rtol=1e-12, atol=1e-13) if exact else dict(rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(b.score(test, progress=False), a.score(test, progress=False), **tol)
    torch.testing.assert_close(b.self_influence(progress=False), a.self_influence(progress=False), **tol)
    ta, tb = a.topk(test, k=4, progress=False), b.topk(test, k=4, progress=False)
    assert torch.equal(ta.indices, tb.indices) and torch.equal(ta.opponent_indices, tb.opponent_indices)
    for name in ("ridge_", "eigenvalues_", "damping_"):
        if hasattr(a, name):
            va, vb = getattr(a, name), getattr(b, name)
            assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb


def test_store_backed_attributor_is_saved_as_a_reference_and_reopened(tmp_path):
    task, train, test = _setup()
    a = Attributor(task, "trak", sketch={"d": 12, "seed": 1}, store=tmp_path / "store").fit(train, progress=False)
    a.save(tmp_path / "a")
    b = Attributor.load(tmp_path / "a", task)
    S = a.score(test, progress=False)
    assert torch.equal(S, b.score(test, progress=False))
    (tmp_path / "store").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="pass store="):
        Attributor.load(tmp_path / "a", task)
    c = Attributor.load(tmp_path / "a", task, store=tmp_path / "moved")
    assert torch.equal(S, c.score(test, progress=False))


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    task, train, test = _setup()
    Attributor(task, "ekfac").fit(train, progress=False).save(tmp_path / "a")

    def refuse(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    Attributor.load(tmp_path / "a", task).score(test, progress=False)
    assert all(f.name == "manifest.json" or f.suffix == ".bin" for f in (tmp_path / "a").iterdir())


def test_wrong_task_is_refused_naming_expected_and_arrived(tmp_path):
    task, train, _ = _setup()
    Attributor(task, "grad-dot").fit(train, progress=False).save(tmp_path / "a")
    other = Task.from_classifier(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT))
    with pytest.raises(ValueError, match="43 selected parameters.*this task has 51"):
        Attributor.load(tmp_path / "a", other)
    torch.manual_seed(1)
    same_size = Task.from_classifier(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT))
    with pytest.raises(ValueError, match="other parameter values"):  # same shapes, other weights
        Attributor.load(tmp_path / "a", same_size)
    f32 = Task.from_classifier(_setup()[0].model.float())
    with pytest.raises(ValueError, match="fitted in float64, this task's model is float32"):
        Attributor.load(tmp_path / "a", f32)
    swapped = Task.from_classifier(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT),
                                   params=None)
    with pytest.raises(TypeError, match="task: expected a gradsketch.Task"):
        Attributor.load(tmp_path / "a", swapped.model)


def _manifest(p):
    return json.loads((p / "manifest.json").read_text())


def _write(p, m, checksum=True):
    """An edited manifest; with ``checksum`` its checksum is recomputed, so the loader's field checks are reached."""
    from gradsketch.attribution.persist import manifest_checksum

    m = dict(m)
    if checksum:
        m["checksum"] = manifest_checksum(m)
    (p / "manifest.json").write_text(json.dumps(m))


def test_truncated_and_edited_files_are_refused_naming_the_file(tmp_path):
    task, train, _ = _setup()
    a = Attributor(task, "trak", sketch={"d": 12, "seed": 1}).fit(train, progress=False)
    p = a.save(tmp_path / "a")
    m = _manifest(p)
    feats = m["components"][0]["feats"]["tensor"]
    f = p / m["tensors"][feats]["file"]
    raw = f.read_bytes()
    f.write_bytes(raw[:-8])                                       # truncated
    with pytest.raises(AttributorFileError, match=r"expected 1344 bytes \(float64 of shape \[14, 12\]\), found 1336"):
        Attributor.load(p, task)
    f.write_bytes(raw[:-8] + b"\x00" * 8)                         # edited in place
    with pytest.raises(AttributorFileError, match="sha256"):
        Attributor.load(p, task)
    f.write_bytes(raw)
    m2 = json.loads(json.dumps(m))
    m2["tensors"][feats]["shape"] = [14, 13]                      # a manifest that claims a wrong shape
    _write(p, m2, checksum=False)
    with pytest.raises(AttributorFileError, match="checksum does not match"):
        Attributor.load(p, task)
    _write(p, m2)
    with pytest.raises(AttributorFileError, match=r"expected shape \[14, 12\], the manifest claims \[14, 13\]"):
        Attributor.load(p, task)
    m2 = json.loads(json.dumps(m))
    m2["tensors"][feats]["file"] = "../../etc/passwd"             # a path outside the directory
    _write(p, m2)
    with pytest.raises(AttributorFileError, match="expected a file name t<i>.bin"):
        Attributor.load(p, task)
    m2 = json.loads(json.dumps(m))
    m2["components"][0]["kernel"] = {"type": "pickle"}
    _write(p, m2)
    with pytest.raises(AttributorFileError, match="kernel.type: expected one of"):
        Attributor.load(p, task)
    m2 = json.loads(json.dumps(m))
    m2["components"][0]["kernel"]["type"] = "identity"            # consistent edits load, but nothing unsafe
    _write(p, m2)
    assert Attributor.load(p, task).kernels_ == [None]
    m2 = json.loads(json.dumps(m))
    m2["d"] = 13                                                  # the features' width disagrees with d
    _write(p, m2)
    with pytest.raises(AttributorFileError, match="expected d = 13 \\(the features' width\\), got 12"):
        Attributor.load(p, task)
    (p / "manifest.json").write_text(json.dumps(m)[:-20])         # truncated manifest
    with pytest.raises(AttributorFileError, match="not valid JSON"):
        Attributor.load(p, task)
    _write(p, m)
    Attributor.load(p, task)                                      # the intact files still load


def test_save_refuses_unfitted_and_nonempty_directories(tmp_path):
    task, train, _ = _setup()
    with pytest.raises(RuntimeError, match="fit"):
        Attributor(task, "grad-dot").save(tmp_path / "x")
    a = Attributor(task, "grad-dot").fit(train, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        a.save(tmp_path / "busy")
    a.save(tmp_path / "a")
    with pytest.raises(FileExistsError):
        a.save(tmp_path / "a")
    a.save(tmp_path / "a", overwrite=True)


def test_margin_fn_option_must_be_given_again(tmp_path):
    task, train, test = _setup()
    a = Attributor(task, "trak", margin_fn=classification_margin()).fit(train, progress=False)
    a.save(tmp_path / "a")
    with pytest.raises(ValueError, match="margin_fn"):
        Attributor.load(tmp_path / "a", task)
