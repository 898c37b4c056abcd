"""The command line and reports of issue 19: one entry-point form for every command, options checked before
the model loads, one-line usage errors (exit status 2), reports that show what they are about, and library
calls without process-wide side effects."""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gradsketch.cli import app
from gradsketch.entry import Entry, load_entry

runner = CliRunner()

ENTRY = '''
import os
import torch
from torch import nn
import torch.nn.functional as F
from gradsketch import Entry

def make():
    if os.environ.get("GS_MARK"):
        open(os.environ["GS_MARK"], "w").write("loaded")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 16, generator=g); y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 2))
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
    flagged = torch.zeros(48, dtype=torch.bool); flagged[[3, 7]] = True
    return Entry(model, loss, [(X[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], [(X[48:], y[48:])],
                 flagged=flagged)

def with_bn():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 4, generator=g, dtype=torch.float64); y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).double().train()
    return Entry(model, "cross_entropy", [(X[:12], y[:12]), (X[12:], y[12:])], [(X, y)])
'''


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def entry_dir(tmp_path, monkeypatch):
    (tmp_path / "user_entry.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GS_MARK", str(tmp_path / "loaded.txt"))
    return tmp_path


def assert_usage_error(r, *needles):
    out = r.output
    assert r.exit_code == 2, out
    assert "Traceback" not in out and r.exception is None or isinstance(r.exception, SystemExit), out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out  # one line says what is wrong
    for n in needles:
        assert n in errors[0], (n, out)


@pytest.mark.parametrize("cmd", [["attribute", "user_entry:make"], ["spectrum", "--entry", "user_entry:make"],
                                 ["intrinsic-dim", "--entry", "user_entry:make"]])
@pytest.mark.parametrize("bad,needle", [(["--kind", "gaussian"], "kind: expected one of"),
                                        (["--method", "lissa"], "method: expected one of"),
                                        (["--k", "-3"], "k: expected an integer >= 1")])
def test_bad_options_are_refused_before_the_model_loads(entry_dir, cmd, bad, needle):
    if cmd[0] == "intrinsic-dim" and bad[0] == "--k":
        bad, needle = ["--d-start", "-3"], "d_start: expected an integer >= 1"
    r = runner.invoke(app, [*cmd, *bad, "--no-progress"])
    assert_usage_error(r, needle)
    assert not (entry_dir / "loaded.txt").exists(), "the entry point was called before the options were checked"


@pytest.mark.parametrize("cfg,needle", [('k = 2.7\n', "k: expected an integer"),
                                        ('d = "abc"\n', "d: expected an integer"),
                                        ('method = 5\n', "method: expected one of"),
                                        ('damping = nan\n', "damping: expected a finite number"),
                                        ('k = [1\n', "config: expected valid TOML"),
                                        ('colour = "red"\n', "unknown ['colour']")])
def test_config_values_are_checked_as_usage_errors(entry_dir, cfg, needle):
    (entry_dir / "c.toml").write_text(cfg)
    r = runner.invoke(app, ["attribute", "user_entry:make", "--config", "c.toml", "--no-progress"])
    assert_usage_error(r, needle)
    assert not (entry_dir / "loaded.txt").exists()
    r = runner.invoke(app, ["attribute", "user_entry:make", "--config", "missing.json", "--no-progress"])
    assert_usage_error(r, "config: expected a readable JSON/TOML file")


