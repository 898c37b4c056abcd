"""Train mode, buffers and padding: BatchNorm with batch statistics is refused by every per-example path
before any forward pass (buffers untouched); eval-mode BatchNorm, InstanceNorm and dropout work; curvature
operators with BatchNorm in train mode leave the buffers alone; left and right padding of a causal LM change
neither the loss nor the gradient of a sequence (float64)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from _helpers import digits, gpt2, loop_grads
from torch import nn
from torch.func import functional_call

from gradsketch.model import Task, causal_lm_loss, causal_lm_per_example, classifier_loss

TOL = 1e-10
TOL_PAD = 1e-12


# -- models -------------------------------------------------------------------------------------------
def bn1d(track: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12, track_running_stats=track), nn.Tanh(),
                         nn.Linear(12, 10)).double()


def bn2d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).double()


def randomise_running_stats(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial running estimates (and a count), so that eval mode differs from the initial state."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64) * 0.3)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
            mod.num_batches_tracked.fill_(7)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"changed: {changed}"


def flat_blocks(task: Task, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[B, N]`` gradients -> ``name -> [B, n_i]``, the blocks a Block/FactoredSketch maps."""
    return dict(zip(task.param_names, torch.split(G, task.param_sizes, dim=1)))


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda mod, inp: calls.__setitem__(0, calls[0] + 1))
    return calls


# (model builder, train mode, data, expected module name and type in the message, expected advice)
CASES = {
    "bn1d_train": (lambda: bn1d().train(), lambda: digits(6), r"module '1' \(BatchNorm1d\) is in train mode",
                   r"model\.eval\(\)"),
    "bn2d_train": (lambda: bn2d().train(), lambda: digits(6, image=True),
                   r"module '1' \(BatchNorm2d\) is in train mode", r"model\.eval\(\)"),
    "untracked_eval": (lambda: bn1d(track=False).eval(), lambda: digits(6),
                       r"module '1' \(BatchNorm1d\) has track_running_stats=False", r"eval mode too"),
    "untracked_train": (lambda: bn1d(track=False).train(), lambda: digits(6),
                        r"module '1' \(BatchNorm1d\) has track_running_stats=False",
                        r"model\.eval\(\) does not change that"),
}


def _calls(task: Task, batch, kind: str):
    if kind == "grads":
        return lambda: task.grads(batch)
    if kind == "per_example_grads":
        return lambda: task.per_example_grads(batch)
    if kind == "factored":
        sk = task.factored_sketch(64, seed=0)
        return lambda: task.sketch_grads([batch], sk, mode="factored", progress=False)
    if kind == "iter":
        sk = task.block_sketch(64, seed=0)
        return lambda: next(iter(task.iter_sketch_grads([batch], sk, mode="explicit", progress=False)))
    sk = task.block_sketch(64, seed=0)
    return lambda: task.sketch_grads([batch], sk, mode=kind, progress=False)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["grads", "per_example_grads", "explicit", "implicit", "factored", "iter"])
@pytest.mark.parametrize("per_example", ["auto", "loop"])
def test_batch_statistics_refused_before_any_forward(case, kind, per_example):
    build, data, what, advice = CASES[case]
    model = build()
    randomise_running_stats(model)
    batch = data()
    task = Task(model, classifier_loss(), per_example=per_example)
    before = snapshot(model)
    calls = count_forwards(model)
    call = _calls(task, batch, kind)
    with pytest.raises(ValueError, match="per-example gradients are not defined") as err:
        call()
    msg = str(err.value)
    assert calls[0] == 0  # no forward pass ran
    assert re.search(what, msg) and re.search(advice, msg)
    assert "depends on the other examples" in msg and "GroupNorm or LayerNorm" in msg
    assert_same_state(model, before)
    assert not task.validated


