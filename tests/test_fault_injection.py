"""The fault-injection benchmark's quick run as a (slow) test: nothing silently wrong, every corruption detected
and named, every kill survived byte-identically, every recoverable damage recovered. A representative subset
of these cases runs in the default suite (tests/test_store_trust.py, tests/test_attribution_trust.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fault_injection_quick_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fault_injection.py"), "--quick", "--seed", "1",
                          "--parts", "kills,corruptions,concurrent,bad"], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    raw = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("Raw: `"))[6:-1])
    k = raw["kills"]
    assert k["kills"] > 0 and k["survived"] == k["byte_identical"] == k["kills"]
    c = raw["corruptions"]
    assert c["detected"] == c["named"] == c["tried"] and c["silently_wrong_fits"] == 0
    assert c["recovered"] == c["recoverable"] and c["chunk_level_only_damaged"] == c["chunk_level"]
    assert raw["concurrent"]["byte_identical"] == raw["concurrent"]["rounds"]
    b = raw["bad_inputs"]
    assert b["silently_wrong"] == 0 and b["clear_error"] == b["tried"]
