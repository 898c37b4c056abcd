"""torch.distributed building blocks (issue 15): sharded curvature, the all-reduced operator, the top-k merge
and the cross-rank consistency check, run in two gloo processes and compared with one process (float64)."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _helpers import spawn_ranks
from torch import nn

import gradsketch
from gradsketch import Task
from gradsketch.curvature import BatchShard, sharded
from gradsketch.linalg import MatrixOperator, lanczos
from gradsketch.linalg.distributed import AllReduceOperator, check_same, merge_topk, shard_range, shard_weight

D64 = torch.float64
WORLD = 2


def make_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, dtype=D64), nn.Tanh(), nn.Linear(5, 3, dtype=D64))
    return Task.from_classifier(model)


def make_data(n_batches=5, sizes=(7, 6, 7, 5, 4)):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(s, 4, generator=g, dtype=D64), torch.randint(0, 3, (s,), generator=g))
            for s in sizes[:n_batches]]


def scores():
    g = torch.Generator().manual_seed(3)
    S = torch.randn(4, 23, generator=g, dtype=D64)
    S[2, 5] = S[2, 17] = S[2].max() + 1.0  # a tie across the two shards: the smaller index wins
    return S


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    task, data = make_task(), make_data()
    out = {}
    for kind in ("hessian", "ggn"):
        op = sharded(kind, task, data, damping=0.01)
        out[kind] = op.to_dense()
    res = lanczos(sharded("hessian", task, data), k=3, which="LA", seed=0)
    out["eig"] = res.eigenvalues
    # the public API does the distributed thing by itself under a process group
    out["spectrum"] = gradsketch.spectrum(task, data, k=4, which="BE", progress=False).eigenvalues
    out["trace"] = torch.tensor(gradsketch.trace(task, data, n_matvecs=12, seed=0, progress=False).estimate, dtype=D64)
    S = scores()
    lo, hi = shard_range(S.shape[1], rank, WORLD)
    v, i = torch.topk(S[:, lo:hi], k=min(6, hi - lo), dim=1)
    out["top_v"], out["top_i"] = merge_topk(v, i + lo, k=6)
    out["tree"] = merge_topk(v, i + lo, k=6, method="tree")
    v, i = torch.topk(S[:, lo:hi], k=hi - lo, dim=1, largest=False)  # every candidate: k above the rank's list
    out["gather_all"], out["tree_all"] = (merge_topk(v, i + lo, k=30, largest=False, method=m)
                                          for m in ("gather", "tree"))
    try:
        check_same(1234 + rank, "seed")
        out["check"] = "no error"
    except ValueError as e:
        out["check"] = str(e)
    try:
        sharded("hessian", task, data[:4] if rank else data)
        out["len_check"] = "no error"
    except ValueError as e:
        out["len_check"] = str(e)
    # intrinsic dimension, data parallel: each rank its shard of every batch, the ω gradient all-reduced
    out["omega"], out["hist"], out["seen"] = subspace_run()
    out["intrinsic"] = intrinsic_run().table
    try:
        subspace_run(steps=6 + rank)
        out["train_check"] = "no error"
    except ValueError as e:
        out["train_check"] = str(e)
    torch.save(out, f"{out_dir}/{rank}.pt")
    dist.barrier()  # no rank tears the group down while another is still inside a collective
    dist.destroy_process_group()


def intrinsic_data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 4, generator=g, dtype=D64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def intrinsic_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, dtype=D64), nn.Tanh(), nn.Linear(8, 3, dtype=D64))


def subspace_run(steps=6):
    from gradsketch.intrinsic import SubspaceModel
    from gradsketch.intrinsic.train import default_loss, train

    seen = []

    def loss_fn(model, batch):  # records how many examples this process trained on per step
        seen.append(batch[0].shape[0])
        return default_loss(model, batch)

    x, y = intrinsic_data()
    sm = SubspaceModel(intrinsic_model(), 8, kind="sjlt", seed=0, said=True)
    hist = train(sm, (x, y), steps=steps, lr=0.05, batch_size=15, seed=0, progress=False, loss_fn=loss_fn)
    losses = torch.tensor([r["loss"] for r in hist.records[1:]])
    return torch.cat([sm.omega.detach(), sm.said_lambda.detach()]), losses, seen


def intrinsic_run():
    from gradsketch.intrinsic import intrinsic_dimension

    x, y = intrinsic_data()
    return intrinsic_dimension(intrinsic_model, (x, y), (x, y), d_max=16, d_start=2, kind="sjlt", method="grid",
                               steps=8, eval_every=4, lr=0.05, full_lr=0.05, batch_size=15, progress=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD)


def test_sharded_curvature_equals_one_process(two_ranks):
    task, data = make_task(), make_data()
    for kind in ("hessian", "ggn"):
        ref = sharded(kind, task, data, damping=0.01).to_dense()  # no process group here: the plain operator
        for out in two_ranks:
            assert torch.allclose(out[kind], ref, atol=1e-12, rtol=0)
        assert torch.equal(two_ranks[0][kind], two_ranks[1][kind])  # every rank receives the same product
    ref = torch.linalg.eigvalsh(sharded("hessian", task, data).to_dense()).flip(0)[:3]
    for out in two_ranks:
        assert torch.allclose(out["eig"], ref, atol=1e-9, rtol=0)
    assert torch.equal(two_ranks[0]["eig"], two_ranks[1]["eig"])
    one = gradsketch.spectrum(task, data, k=4, which="BE", progress=False).eigenvalues
    tr = gradsketch.trace(task, data, n_matvecs=12, seed=0, progress=False).estimate
    for out in two_ranks:
        assert torch.allclose(out["spectrum"], one, atol=1e-9, rtol=0)
        assert float(out["trace"]) == pytest.approx(tr, rel=1e-10, abs=1e-12)


def test_intrinsic_dimension_data_parallel_equals_one_process(two_ranks):
    omega, hist, seen = subspace_run()
    table = intrinsic_run().table
    # the data were split: batches of 15 as shards of 8 and 7 (one process: 15 per step)
    assert seen == [15] * 6 and [out["seen"] for out in two_ranks] == [[8] * 6, [7] * 6]
    assert omega.abs().min() > 0  # the run moved every coordinate of ω (and λ)
    for out in two_ranks:
        assert torch.allclose(out["omega"], omega, rtol=1e-10, atol=1e-13)
        assert torch.allclose(out["hist"], hist, rtol=1e-10, atol=0)
        assert [r["d"] for r in out["intrinsic"]] == [r["d"] for r in table]
        for a, b in zip(out["intrinsic"], table):
            assert a["metric"] == pytest.approx(b["metric"], abs=1e-12) and a["reached"] == b["reached"]
    assert torch.equal(two_ranks[0]["omega"], two_ranks[1]["omega"])
    checks = [out["train_check"] for out in two_ranks]
    assert checks[0] == checks[1] and checks[0].startswith("train (steps, eval_every, lr, batches per epoch, seed): "
                                                           "expected the same value on every rank, got rank 0: (6,")


def test_topk_merge_equals_topk_of_the_whole_matrix(two_ranks):
    S = scores()
    v, i = torch.topk(S, k=6, dim=1)
    i[2, :2] = torch.tensor([5, 17])  # the tie, resolved towards the smaller index
    for out in two_ranks:
        assert torch.equal(out["top_v"], v) and torch.equal(out["top_i"], i)
        assert torch.equal(out["tree"][0], v) and torch.equal(out["tree"][1], i)  # the pairwise (tree) merge
        sv, si = torch.sort(S, dim=1, stable=True)
        for got in (out["gather_all"], out["tree_all"]):  # k = 30 > 23 candidates: all 23, ascending
            assert torch.equal(got[0], sv) and torch.equal(got[1], si)


def test_mismatched_ranks_fail_on_every_rank_with_one_message(two_ranks):
    msgs = [out["check"] for out in two_ranks]
    assert msgs[0] == msgs[1] == "seed: expected the same value on every rank, got rank 0: 1234, rank 1: 1235"
    lens = [out["len_check"] for out in two_ranks]
    assert lens[0] == lens[1] and lens[0].startswith("data (number of batches): expected the same value")


# Attributor under a process group ---------------------------------------------------------------------
ATT = dict(sketch={"kind": "sjlt", "d": 16, "seed": 0}, chunk_rows=8, block_rows=8)


def make_attributor(store):
    return gradsketch.Attributor(make_task(), "trak", store=store, **ATT)


def train_data():
    return make_data(6, sizes=(8, 8, 8, 8, 8, 7))


def _attr_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=300))
    att = make_attributor(f"{out_dir}/store")
    shares, scored, traced = [], [0], [0]
    featurise, score_block, trace = att._featurise, att._score_block, att._output_gradient_and_trace

    def spy_trace(batch):  # the ggn_trace weights' pass (the default kernel here): this rank's batches only
        traced[0] += 1
        return trace(batch)

    att._output_gradient_and_trace = spy_trace

    def spy_featurise(*args, **kw):  # which share of the store this rank was asked to compute
        shares.append((kw.get("rank"), kw.get("world_size")))
        return featurise(*args, **kw)

    def spy_score(psis, blocks):  # how many training columns this rank scored
        out = score_block(psis, blocks)
        scored[0] += out.shape[1]
        return out

    att._featurise, att._score_block = spy_featurise, spy_score
    att.fit(train_data(), progress=False)
    top = att.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    flat = att.topk(make_data(2, sizes=(5, 4)), k=4, progress=False, index="faiss")  # per-rank flat indexes
    # Arnoldi influence: the curvature products are sharded over the ranks (every rank the same eigenpairs)
    arn = gradsketch.Attributor(make_task(), "arnoldi", top_k=5, block_size=4).fit(train_data(), progress=False)
    arn_top = arn.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    errors = []
    for bad, data in (({**ATT, "sketch": {"kind": "sjlt", "d": 16, "seed": rank}}, train_data()),
                      (ATT, train_data()[:5] if rank else train_data())):
        try:
            gradsketch.Attributor(make_task(), "trak", store=f"{out_dir}/bad", **bad).fit(data, progress=False)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    torch.save({"top": tuple(top), "flat": tuple(flat), "self": att.self_influence(progress=False), "shares": shares,
                "scored": scored[0], "errors": errors, "traced": traced[0], "kernel": att.kernel_,
                "arn_eig": arn.eigenvalues_, "arn_top": tuple(arn_top)},
               f"{out_dir}/att{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_attributor_fit_topk_self_influence_under_two_ranks(tmp_path):
    mp.spawn(_attr_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"att{r}.pt", weights_only=True) for r in range(WORLD)]
    one = make_attributor(tmp_path / "one").fit(train_data(), progress=False)
    top = one.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    si = one.self_influence(progress=False)
    arn = gradsketch.Attributor(make_task(), "arnoldi", top_k=5, block_size=4).fit(train_data(), progress=False)
    arn_top = arn.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    for out in outs:
        assert torch.allclose(out["arn_eig"], arn.eigenvalues_, rtol=1e-6, atol=1e-9)
        assert torch.equal(out["arn_top"][1], arn_top[1])  # the same proponents
    assert torch.equal(outs[0]["arn_eig"], outs[1]["arn_eig"])
    # mismatched settings: the same one-line error on both ranks, before any work
    assert outs[0]["errors"] == outs[1]["errors"]
    assert outs[0]["errors"][0].startswith("sketch: expected the same value on every rank, got rank 0: ")
    assert outs[0]["errors"][1] == ("train_data (its length): expected the same value on every rank, got "
                                    "rank 0: 6, rank 1: 5")
    # the work was split: each rank featurised its share and scored only its blocks (47 rows, blocks of 8)
    assert [out["shares"][0] for out in outs] == [(0, 2), (1, 2)]
    assert sorted(out["scored"] for out in outs) == [23, 24]
    # the default kernel's per-example weights: each rank computed 3 of the 6 batches, and got all of them
    assert [out["kernel"] for out in outs] == ["ggn_trace", "ggn_trace"] == [one.kernel_] * 2
    assert [out["traced"] for out in outs] == [3, 3]
    for out in outs:
        for a, b in zip(out["top"], top):
            assert torch.equal(a, b)
        assert torch.equal(out["flat"][1], top[1]) and torch.equal(out["flat"][3], top[3])  # FAISS, merged
        assert torch.allclose(out["flat"][0], top[0], rtol=1e-5)
        assert torch.equal(out["self"], si)
    # the store the two ranks wrote together holds the bytes one process writes
    two_rows = sorted((tmp_path / "store").rglob("*.npy"))
    one_rows = sorted((tmp_path / "one").rglob("*.npy"))
    assert [p.name for p in two_rows] == [p.name for p in one_rows] and two_rows
    for a, b in zip(two_rows, one_rows):
        assert a.read_bytes() == b.read_bytes()


# one-process checks -----------------------------------------------------------------------------------
def test_shard_range_covers_every_example_once():
    for n in (0, 1, 5, 17, 64):
        for world in (1, 2, 3, 7):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
            if n:
                assert sum(shard_weight(n, r, world) for r in range(world)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[0, 2\), got 2"):
        shard_range(5, 2, 2)


def test_merge_topk_one_process_and_bad_input():
    S = scores()
    v, i = merge_topk(S, torch.arange(23).expand(4, 23), k=5, largest=False)
    ref_v, _ = torch.topk(S, k=5, dim=1, largest=False)
    assert torch.equal(v, ref_v) and torch.equal(S.gather(1, i), v)
    with pytest.raises(ValueError, match="values, indices: expected two"):
        merge_topk(S, torch.arange(23), k=2)
    with pytest.raises(ValueError, match="k: expected"):
        merge_topk(S, torch.arange(23).expand(4, 23), k=0)


def test_all_reduce_operator_without_group_and_batch_shard():
    A = MatrixOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D64))
    op = AllReduceOperator(A, 0.25)
    x = torch.tensor([1.0, -1.0], dtype=D64)
    assert torch.equal(op @ x, 0.25 * (A @ x)) and torch.equal(op.T @ x, 0.25 * (A @ x))
    with pytest.raises(ValueError, match="weight: expected a finite number, got nan"):
        AllReduceOperator(A, float("nan"))
    with pytest.raises(TypeError, match="local: expected a LinearOperator"):
        AllReduceOperator(torch.eye(2), 1.0)
    assert list(BatchShard(iter_like([1, 2, 3, 4]), 1, 3)) == [2, 3]


class iter_like:
    """A sized re-iterable that is not a list (a DataLoader stand-in)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