def test_refusal_vmap_mode_sync_and_lazy_batchnorm_and_several_layers():
    X, y = digits(4)
    model = bn1d().train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\)"):
        Task(model, classifier_loss(), per_example="vmap").grads((X, y))
    sync = nn.Sequential(nn.Linear(64, 6), nn.SyncBatchNorm(6), nn.Linear(6, 10)).double().train()
    with pytest.raises(ValueError, match=r"'1' \(SyncBatchNorm\) is in train mode"):
        Task(sync, classifier_loss()).grads((X, y))
    torch.manual_seed(0)
    lazy = nn.Sequential(nn.Linear(64, 6), nn.LazyBatchNorm1d(), nn.Linear(6, 10)).double().train()
    with pytest.raises(ValueError, match=r"'1' \(LazyBatchNorm1d\) is in train mode"):
        Task(lazy, classifier_loss(), params=["0.*", "2.*"]).grads((X, y))
    two = nn.Sequential(nn.Linear(64, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.BatchNorm1d(6),
                        nn.Linear(6, 10)).double().train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\).*and 1 more such layer\(s\): '3' \(BatchNorm1d\)"):
        Task(two, classifier_loss()).grads((X, y))
    # the model itself a BatchNorm
    bare = nn.BatchNorm1d(64).double().train()
    task = Task(bare, lambda m, b: m(b).sum(1))
    with pytest.raises(ValueError, match=r"the model itself \(BatchNorm1d\)"):
        task.grads(X)


def test_switch_to_train_mode_between_batches_is_refused():
    X, y = digits(8)
    model = bn1d().eval()
    randomise_running_stats(model)
    task = Task(model, classifier_loss())
    for mode in ("explicit", "implicit", "factored"):
        sk = task.factored_sketch(64) if mode == "factored" else task.block_sketch(64)
        it = task.iter_sketch_grads([(X[:4], y[:4]), (X[4:], y[4:])], sk, mode=mode, progress=False)
        next(it)
        model.train()
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in train mode"):
            next(it)
        assert_same_state(model, before)
        model.eval()


@pytest.mark.parametrize("which", ["bn1d", "bn2d"])
def test_eval_mode_batchnorm_matches_single_example_backward(which):
    model = (bn1d() if which == "bn1d" else bn2d()).eval()
    randomise_running_stats(model)
    X, y = digits(10, image=which == "bn2d")
    before = snapshot(model)
    task = Task(model, classifier_loss())
    G = task.grads((X, y))
    ref = loop_grads(model, lambda i: F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), 10)
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)
    torch.testing.assert_close(Task(model, classifier_loss(), per_example="loop").grads((X, y)), ref,
                               atol=TOL, rtol=0)
    # every sketch mode: rows are the sketch of the exact gradients
    sk = task.block_sketch(48, seed=3)
    for mode in ("explicit", "implicit"):
        torch.testing.assert_close(task.sketch_grads([(X[:6], y[:6]), (X[6:], y[6:])], sk, mode=mode,
                                                     progress=False), sk(flat_blocks(task, ref)), atol=TOL, rtol=0)
    fs = task.factored_sketch(48, seed=3)
    torch.testing.assert_close(task.sketch_grads([(X, y)], fs, mode="factored", progress=False),
                               fs(list(flat_blocks(task, ref).values())), atol=TOL, rtol=0)
    assert_same_state(model, before)