def test_one_entry_form_for_every_command(entry_dir):
    """The same module:function returning an Entry drives attribute, spectrum --entry and intrinsic-dim --entry."""
    r = runner.invoke(app, ["attribute", "user_entry:make", "--method", "grad-dot", "--d", "32", "--k", "3",
                            "--out", "o", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert np.load(entry_dir / "o" / "attribution.npz")["indices"].shape == (12, 3)
    r = runner.invoke(app, ["spectrum", "--entry", "user_entry:make", "--k", "3", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "alignment with the top-3 eigenspace" in r.output
    r = runner.invoke(app, ["intrinsic-dim", "--entry", "user_entry:make", "--kind", "sjlt", "--d-max", "64",
                            "--d-start", "4", "--steps", "60", "--eval-every", "20", "--full-metric", "1.0",
                            "--lr", "0.1", "--no-progress", "--json", "r.json"])
    assert r.exit_code == 0, r.output
    res = json.loads((entry_dir / "r.json").read_text())
    assert res["table"][0]["d"] == 4 and res["model"] == "user_entry:make"


def test_entry_loader_forms_and_mistakes():
    model = torch.nn.Linear(3, 2)
    X, Y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    e = load_entry(lambda: (model, "cross_entropy", [(X, Y)], [(X, Y)]))  # a plain tuple in field order
    assert isinstance(e, Entry) and e.model is model and e.test is not None
    with pytest.raises(TypeError, match=r"train: expected an iterable of batches.*wrap it in a list: \[\(x, y\)\]"):
        Entry(model, "cross_entropy", (X, Y))
    with pytest.raises(ValueError, match=r"entry: expected 'module:function'"):
        load_entry("no_colon")
    with pytest.raises(TypeError, match=r"entry: expected .* to return a gradsketch.Entry"):
        load_entry(lambda: model)


def test_intrinsic_accuracy_on_more_than_512_rows():
    """accuracy((x, y)) on 600 rows: slices of 512 + 88 (on the old main a generator closed over the rebound y)."""
    from gradsketch.intrinsic import accuracy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 4, generator=g)
    y = torch.randint(0, 4, (600,), generator=g)
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        expect = int((model(x).argmax(1) == y).sum()) / 600
    assert accuracy(model, (x, y)) == expect


def test_intrinsic_defaults_are_one_set_and_give_an_estimate_on_digits(tmp_path):
    """API, config and CLI share DEFAULTS, and with them `intrinsic-dim --task digits` returns an estimate (the
    old defaults reported "> 64"). Seeds fixed: deterministic."""
    from gradsketch.cli.intrinsic import intrinsic_dim
    from gradsketch.intrinsic import DEFAULTS, intrinsic_dimension
    from gradsketch.intrinsic.pipeline import IntrinsicConfig

    api = inspect.signature(intrinsic_dimension).parameters
    cli = inspect.signature(intrinsic_dim).parameters
    cfg = IntrinsicConfig()
    for name, value in DEFAULTS.items():
        assert api[name].default == value and getattr(cfg, name) == value and cli[name].default.default == value
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = runner.invoke(app, ["intrinsic-dim", "--task", "digits", "--no-progress",
                                "--json", str(tmp_path / "d.json")])
    finally:
        torch.set_num_threads(old)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["estimate"] is not None, r.output
    assert 32 <= res["estimate"] <= 1024  # grid on this MLP: 256 (benchmarks/results/intrinsic.md)


def test_spectrum_with_batchnorm_in_train_mode_saves_everything(entry_dir):
    r = runner.invoke(app, ["spectrum", "--entry", "user_entry:with_bn", "--k", "3", "--which", "BE",
                            "--no-progress", "--json", "s.json", "--report", "s.html", "--plot", "s.png"])
    assert r.exit_code == 0, r.output
    for f in ("s.json", "s.npz", "s.html", "s.png"):
        assert (entry_dir / f).exists(), f
    assert "alignment with the top-3 eigenspace" in r.output
    html = (entry_dir / "s.html").read_text()
    assert "gradient of the mean loss over the first training batch (12 examples)" in html


def test_spectrum_report_has_residuals_provenance_and_labelled_ends(entry_dir):
    r = runner.invoke(app, ["spectrum", "--entry", "user_entry:make", "--k", "4", "--which", "BE",
                            "--no-progress", "--report", "r.html"])
    assert r.exit_code == 0, r.output
    html = (entry_dir / "r.html").read_text()
    for head in (">Provenance</h2>", ">Eigenpairs</h2>", ">Diagnostics</h2>", "relative residual",
                 "gradient used for the alignment", "user_entry:make", "float32", "48 examples in 3 batches",
                 "spectrum --entry user_entry:make --k 4 --which BE"):
        assert head in html, head
    rows = re.findall(r"<tr><td>(\d)</td><td>(top|bottom)</td>", html)
    assert [e for _, e in rows] == ["top", "top", "bottom", "bottom"]  # BE: k - k//2 top, k//2 bottom
    assert "top eigenvalues" not in html or "bottom" in html


def test_attribution_report_shows_examples_labels_scores_and_flags(entry_dir):
    r = runner.invoke(app, ["attribute", "user_entry:make", "--method", "grad-dot", "--d", "32", "--k", "5",
                            "--out", "o", "--no-progress"])
    assert r.exit_code == 0, r.output
    html = (entry_dir / "o" / "report.html").read_text()
    z = np.load(entry_dir / "o" / "attribution.npz")
    n_show = 8  # the first 8 of the 12 test examples, each with 5 proponents and 5 opponents
    cards = re.findall(r"<div class='card ([a-z ]*)'>", html)
    assert sum(c.startswith("test") for c in cards) == n_show
    assert sum(c.startswith("pro") for c in cards) == sum(c.startswith("opp") for c in cards) == n_show * 5
    assert html.count("data:image/png;base64,") >= n_show * 11  # 16 inputs shown as 4×4 images
    first = z["indices"][0, 0]
    assert html.count("<br>predicted ") == n_show  # the model (eval mode) predicts each shown test example
    assert f"train #{first}</b><br>label " in html and f"score {z['values'][0, 0]:+.3g}</span>" in html
    flagged_shown = {3, 7} & set(z["indices"][:n_show, :5].ravel().tolist() + z["opponent_indices"][:n_show, :5]
                                 .ravel().tolist() + np.argsort(-z["self_influence"])[:12].tolist())
    assert flagged_shown and html.count("<span class='flagtxt'>mislabelled</span>") >= len(flagged_shown)


def test_intrinsic_plot_draws_the_confirming_run_and_the_deciding_point():
    from gradsketch.intrinsic import IntrinsicDimResult
    from gradsketch.report.plots import plot_intrinsic

    res = IntrinsicDimResult("one-run", "affd", 0.9, 1.0, 0.9, 256,
                             table=[{"d": 16, "metric": 0.5}, {"d": 32, "metric": 0.8}, {"d": 64, "metric": 0.95}],
                             estimate=64, confirm={"d": 32, "metric": 0.85, "reached": False, "steps": 10})
    ax = plot_intrinsic(res).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "confirming run at d=32 (not reached)" in labels and "D_int = 64 (deciding point)" in labels
    pts = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert pts["D_int = 64 (deciding point)"] == ([64], [0.95])
    assert pts["confirming run at d=32 (not reached)"] == ([32], [0.85])
    res.confirm = {"d": 32, "metric": 0.92, "reached": True, "steps": 10}
    res.estimate = 32  # the confirming run reached τ: it decided
    ax = plot_intrinsic(res).axes[0]
    pts = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert pts["D_int = 32 (deciding point)"] == ([32], [0.92])


def test_library_calls_have_no_process_wide_side_effects(tmp_path):
    """No matplotlib.use, no environment writes, no download outside the explicit fetch; a missing data set
    names the command that fetches it."""
    import matplotlib

    from gradsketch.datasets import minilm_task, rotten_tomatoes

    src = Path(__file__).resolve().parents[1] / "src" / "gradsketch"
    for f in src.rglob("*.py"):
        text = f.read_text()
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, f
        assert not re.search(r"os\.environ(\[[^\]]+\]\s*=|\.setdefault|\.update)", text), f
        if "subprocess" in text:
            assert f.name in ("text.py", "_native.py", "_triton.py"), f
    before_env, before_backend = dict(os.environ), matplotlib.get_backend()
    with pytest.raises(FileNotFoundError, match="gradsketch data fetch rotten-tomatoes"):
        rotten_tomatoes(tmp_path)
    with pytest.raises(FileNotFoundError, match="gradsketch data fetch rotten-tomatoes"):
        minilm_task(cache=str(tmp_path))
    assert dict(os.environ) == before_env and matplotlib.get_backend() == before_backend
    assert not any(tmp_path.iterdir())
    r = runner.invoke(app, ["data", "fetch", "imagenet"])
    assert_usage_error(r, "name: expected one of")
    r = runner.invoke(app, ["data", "list"])
    assert r.exit_code == 0 and "rotten-tomatoes" in r.output


def test_demo_command_checks_its_options(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--kind", "gaussian"])
    assert_usage_error(r, "kind: expected one of")
    assert not (tmp_path / "d").exists()


def test_text_examples_are_shown_as_text():
    """Entry.examples given as strings (e.g. reviews) become text cards, escaped, with label and score."""
    from types import SimpleNamespace

    from gradsketch.report.attribution import attribution_cards

    topk = SimpleNamespace(values=torch.tensor([[0.5]]), indices=torch.tensor([[1]]),
                           opponent_values=torch.tensor([[-0.25]]), opponent_indices=torch.tensor([[0]]))
    html = attribution_cards([0], topk, {0: ("a <great> film", 1)},
                             {0: ("dull & slow", 0), 1: ("loved it", 1)}, 1, flagged=[True, False])
    assert "<div class='card test text'><div class='txt'>a &lt;great&gt; film</div>" in html
    assert "<div class='card opp text flag'><div class='txt'>dull &amp; slow</div>" in html
    assert "score +0.5</span>" in html and "score -0.25</span>" in html and "flagtxt" in html
    assert "data:image" not in html


def test_report_predictions_never_change_the_model():
    """Predicted classes in the report come from a forward pass only where that pass cannot change the model:
    a BatchNorm layer in train mode (it would update its running statistics) means no predictions."""
    from gradsketch.report.attribution import predicted_classes

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).train()
    before = bn[1].running_mean.clone()
    assert predicted_classes(bn, [(x, None)], [0, 1]) == {}
    assert torch.equal(bn[1].running_mean, before)
    bn.eval()
    with torch.no_grad():
        expect = bn(x).argmax(1)
    assert predicted_classes(bn, [(x[:4], None), (x[4:], None)], [1, 5]) == {1: int(expect[1]), 5: int(expect[5])}
