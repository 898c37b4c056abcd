"""The layering is a contract the test run checks: import-linter's layers contract (exhaustive: every
subpackage of gradsketch sits in a layer) and no import cycles between sibling modules (pyproject.toml,
[tool.importlinter]); docs/ARCHITECTURE.md describes the layers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter", reason="import-linter is in the 'test' extra")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_kept():
    r = _lint(ROOT, ROOT / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The same contract on a copy of the package with one upward import (sketch -> attribution) fails,
    naming it: the check above can fail."""
    import shutil

    shutil.copytree(ROOT / "src" / "gradsketch", tmp_path / "src" / "gradsketch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    rnd = tmp_path / "src" / "gradsketch" / "sketch" / "_random.py"
    rnd.write_text(rnd.read_text() + "\n\ndef _bad():\n    from ..attribution import Attributor  # noqa\n")
    r = _lint(tmp_path, tmp_path / "src")
    assert r.returncode != 0
    assert "gradsketch.sketch is not allowed to import gradsketch.attribution" in r.stdout
