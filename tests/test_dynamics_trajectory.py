"""Trajectory recorder: on-disk layout, resume after a SIGKILL, streaming CMD equals in-memory CMD."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from gradsketch.dynamics import Layout, Trajectory, TrajectoryRecorder, cmd, evaluate_snapshots

CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    from torch import nn
    from gradsketch.dynamics import TrajectoryRecorder
    path, die_after = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = TrajectoryRecorder(path, net, n_snapshots=8, every=3, unit="step", verify=True)
    for step in range(24):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        rec.on_step(net, step)
        if step == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
    print(len(rec.completed()))
""")


def _run(path, die_after):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(die_after)], env=env,
                          capture_output=True, text=True, timeout=120)


def _digest(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isdir(p):
            for sub in sorted(os.listdir(p)):
                h.update(sub.encode())
                with open(os.path.join(p, sub), "rb") as f:
                    h.update(f.read())
        else:
            h.update(name.encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_resume_after_kill_gives_identical_files(tmp_path):
    full = _run(tmp_path / "full", -1)
    assert full.returncode == 0, full.stderr
    assert full.stdout.strip() == "8"
    killed = _run(tmp_path / "resumed", 10)          # dies after the 4th snapshot (steps 2, 5, 8 -> 3 + ...)
    assert killed.returncode == -9
    partial = Trajectory.open(tmp_path / "resumed")
    assert partial.n_snapshots == 3 and partial.capacity == 8
    again = _run(tmp_path / "resumed", -1)             # replays the run; completed snapshots are verified
    assert again.returncode == 0, again.stderr
    assert _digest(tmp_path / "full") == _digest(tmp_path / "resumed")
    tr = Trajectory.open(tmp_path / "resumed")
    assert tr.n_snapshots == 8 and tr.every == 3 and tr.unit == "step"
    assert [e.kind for e in tr.layout.entries].count("buffer") == 2


def test_recorder_reads_and_streaming_cmd(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    lay = Layout.from_model(net)
    rec = TrajectoryRecorder(tmp_path / "t", net, n_snapshots=10)
    x, y = torch.randn(50, 7), torch.randint(0, 4, (50,))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    snaps = []
    for epoch in range(10):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert rec.on_epoch_end(net, epoch)
        snaps.append(lay.flatten(net).numpy())
    assert not rec.record(net, 9)  # already complete: skipped
    with pytest.raises(ValueError, match="call on_epoch_end"):
        rec.on_step(net, 0)
    rec.close()
    X = np.stack(snaps, axis=1)
    tr = Trajectory.open(tmp_path / "t")
    assert tr.shape == X.shape
    np.testing.assert_array_equal(tr.snapshot(-1), X[:, -1])
    np.testing.assert_array_equal(tr.columns([40, 3, 17]), X[[40, 3, 17]].astype(np.float64))
    got = np.concatenate([blk for _, _, blk in tr.blocks(13)])
    np.testing.assert_array_equal(got, X.astype(np.float64))
    a = cmd(tr, n_modes=4, n_samples=60, block=13)            # streamed from disk in blocks of 13 weights
    b = cmd(X, n_modes=4, n_samples=60, layout=lay)            # in memory
    for field in ("modes", "a", "b", "ref_index", "sample_index"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.layer_error == pytest.approx(b.layer_error, rel=1e-9)
    assert list(a.layer_error) == [e.name for e in lay.entries]
    with torch.no_grad():
        recorded = evaluate_snapshots(net, tr, lambda m: float(nn.functional.cross_entropy(m(x), y)))
        assert recorded[-1] == pytest.approx(float(nn.functional.cross_entropy(net(x), y)), rel=1e-6)


def test_recorder_subset_and_errors(tmp_path):
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    rec = TrajectoryRecorder(tmp_path / "s", net, n_snapshots=3, params=["1.weight"])
    assert rec.layout.n == 6
    with pytest.raises(ValueError, match="unknown parameter"):
        TrajectoryRecorder(tmp_path / "u", net, n_snapshots=3, params=["nope"])
    with pytest.raises(ValueError, match="n_snapshots"):
        TrajectoryRecorder(tmp_path / "v", net, n_snapshots=0)
    with pytest.raises(ValueError):  # same path, different layout
        TrajectoryRecorder(tmp_path / "s", net, n_snapshots=3)
    with torch.no_grad():
        net[1].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        rec.record(net, 0)
    tr = Trajectory.open(tmp_path / "s")
    assert tr.n_snapshots == 0
    with pytest.raises(ValueError, match="at least 3 snapshots"):
        cmd(tr, n_modes=1)
