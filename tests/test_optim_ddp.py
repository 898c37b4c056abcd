"""Two gloo processes with DistributedDataParallel: Shampoo and Sketchy keep identical parameters on both
ranks, equal to one process on the same global batch; Frequent Directions merges across ranks."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsketch.linalg.frequent_directions import FrequentDirections
from gradsketch.optim import Shampoo, Sketchy

D64 = torch.float64
KW = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.01, update_freq=2, block_size=6)
WORLD, STEPS, BATCH = 2, 6, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 9, dtype=D64), nn.Tanh(), nn.Linear(9, 3, dtype=D64))


def make_opts(model_a, model_b):
    return Shampoo(model_a.parameters(), **KW), Sketchy(model_b.parameters(), rank=3, **KW)


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 7, generator=g, dtype=D64), torch.randn(BATCH, 3, generator=g, dtype=D64))
            for _ in range(STEPS)]


def stream():
    g = torch.Generator().manual_seed(2)
    return torch.randn(200, 10, generator=g, dtype=D64) * torch.logspace(0, -2, 10, dtype=D64)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    a, b = make_model(), make_model()
    da, db = DDP(a), DDP(b)
    oa, ob = make_opts(da.module, db.module)
    per = BATCH // WORLD
    for X, y in data():
        Xl, yl = X[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        for model, opt in ((da, oa), (db, ob)):
            opt.zero_grad()
            ((model(Xl) - yl) ** 2).mean().backward()  # DDP averages the gradients over ranks
            opt.step()
    A = stream()
    fd = FrequentDirections(4, 10).update(A[rank * 100:(rank + 1) * 100]).all_merge()
    torch.save({"shampoo": [p.detach() for p in a.parameters()], "sketchy": [p.detach() for p in b.parameters()],
                "fd": fd.sketch, "rho": fd.escaped_mass, "n": fd.n_seen}, f"{out_dir}/{rank}.pt")
    dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))
    a, b = make_model(), make_model()
    oa, ob = make_opts(a, b)
    for X, y in data():
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            ((model(X) - y) ** 2).mean().backward()
            opt.step()
    init = [p.detach() for p in make_model().parameters()]
    for key, single in (("shampoo", a), ("sketchy", b)):
        for p0, p1, ps, pi in zip(r0[key], r1[key], single.parameters(), init):
            assert torch.equal(p0, p1)  # identical across ranks
            assert torch.allclose(p0, ps.detach(), atol=1e-10, rtol=0)  # = one process, same global batch
            assert not torch.allclose(p0, pi)  # and training moved it
    # FD merged across ranks: identical on both, and the guarantee holds for the union of the streams
    assert torch.equal(r0["fd"], r1["fd"]) and r0["rho"] == r1["rho"] and r0["n"] == 200
    A = stream()
    B = r0["fd"]
    w = torch.linalg.eigvalsh(A.T @ A - B.T @ B)
    s2 = torch.linalg.svdvals(A) ** 2
    assert float(w.min()) > -1e-9 and float(w.max()) <= r0["rho"] + 1e-9
    assert r0["rho"] <= min(float(s2[k:].sum()) / (4 - k) for k in range(4)) + 1e-9
