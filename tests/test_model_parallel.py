"""Model parallelism (issue 15): a GPT-2 (random weights from a config, float64) sharded by FSDP2's
``fully_shard`` over two gloo processes gives the sketched per-example gradients, and the attribution top-k,
of the unsharded model; a DDP-wrapped model gives the unwrapped model's gradients."""

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from _helpers import single_thread, spawn_ranks
from torch import nn

import gradsketch
from gradsketch import Task

transformers = pytest.importorskip("transformers")
WORLD = 2
KINDS = ("sjlt", "affd")


def build_gpt2():
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def lm_loss(model, batch):
    """Mean next-token cross-entropy of each sequence, ``[B]``."""
    ids = batch[0]
    logits = model(input_ids=ids).logits[:, :-1]
    per_token = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none")
    return per_token.view(ids.shape[0], -1).mean(1)


def tokens(n_batches=2, size=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 101, (size, 8), generator=g),) for _ in range(n_batches)]


def attributor(task):
    # the model-parallel path is the explicit one (mode="auto" picks it for the sharded model; the unsharded
    # reference must use the same block sketch)
    return gradsketch.Attributor(task, "trak", sketch={"kind": "sjlt", "d": 32, "seed": 0}, mode="explicit")


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5, dtype=torch.float64), nn.Tanh(), nn.Linear(5, 3, dtype=torch.float64))


def _worker(rank, init_file, out_dir):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradsketch.gradients.model_parallel import shard_rows

    out = {}
    model = build_gpt2()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    task = Task(model, lm_loss)
    out["local_numel"] = sum(p.to_local().numel() for _, p in task.named_params)
    out["rows"] = shard_rows(task)
    for kind in KINDS:
        out[kind] = task.sketch_grads(tokens(), task.block_sketch(32, kind=kind, seed=0), progress=False)
    att = attributor(task).fit(tokens(), progress=False)
    out["topk"] = tuple(att.topk(tokens(1, 2, seed=5), k=3, progress=False))
    errors = []  # mismatched ranks: one message on both, never a hang
    for sketch, data in ((task.block_sketch(32, kind="sjlt", seed=rank), tokens()),
                         (task.block_sketch(32, kind="sjlt", seed=0), tokens(1) if rank else tokens()),
                         (task.block_sketch(32, kind="sjlt", seed=0), tokens(size=3 - rank))):
        try:
            task.sketch_grads(data, sketch, progress=False)
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    try:
        task.hessian(tokens())
        out["curvature"] = "no error"
    except ValueError as e:
        out["curvature"] = str(e)
    # DDP: the task unwraps .module; the gradients are those of the module
    from torch.nn.parallel import DistributedDataParallel

    ddp_task = Task.from_classifier(DistributedDataParallel(small_mlp()))
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    out["ddp_names"], out["ddp_grads"] = ddp_task.param_names, ddp_task.grads(batch)
    torch.save(out, f"{out_dir}/{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def one_thread():
    """The references run on one thread (two OpenMP threads on a loaded 2-core machine spin-wait ~50x)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("mp"), WORLD)


def test_fsdp2_sketched_rows_equal_the_unsharded_ones(two_ranks):
    task = Task(build_gpt2(), lm_loss)
    # the work was really split: each rank held about half of every parameter, and the shards tile them
    assert sum(out["local_numel"] for out in two_ranks) == task.n_params
    for name, shape in zip(task.param_names, task.param_shapes):
        (a0, b0), (a1, b1) = two_ranks[0]["rows"][name], two_ranks[1]["rows"][name]
        assert (a0, b1) == (0, shape[0]) and b0 == a1 and 0 < b0 < shape[0]
    for kind in KINDS:
        ref = task.sketch_grads(tokens(), task.block_sketch(32, kind=kind, seed=0), progress=False)
        for out in two_ranks:
            assert out[kind].shape == ref.shape == (6, 32)
            assert torch.allclose(out[kind], ref, rtol=0, atol=1e-12 * float(ref.abs().max())), kind


def test_fsdp2_attribution_topk_equals_unsharded(two_ranks):
    task = Task(build_gpt2(), lm_loss)
    ref = attributor(task).fit(tokens(), progress=False).topk(tokens(1, 2, seed=5), k=3, progress=False)
    for out in two_ranks:
        assert torch.equal(out["topk"][1], ref[1]) and torch.equal(out["topk"][3], ref[3])
        assert torch.allclose(out["topk"][0], ref[0], rtol=1e-9, atol=0)


def test_fsdp2_mismatched_ranks_fail_together(two_ranks):
    errs = [out["errors"] for out in two_ranks]
    assert errs[0] == errs[1]
    assert errs[0][0].startswith("sketch: expected the same value on every rank, got rank 0: {")
    assert errs[0][1] == "data (its number of batches): expected the same value on every rank, got rank 0: 2, rank 1: 1"
    assert errs[0][2] == ("data: a model sharded by FSDP2 needs the same batch on every rank, got batches of 2 to 3 "
                          "examples across the ranks")


def test_fsdp2_curvature_is_refused_with_a_message(two_ranks):
    for out in two_ranks:
        assert out["curvature"].startswith("task: curvature products of a model sharded by FSDP2")


def test_ddp_wrapped_model_gives_the_module_gradients(two_ranks):
    task = Task.from_classifier(small_mlp())
    g = torch.Generator().manual_seed(2)
    batch = (torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    ref = task.grads(batch)
    for out in two_ranks:
        assert out["ddp_names"] == task.param_names  # no "module." prefix
        assert torch.allclose(out["ddp_grads"], ref, rtol=0, atol=1e-14)
