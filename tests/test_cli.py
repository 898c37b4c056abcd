"""The command line: every application's commands are registered and `info` reports the kinds."""

import json

from typer.testing import CliRunner

from gradsketch.cli import app
from gradsketch.sketch import KINDS


def test_info_lists_kinds():
    res = CliRunner().invoke(app, ["info"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert sorted(out["sketch_kinds"]) == sorted(KINDS)


def test_help_lists_the_application_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0, res.output
    for cmd in ("demo", "attribute", "spectrum", "intrinsic-dim", "bench", "info"):
        assert cmd in res.output, (cmd, res.output)


def test_package_level_api():
    """`gradsketch.spectrum(...)` is callable and still the subpackage; the main names are exported."""
    import torch

    import gradsketch
    from gradsketch.linalg import MatrixOperator

    A = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    res = gradsketch.spectrum(MatrixOperator(A), k=3, progress=False)
    assert torch.allclose(res.eigenvalues, torch.tensor([20.0, 19.0, 18.0], dtype=torch.float64))
    assert gradsketch.spectrum.density is gradsketch.density
    for name in gradsketch.__all__:
        assert hasattr(gradsketch, name), name