def test_instancenorm_and_dropout_in_train_mode_are_allowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).double().train()
    X, y = digits(6, image=True)
    task = Task(model, classifier_loss())
    G = task.grads((X, y))
    ref = loop_grads(model, lambda i: F.cross_entropy(model(X[i:i + 1]), y[i:i + 1]), 6)
    torch.testing.assert_close(G, ref, atol=TOL, rtol=0)
    # an InstanceNorm that tracks running statistics: instance statistics in train mode, per-example
    # gradients defined; the task leaves its running estimates alone (vmap traces it: no in-place update)
    torch.manual_seed(0)
    tracked = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.InstanceNorm2d(3, affine=True,
                            track_running_stats=True), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 8 * 8, 10)
                            ).double().train()
    before = snapshot(tracked)
    t2 = Task(tracked, classifier_loss(), per_example="vmap")
    G2 = t2.grads((X, y))
    assert_same_state(tracked, before)
    twin = copy.deepcopy(tracked)
    ref2 = loop_grads(twin, lambda i: F.cross_entropy(twin(X[i:i + 1]), y[i:i + 1]), 6)
    torch.testing.assert_close(G2, ref2, atol=TOL, rtol=0)
    # dropout in train mode: still per-example (independent masks), sketch modes run
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10)).double().train()
    Xd, yd = digits(4)
    Xs, ys = Xd[:1].repeat(4, 1), yd[:1].repeat(4)
    td = Task(drop, classifier_loss())
    Gd = td.grads((Xs, ys))
    assert not torch.allclose(Gd[0], Gd[1])
    assert td.sketch_grads([(Xs, ys)], td.block_sketch(32), progress=False).shape == (4, 32)


# -- curvature with BatchNorm in train mode: the mean loss over the batch, buffers untouched ------------
def _flat_model_fn(model: nn.Module, task: Task, fn):
    names = task.param_names

    def f(theta: torch.Tensor):
        p = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(theta, task.param_sizes),
                                                           task.param_shapes))))
        return fn(functional_call(model, p, (X_CURV,)))

    return f


X_CURV, Y_CURV = digits(8)


