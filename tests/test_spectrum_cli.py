"""The ``spectrum`` typer command: built-in digits MLP and a user entry point."""

from __future__ import annotations

import json
import textwrap

import torch
from typer.testing import CliRunner

from gradsketch.cli import app

runner = CliRunner()


def test_builtin_digits(tmp_path):
    old = torch.get_num_threads()
    try:
        out = runner.invoke(app, ["spectrum", "--k", "4", "--which", "BE", "--hidden", "8", "--n-examples", "64",
                                  "--epochs", "1", "--float64", "--no-progress", "--threads", "1",
                                  "--json", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.html"),
                                  "--plot", str(tmp_path / "r.png"), "--density-probes", "2",
                                  "--density-steps", "10"])
    finally:
        torch.set_num_threads(old)
    assert out.exit_code == 0, out.output
    assert "negative ratio" in out.output and "alignment" in out.output
    d = json.load(open(tmp_path / "r.json"))
    assert len(d["eigenvalues"]) == 4 and d["info"]["operator"] == "hessian"
    assert "base64" in open(tmp_path / "r.html").read()
    assert (tmp_path / "r.png").exists()


def test_entry_point_and_sketch(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(textwrap.dedent("""
        import torch
        def build():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(20, 5, generator=g, dtype=torch.float64)
            y = torch.randint(0, 3, (20,), generator=g)
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
            loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
            return model, loss, [(x[:10], y[:10]), (x[10:], y[10:])]
    """))
    out = runner.invoke(app, ["spectrum", "--entry", f"{f}:build", "--k", "3", "--kind", "affd", "--d", "32",
                              "--no-progress", "--threads", "1"])
    assert out.exit_code == 0, out.output
    assert "sketch affd d=32" in out.output
    bad = runner.invoke(app, ["spectrum", "--entry", f"{f}:nope", "--no-progress"])
    assert bad.exit_code == 2 and "nope" in bad.output
    bad = runner.invoke(app, ["spectrum", "--entry", f"{f}:build", "--operator", "ggn", "--no-progress"])
    assert bad.exit_code == 2 and "GGN" in bad.output
