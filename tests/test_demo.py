"""The demo end to end on a reduced setting, and the CLI sub-app (demo, attribute)."""

from __future__ import annotations

import json
import re

import numpy as np
from typer.testing import CliRunner

from gradsketch.cli import app
from gradsketch.demo import run_demo

ENTRY = '''
import torch
from torch import nn
import torch.nn.functional as F

def make():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, generator=g); y = (X[:, 0] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")
    return model, loss_fn, [(X[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], [(X[48:], y[48:])]
'''


def test_demo_reduced_writes_report_with_sections(tmp_path, capsys):
    path = run_demo(tmp_path / "demo", n_train=200, n_test=20, steps=60, d=256, n_iters=30, top_k=10, n_show=2,
                    n_each=3, progress=False)
    html = path.read_text()
    for section in ("Setup", "Mislabel detection", "Proponents and opponents: Arnoldi influence",
                    "Proponents and opponents: TRAK", "Timing"):
        assert f">{section}</h2>" in html
    # the ROC figure, then per method and shown test image: the test image, 3 proponents and 3 opponents as images
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 1 + 2 * 2 * (1 + 2 * 3)
    assert len(re.findall(r"score [+-]\d", html)) == 2 * 2 * 2 * 3  # every proponent/opponent card has its score
    assert "http://" not in html and "https://" not in html  # self-contained
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert 0.5 < summary["auc"]["Arnoldi influence"] <= 1.0  # better than chance on 20 planted flips
    assert "report written to" in capsys.readouterr().out


def test_cli_attribute_with_config_and_flags(tmp_path, monkeypatch):
    (tmp_path / "user_entry.py").write_text(ENTRY)
    (tmp_path / "cfg.toml").write_text('method = "arnoldi"\nd = 32\nn_iters = 20\ntop_k = 5\nk = 3\n')
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["attribute", "user_entry:make", "--config", "cfg.toml", "--k", "4",
                                 "--out", "o", "--no-progress"])
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "o" / "attribution.npz")
    assert z["indices"].shape == (12, 4) and z["self_influence"].shape == (48,)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["method"] == "arnoldi"
    r = CliRunner().invoke(app, ["attribute", "user_entry:nope", "--out", "o2"])
    assert r.exit_code == 2 and "callable 'nope'" in r.output and "Traceback" not in r.output
