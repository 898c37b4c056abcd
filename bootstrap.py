#!/usr/bin/env python3
"""Set up and run gradsketch with nothing but Python: `python3 bootstrap.py demo|test|bench [args...]`.

Creates ./.venv on first use (and again whenever pyproject.toml or this file changes), installs torch and
gradsketch with its test extras from the package registry, then runs the demo, the default test suite
(slow tests excluded) or the quick sketch benchmark. Extra arguments are passed through.
Environment: GRADSKETCH_VENV (default .venv), GRADSKETCH_TORCH (default torch==2.13.0, the CPU build
used on the project machines; any torch >= 2.3 works).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GRADSKETCH_VENV", ROOT / ".venv"))
TORCH = os.environ.get("GRADSKETCH_TORCH", "torch==2.13.0")
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")


def _stamp() -> str:
    h = hashlib.sha256()
    for f in ("pyproject.toml", "bootstrap.py"):
        h.update((ROOT / f).read_bytes())
    h.update(TORCH.encode())
    return h.hexdigest()


def _run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def ensure_env() -> None:
    stamp_file = VENV / ".gradsketch-installed"
    if stamp_file.exists() and stamp_file.read_text() == _stamp() and PY.exists():
        return
    if not PY.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if _run([*pip, TORCH]) or _run([*pip, "-e", f"{ROOT}[test,dev]"]):
        sys.exit("bootstrap: installing the dependencies failed (see the pip output above)")
    stamp_file.write_text(_stamp())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "bench"):
        print(__doc__)
        return 2
    ensure_env()
    what, rest = argv[0], argv[1:]
    if what == "demo":
        return _run([str(BIN / "gradsketch"), "demo", *(rest or ["--out", "gradsketch-out"])])
    if what == "bench":
        return _run([str(BIN / "gradsketch"), "bench", "sketches", *(rest or ["--quick"])])
    return _run([str(PY), "-m", "pytest", "-q", "-m", "not slow", *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
