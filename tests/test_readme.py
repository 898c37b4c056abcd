"""Every code block in README.md runs as written.

- The Python blocks run in order in one fresh interpreter (one namespace, as a reader pasting them into one
  session would) in an empty directory; a failure names the block's line.
- The command-line blocks: the entry-point file is written out as the README names it and every
  ``gradsketch ...`` line runs (a slow test: it trains and attributes; ``data fetch`` and the Rotten
  Tomatoes line need the package registry and are left out).
- Every other bash line is one of the two set-up commands (``python3 bootstrap.py demo|test|bench``, checked
  for its verb: running them here would build a second environment; the demo runs in test_demo.py and the
  test command is what CI runs).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NETWORK = ("data fetch", "rotten-tomatoes")


def located_blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


def blocks(lang: str) -> list[str]:
    return [code for _, code in located_blocks(lang)]


def entry_block() -> str:
    (block,) = [b for b in blocks("python") if b.startswith("# my_entry.py")]
    return block


def bash_lines() -> list[str]:
    return [ln.split(" #")[0].strip() for b in blocks("bash") for ln in b.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def cli_lines() -> list[str]:
    return [ln for ln in bash_lines() if ln.startswith("gradsketch ")]


def test_readme_bash_lines_are_setup_or_cli_commands():
    setup = [ln for ln in bash_lines() if not ln.startswith("gradsketch ")]
    verbs = set()
    for ln in setup:
        words = shlex.split(ln)
        assert "bootstrap.py" in words, f"README.md: bash line not covered by a test: {ln!r}"
        verbs.add(words[words.index("bootstrap.py") + 1])
    assert verbs <= {"demo", "test", "bench"}, verbs
    assert {"demo", "test"} <= verbs, setup


RUNNER = """
import sys, traceback
blocks = {blocks!r}
ns = {{"__name__": "__main__"}}
for line, code in blocks:
    try:
        exec(compile(code, f"README.md:{{line}}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        sys.exit(f"README.md python block at line {{line}} failed")
    print(f"block at line {{line}}: ok", flush=True)
"""


def test_readme_python_blocks(tmp_path):
    located = located_blocks("python")
    assert located, "README.md has no python blocks"
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run([sys.executable, "-c", RUNNER.format(blocks=located)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{res.stdout}\n--- stderr ---\n{res.stderr[-6000:]}"


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
        if any(n in line for n in NETWORK):
            continue
        args = shlex.split(line)[1:]
        r = CliRunner().invoke(app, args + ([] if args[0] == "store" else ["--no-progress"]))
        assert r.exit_code == 0, (line, r.output)
        ran += 1
    assert ran == 6 and (tmp_path / "runs" / "attr" / "report.html").exists()
    assert (tmp_path / "runs" / "spectrum.html").exists() and (tmp_path / "runs" / "did.png").exists()