# the command line under torchrun --------------------------------------------------------------------
ENTRY = '''
import torch
import gradsketch
from torch import nn


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    g = torch.Generator().manual_seed(1)
    batch = lambda n: (torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    train = [batch(8) for _ in range(6)]
    test = [batch(5)]
    return gradsketch.Entry(model, "cross_entropy", train, test)
'''


def test_cli_attribute_under_torchrun_equals_one_process(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    (tmp_path / "tiny_entry.py").write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    args = ["attribute", "tiny_entry:build", "--method", "trak", "--kind", "sjlt", "--sketch-dim", "16", "--k", "3",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "gradsketch", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "gradsketch", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = np.load(tmp_path / "one" / "attribution.npz"), np.load(tmp_path / "two" / "attribution.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert np.array_equal(a[name], b[name]), name
    assert '"world_size": 2' in (tmp_path / "two" / "summary.json").read_text()


def test_rank_killed_mid_share_is_restarted_by_torchrun_and_the_store_ends_identical(tmp_path):
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--max-restarts", "1", os.path.join(here, "_dist_kill_child.py"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert out["restarts"] == 1  # the first attempt died (rank 1 killed itself) and torchrun restarted it
    one = make_attributor(tmp_path / "one").fit(train_data(), progress=False)
    top = one.topk(make_data(2, sizes=(5, 4)), k=4, progress=False)
    for a, b in zip(out["top"], top):
        assert torch.equal(a, b)
    two_rows = sorted((tmp_path / "store").rglob("*.npy"))
    one_rows = sorted((tmp_path / "one").rglob("*.npy"))
    assert [p.name for p in two_rows] == [p.name for p in one_rows] and two_rows
    for a, b in zip(two_rows, one_rows):
        assert a.read_bytes() == b.read_bytes()


def _cache_worker(rank, init_file, out_dir):
    import gradsketch.store.cache as cache

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    make_attributor(f"{out_dir}/store").fit(train_data(), progress=False)   # writes the ggn_trace weights' cache
    traced = [0]
    att = make_attributor(f"{out_dir}/store")
    trace = att._output_gradient_and_trace

    def spy_trace(batch):
        traced[0] += 1
        return trace(batch)

    att._output_gradient_and_trace = spy_trace
    if rank == 1:   # this rank does not see the cached weights (as if another job wrote them after it looked)
        cache.load_cached = lambda path, key: (False, None)
    att.fit(train_data(), progress=False)
    torch.save({"traced": traced[0], "self": att.self_influence(progress=False)}, f"{out_dir}/cache{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ranks_that_disagree_on_a_cached_value_all_recompute_it(tmp_path):
    """The sharded pass behind a cached value is collective: when one rank misses the cache, every rank computes
    (each its share of the batches), instead of the others returning early and leaving it waiting."""
    mp.spawn(_cache_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"cache{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [out["traced"] for out in outs] == [3, 3]
    assert torch.equal(outs[0]["self"], outs[1]["self"])
