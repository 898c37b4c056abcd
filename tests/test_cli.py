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