def test_curvature_with_batchnorm_in_train_mode_leaves_buffers_unchanged():
    model = bn1d(seed=2).train()
    randomise_running_stats(model)
    before = snapshot(model)
    task = Task.from_classifier(model)
    theta = task.flatten(task.params_dict())
    twin = copy.deepcopy(model)  # the reference's forward passes update the twin's buffers, not the model's
    mean_loss = _flat_model_fn(twin, task, lambda z: F.cross_entropy(z, Y_CURV))
    H = torch.autograd.functional.hessian(mean_loss, theta)
    outs = _flat_model_fn(twin, task, lambda z: z)
    J = torch.autograd.functional.jacobian(outs, theta)                       # [B, C, N]
    z = outs(theta).detach()
    p = torch.softmax(z, 1)
    HL = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]                 # [B, C, C]
    GGN = torch.einsum("bcn,bcd,bdm->nm", J, HL, J) / len(z)
    Jl = torch.autograd.functional.jacobian(
        _flat_model_fn(twin, task, lambda z: F.cross_entropy(z, Y_CURV, reduction="none")), theta)  # [B, N]
    Fisher = Jl.T @ Jl / len(z)
    V = torch.randn(task.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    data = [(X_CURV, Y_CURV)]
    ops = [(task.hessian(data, method=m), H) for m in ("double_backward", "fwd_rev", "fwd_ad")]
    ops += [(task.ggn(data), GGN), (task.fisher(data), Fisher)]
    for op, ref in ops:
        torch.testing.assert_close(op @ V, ref @ V, atol=TOL, rtol=0)
        torch.testing.assert_close(op @ V[:, 0], ref @ V[:, 0], atol=TOL, rtol=0)
        assert_same_state(model, before)
    # per-example losses in train mode: the batch's statistics, no update of the running estimates
    torch.testing.assert_close(task.loss((X_CURV, Y_CURV)),
                               F.cross_entropy(copy.deepcopy(model)(X_CURV), Y_CURV, reduction="none"),
                               atol=TOL, rtol=0)
    assert_same_state(model, before)
    assert model[1].training and model[1].track_running_stats and model[1].running_mean is not None


# -- causal LM padding ----------------------------------------------------------------------------------
class BigramLM(nn.Module):
    """logits[b, t] = W E[x_{b,t}] + c: each position sees only its own token (no position ids)."""

    def __init__(self, vocab: int = 11, dim: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


def _padded(seqs: list[list[int]], T: int, left: list[bool], pad: int = 0):
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, (s, lf) in enumerate(zip(seqs, left)):
        sl = slice(T - len(s), T) if lf else slice(0, len(s))
        ids[r, sl] = torch.tensor(s)
        mask[r, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


SEQS = [[3, 7, 1, 9, 4, 2, 8, 5], [6, 2, 9, 3, 3], [10, 4, 7, 1, 6, 2], [5, 8]]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_left_and_right_padding_change_neither_loss_nor_gradient(reduction):
    torch.manual_seed(0)
    model = BigramLM().double()
    task = Task(model, causal_lm_loss(reduction=reduction))
    batch = _padded(SEQS, 8, left=[False, True, False, True])   # rows 1, 3 left-padded; row 2 right-padded
    G, L = task.grads(batch), task.loss(batch)
    for r, s in enumerate(SEQS):
        alone = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        torch.testing.assert_close(L[r], task.loss(alone)[0], atol=TOL_PAD, rtol=0)
        torch.testing.assert_close(G[r], task.grads(alone)[0], atol=TOL_PAD, rtol=0)
        # by hand: the len(s) - 1 next-token terms of the sequence itself
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor(s)), -1)
        terms = torch.stack([-lp[t, s[t + 1]] for t in range(len(s) - 1)])
        want = terms.sum() if reduction == "sum" else terms.mean()
        torch.testing.assert_close(L[r], want, atol=TOL_PAD, rtol=0)
    # the other per-example paths agree on the padded batch
    sk = task.block_sketch(16, seed=1)
    torch.testing.assert_close(task.sketch_grads([batch], sk, progress=False), sk(flat_blocks(task, G)),
                               atol=TOL_PAD, rtol=0)
    fs = task.factored_sketch(16, seed=1)
    torch.testing.assert_close(task.sketch_grads([batch], fs, mode="factored", progress=False),
                               fs(list(flat_blocks(task, G).values())), atol=TOL_PAD, rtol=0)


def test_causal_lm_per_example_masks_predicting_position_and_target():
    logits = torch.randn(3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 0, 0], [0, 6, -100, 2, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    lp = -torch.log_softmax(logits, -1)
    # counted pairs (t -> t+1): both real, target not ignore_index
    want = torch.stack([lp[0, 2, 4] + lp[0, 3, 5], lp[1, 0, 2] + lp[1, 1, 3], lp[2, 2, 2]])
    torch.testing.assert_close(causal_lm_per_example(logits, ids, mask, reduction="sum"), want,
                               atol=TOL_PAD, rtol=0)
    torch.testing.assert_close(causal_lm_per_example(logits, ids, mask.bool(), reduction="mean"),
                               want / torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64), atol=TOL_PAD, rtol=0)
    # an infinite logit at a padding position stays out of the loss
    bad = logits.clone()
    bad[0, 0] = float("-inf")
    torch.testing.assert_close(causal_lm_per_example(bad, ids, mask, reduction="sum"), want, atol=TOL_PAD, rtol=0)
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(3, 5\)"):
        causal_lm_per_example(logits, ids, mask[:, :4])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpt2_left_padding_with_position_ids_changes_nothing(reduction):
    model = gpt2()
    seqs = [[5, 17, 42, 8, 99, 23, 4, 61], [12, 7, 33, 80, 2], [45, 9, 71, 3, 38, 26]]
    batch = _padded(seqs, 8, left=[False, True, False])
    m = batch["attention_mask"]
    batch["position_ids"] = (m.cumsum(1) - 1).clamp_min(0)
    task = Task(model, causal_lm_loss(reduction=reduction))
    G, L = task.grads(batch), task.loss(batch)
    for r, s in enumerate(seqs):
        alone = {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        torch.testing.assert_close(L[r], task.loss(alone)[0], atol=TOL_PAD, rtol=0)
        torch.testing.assert_close(G[r], task.grads(alone)[0], atol=TOL_PAD, rtol=0)
