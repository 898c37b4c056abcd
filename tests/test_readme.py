"""The README's intrinsic-dimension and command-line blocks run as written (the entry-point file is written
out as the README names it; `data fetch` and the Rotten Tomatoes line need the network and are skipped)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def entry_block() -> str:
    (block,) = [b for b in blocks("python") if b.startswith("# my_entry.py")]
    return block


def cli_lines() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Command line"):text.index("## Speed on the CPU")]
    lines = []
    for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        lines += [ln.split("#")[0].strip() for ln in b.splitlines() if ln.strip().startswith("gradsketch ")]
    return lines


def test_readme_entry_point_loads(tmp_path, monkeypatch):
    from gradsketch import Entry, load_entry

    (tmp_path / "my_entry.py").write_text(entry_block())
    monkeypatch.chdir(tmp_path)
    e = load_entry("my_entry:build")
    assert isinstance(e, Entry) and len(e.examples["train"]) == 500
    assert any(line.startswith("gradsketch intrinsic-dim --entry my_entry:build") for line in cli_lines())


@pytest.mark.slow
def test_readme_cli_lines_run(tmp_path, monkeypatch):
    from gradsketch.cli import app

    (tmp_path / "my_entry.py").write_text(entry_block())
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    ran = 0
    for line in cli_lines():
        if "data fetch" in line or "rotten-tomatoes" in line:
            continue
        r = CliRunner().invoke(app, shlex.split(line)[1:] + ["--no-progress"])
        assert r.exit_code == 0, (line, r.output)
        ran += 1
    assert ran == 4 and (tmp_path / "runs" / "attr" / "report.html").exists()
    assert (tmp_path / "runs" / "spectrum.html").exists() and (tmp_path / "runs" / "did.png").exists()


@pytest.mark.slow
def test_readme_intrinsic_block_runs(tmp_path, monkeypatch):
    (block,) = [b for b in blocks("python") if "intrinsic_dimension(make_model" in b]
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    res = scope["res"]
    assert res.estimate is not None and (tmp_path / "did.png").exists()
