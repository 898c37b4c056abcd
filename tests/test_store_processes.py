"""gradsketch.store across real processes: SIGKILL mid-run then resume; two concurrent writers."""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import gradsketch.store  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gradsketch.store import GradientStore, fill  # noqa: E402

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

WRITER = Path(__file__).with_name("_store_writer.py")
_spec = importlib.util.spec_from_file_location("_store_writer", WRITER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)

N_ROWS, D, CHUNK_ROWS, SEED = 60, 16, 3, 7  # 20 chunks
N_CHUNKS = N_ROWS // CHUNK_ROWS


def start(path, mode, sleep, *extra):
    args = [sys.executable, str(WRITER), str(path), str(N_ROWS), str(D), str(CHUNK_ROWS), str(SEED),
            str(sleep), mode, *map(str, extra)]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)


class Lines:
    """stdout lines of a running writer, read by a thread so that waiting for one can time out."""

    def __init__(self, proc):
        self.proc, self.queue, self.seen = proc, queue.Queue(), []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.queue.put(line.strip())
        self.queue.put(None)

    def next(self, timeout=30):
        try:
            line = self.queue.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            pytest.fail(f"writer produced no output in {timeout} s; lines so far: {self.seen}")
        if line is None:
            self.proc.wait()
            pytest.fail(f"writer exited early (rc={self.proc.returncode}): {self.proc.stderr.read()}")
        self.seen.append(line)
        return line

    def rest(self):
        """All remaining lines, once the writer has exited."""
        self.proc.wait(timeout=30)
        out = []
        while (line := self.queue.get(timeout=30)) is not None:
            out.append(line)
        return out


def reference_store(tmp_path):
    """An uninterrupted, in-process run with the same rows, spec, fingerprint and chunking."""
    rows = writer.reference_rows(SEED, N_ROWS, D)
    ref = GradientStore.create_or_open(tmp_path / "ref", N_ROWS, D, dict(writer.SPEC, d=D), f"fp-{SEED}",
                                       chunk_rows=CHUNK_ROWS)
    fill(ref, lambda a, b: rows[a:b], progress=False)
    return ref


def assert_same_store(path, ref):
    s = GradientStore.open(path)
    assert s.is_complete and s.verify() == list(range(N_CHUNKS))
    np.testing.assert_array_equal(s.array(), ref.array())
    assert s.array().tobytes() == ref.array().tobytes()
    assert s.chunk_checksums() == ref.chunk_checksums()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest == json.loads((ref.path / "manifest.json").read_text())


def test_sigkill_at_random_points_then_resume(tmp_path):
    """SIGKILL the writer at seeded points, resume each time; the result equals an uninterrupted run.

    Five kills land exactly inside a chosen window of write_chunk (the writer runs in "step" mode
    and blocks there until told to go on): while computing, with half of the chunk's bytes written,
    and after the data fsync but before the marker. One more kill lands after a seeded random delay
    in a free-running ("loop") writer.
    """
    rng = random.Random(1234)
    path = tmp_path / "store"
    rows = writer.reference_rows(SEED, N_ROWS, D).astype(np.float16)
    done_per_run: list[list[int]] = []
    fully_written = set()  # chunks whose bytes all reached the file in an earlier, killed run
    windows = ["compute", "data", "marker", "data", "marker"]
    rng.shuffle(windows)
    for window in windows:
        n_first = rng.randint(0, 2)  # chunks this run completes before the kill
        proc = start(path, "step", 0)
        lines = Lines(proc)
        assert lines.next() == "open"
        done = []
        while True:
            line = lines.next()
            if line.startswith("done "):
                done.append(int(line.split()[1]))
                continue
            _, phase, i = line.split()
            if len(done) == n_first and phase == window:
                break
            proc.stdin.write("go\n")
            proc.stdin.flush()
        proc.send_signal(signal.SIGKILL)  # the writer is blocked inside `window` of chunk i
        assert lines.rest() == [] and proc.returncode == -signal.SIGKILL
        i = int(i)
        done_per_run.append(done)

        s = GradientStore.open(path)
        before = set().union(*map(set, done_per_run[:-1]))
        assert set(s.completed_chunks()) == before | set(done)  # exactly what was reported done
        assert i in s.missing_chunks()  # the chunk being written when killed is not recorded
        assert s.verify() == s.completed_chunks()  # every recorded chunk has intact bytes
        r0, r1 = s.chunk_range(i)
        on_disk = s.array((r0, r1), allow_incomplete=True).ravel()
        expected = rows[r0:r1].ravel()
        half = expected.size // 2
        if window == "data":  # a torn chunk: the first half of its bytes written, the rest not
            np.testing.assert_array_equal(on_disk[:half], expected[:half])
            if i not in fully_written:
                assert not on_disk[half:].any()
        elif window == "marker":  # all bytes durable, but no marker: it will be written again
            np.testing.assert_array_equal(on_disk, expected)
            fully_written.add(i)

    # one kill at a seeded random time in a free-running writer
    proc = start(path, "loop", 0.02)
    lines = Lines(proc)
    assert lines.next() == "open"
    time.sleep(rng.uniform(0.0, 0.1))
    proc.send_signal(signal.SIGKILL)
    out = lines.rest()
    assert proc.returncode == -signal.SIGKILL
    done_per_run.append([int(line.split()[1]) for line in out if line.startswith("done ")])
    s = GradientStore.open(path)
    assert set(done_per_run[-1]) <= set(s.completed_chunks()) and not s.is_complete
    assert s.verify() == s.completed_chunks()

    proc = start(path, "loop", 0.0)  # resume and finish, uninterrupted
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    done_per_run.append([int(line.split()[1]) for line in out.splitlines() if line.startswith("done ")])

    # each chunk was completed by exactly one run: nothing lost, nothing written twice
    all_done = [i for run in done_per_run for i in run]
    assert sorted(all_done) == list(range(N_CHUNKS)), done_per_run
    assert_same_store(path, reference_store(tmp_path))


def test_two_processes_fill_disjoint_ranges_concurrently(tmp_path):
    path = tmp_path / "store"  # does not exist yet: both processes race to create it
    procs = [start(path, "fill", 0.02, rank, 2) for rank in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(out)
    written = []
    for rank, out in enumerate(outs):
        lines = out.strip().splitlines()
        assert lines[0] == "open" and lines[1].startswith("wrote")
        chunks = [int(x) for x in lines[1].split()[1:]]
        assert chunks == list(range(rank * N_CHUNKS // 2, (rank + 1) * N_CHUNKS // 2))
        written += chunks
    assert sorted(written) == list(range(N_CHUNKS))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the losing creator cleaned up
    assert_same_store(path, reference_store(tmp_path))
