"""Token-level cross-entropy: the margin form (softplus of minus the margin, session 9) against the
log-softmax form it replaced, on logits [B, T, V] the size of a language model's output.

For each shape and form a fresh subprocess (1 thread) allocates float32 logits (a leaf that requires grad),
runs forward + backward of ``cross_entropy_per_example(..., mask=...)`` once and reports the rise of its peak
resident set (``ru_maxrss``) over the level just before, i.e. what the loss's forward and backward add on
top of the logits (the logits' gradient included, the same in both forms), then the process-CPU time of
further forward + backward passes. The two forms alternate, several rounds; ratios new/old of the medians.
glibc returns these large blocks to the system on free (mmap), so the resident set follows the live tensors.

Then the accuracy part: max relative error (row 2-norm) of the float32 gradient against the exact
softmax(z) − e_y computed in float64 from the same float32 logits, over confident tokens (1 − p_y < 1e-6)
and over the others, for both forms. Last, the process-CPU time of per-example gradients w.r.t. the logits by
``vmap(grad)`` (the path of Task.grads), both forms, in this process. And end to end: a tiny GPT-2 trained to
memorise its data (tokens with 1 − p_y ~ 1e-4), its float32 per-example parameter gradients with either form
against float64 (``--lm-steps``, about a minute). Finally [B, C] classifier logits (no mask), where the margin
form has been used since session 8: CPU time and float32 gradient error of F.cross_entropy, session 8's form
(torch.logsumexp over a masked copy) and the library's.

    nice -n 15 python benchmarks/bench_ce_tokens.py [--rounds 3] [--reps 3] [--lm-steps 2000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {"minilm": (8, 128, 30522), "gpt2": (4, 256, 50257)}


def _old_form(logits, targets, mask):
    """The replaced token path (session 8): −log_softmax gathered at the target, mean over valid tokens."""
    import torch

    valid = mask != 0
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    tok = -torch.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    tok = torch.where(valid, tok, torch.zeros((), dtype=tok.dtype))
    return tok.sum(1) / valid.sum(1).clamp_min(1).to(tok.dtype)


def _new_form(logits, targets, mask):
    import gradsketch

    return gradsketch.losses.cross_entropy_per_example(logits, targets, mask=mask, reduction="mean")


FORMS = {"old": _old_form, "new": _new_form}


def _inputs(shape, seed=0):
    import torch

    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).mul_(2).requires_grad_(True)   # in place: no second buffer
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[: B // 2, T - T // 8:] = 0   # right padding on half the rows
    return logits, targets, mask


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(form: str, shape: tuple[int, int, int], reps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    fn = FORMS[form]
    small = _inputs((2, 4, 64))   # load kernels and the library on a tiny case first
    fn(*small).sum().backward()
    logits, targets, mask = _inputs(shape)
    base = _maxrss_bytes()
    fn(logits, targets, mask).sum().backward()
    peak = _maxrss_bytes()
    times = []
    for _ in range(reps):
        logits.grad = None
        t0 = time.process_time()
        fn(logits, targets, mask).sum().backward()
        times.append(time.process_time() - t0)
    return {"form": form, "shape": list(shape), "logits_bytes": logits.numel() * 4, "rise_bytes": peak - base,
            "cpu_s": times}


def accuracy(shape=(2, 64, 30522), seed=1) -> dict:
    """Max relative float32 gradient error of both forms vs float64, confident tokens and the rest."""
    import torch
    torch.set_num_threads(1)
    B, T, V = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    # the target's logit lifted above the rest by a spread of amounts: 1 − p_y from ~1e-1 down to ~1e-12
    lift = torch.linspace(0.0, 40.0, B * T)[torch.randperm(B * T, generator=g)].reshape(B, T)
    z.scatter_(-1, y[..., None], (z.max(-1).values + lift - 10.0)[..., None])
    mask = torch.ones(B, T, dtype=torch.long)
    zd = z.double()
    p = torch.softmax(zd, -1)
    one_m_py = torch.logsumexp(zd.scatter(-1, y[..., None], float("-inf")), -1).sub(
        zd.gather(-1, y[..., None])[..., 0]).sigmoid()   # 1 − p_y without cancellation
    # exact gradient of the per-example mean over T valid tokens: p off the target, −(1 − p_y) at it (not
    # p_y − 1 in float64, whose rounding, 1e-16, is not small next to 1 − p_y ≈ 1e-12)
    ref = p.scatter(-1, y[..., None], -one_m_py[..., None]) / T
    out = {"shape": list(shape)}
    conf = one_m_py < 1e-6
    out["tokens_confident"] = int(conf.sum())
    out["tokens_other"] = int((~conf).sum())
    for name, fn in FORMS.items():
        zg = z.clone().requires_grad_(True)
        got = torch.autograd.grad(fn(zg, y, mask).sum(), zg)[0].double()
        rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
        out[name] = {"max_rel_confident": float(rel[conf].max()), "max_rel_other": float(rel[~conf].max()),
                     "median_rel_confident": float(rel[conf].median())}
    return out


def per_example_vmap(shape=(8, 128, 30522), reps=3) -> dict:
    """Process-CPU time of per-example gradients w.r.t. the logits by ``vmap(grad)`` (the path Task.grads
    takes, each example a batch of one), old and new form alternating; medians and their ratio."""
    import torch
    from torch.func import grad, vmap

    torch.set_num_threads(1)
    logits, targets, mask = _inputs(shape)
    z = logits.detach()
    times: dict = {f: [] for f in FORMS}
    for _ in range(reps):
        for name, fn in FORMS.items():
            def one(zi, ti, mi, fn=fn):
                return fn(zi[None], ti[None], mi[None]).sum()
            t0 = time.process_time()
            vmap(grad(one))(z, targets, mask)
            times[name].append(time.process_time() - t0)
    out = {f: statistics.median(t) for f, t in times.items()}
    out["time_ratio"] = out["new"] / out["old"]
    out["shape"] = list(shape)
    return out


def tiny_gpt2(steps: int = 2000, V: int = 1000, seed: int = 0) -> dict:
    """End to end: a 2-layer GPT-2 from config (vocabulary V) trained in float32 to memorise 16 sequences of 32
    tokens (a third right-padded by 6), then its exact per-example parameter gradients (Task.grads, vmap) in
    float32 with the margin form and with the log-softmax form, each against float64 gradients of the same
    weights; relative error of each example's gradient row."""
    import copy

    import torch
    import transformers

    from gradsketch import Task
    from gradsketch.model.losses import _causal_lm_forward, causal_lm_loss

    def log_softmax_loss(model, batch):
        ids, mask, logits = _causal_lm_forward(model, batch)
        valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        return _old_form(logits[:, :-1], ids[:, 1:], valid.long())

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=V, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (16, 32), generator=g)
    mask = torch.ones(16, 32, dtype=torch.long)
    mask[::3, -6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = causal_lm_loss()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, batch).mean()
        loss.backward()
        opt.step()
    out: dict = {"steps": steps, "V": V, "final_loss": float(loss.detach())}
    with torch.no_grad():
        lp = torch.log_softmax(model(**batch).logits.double()[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        valid = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        one_minus = -torch.expm1(lp)[valid]
    out["tokens"] = int(valid.sum())
    out["median_1_minus_p"] = float(one_minus.median())
    out["min_1_minus_p"] = float(one_minus.min())
    ref = Task(copy.deepcopy(model).double(), causal_lm_loss()).grads(batch)
    for name, fn in (("new", causal_lm_loss()), ("old", log_softmax_loss)):
        rel = (Task(model, fn).grads(batch).double() - ref).norm(dim=1) / ref.norm(dim=1)
        out[name] = {"max_rel": float(rel.max()), "median_rel": float(rel.median())}
    return out


def _session8_form(logits, targets):
    """The [B, C] margin form as session 8 wrote it: torch.logsumexp over a masked copy, F.softplus (threshold 20)."""
    import torch
    import torch.nn.functional as F

    hit = torch.arange(logits.shape[1]) == targets[:, None]
    others = logits.masked_fill(hit, torch.finfo(logits.dtype).min)
    return F.softplus(torch.logsumexp(others, 1) - logits.gather(1, targets[:, None])[:, 0])


def classifier_heads(shapes=((4096, 10), (512, 1000)), reps=5) -> dict:
    """[B, C] logits (no mask): process-CPU time of forward + backward and of per-example vmap(grad), for
    F.cross_entropy (log-softmax), session 8's margin form and the library's (copy-free) form; plus the max
    relative float32 gradient error of each on rows with 1 − p_y from 0.5 down to 1e-12."""
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    import gradsketch

    torch.set_num_threads(1)
    forms = {"log_softmax": lambda z, y: F.cross_entropy(z, y, reduction="none"), "session8": _session8_form,
             "library": gradsketch.losses.cross_entropy_per_example}
    out: dict = {}
    for B, C in shapes:
        g = torch.Generator().manual_seed(0)
        z = torch.randn(B, C, generator=g) * 2
        y = torch.randint(0, C, (B,), generator=g)
        lift = torch.linspace(0.0, 40.0, B)[torch.randperm(B, generator=g)]
        z.scatter_(1, y[:, None], (z.max(1).values + lift - 10.0)[:, None])
        zd = z.double()
        one_minus = (torch.logsumexp(zd.scatter(1, y[:, None], float("-inf")), 1) - zd.gather(1, y[:, None])[:, 0]
                     ).sigmoid()
        ref = torch.softmax(zd, 1).scatter(1, y[:, None], -one_minus[:, None])
        row: dict = {}
        times: dict = {f: {"fwd_bwd": [], "vmap": []} for f in forms}
        for _ in range(reps):
            for name, fn in forms.items():
                zg = z.clone().requires_grad_(True)
                t0 = time.process_time()
                fn(zg, y).sum().backward()
                times[name]["fwd_bwd"].append(time.process_time() - t0)
                t0 = time.process_time()
                vmap(grad(lambda zi, yi, fn=fn: fn(zi[None], yi[None]).sum()))(z, y)
                times[name]["vmap"].append(time.process_time() - t0)
        for name, fn in forms.items():
            zg = z.clone().requires_grad_(True)
            got = torch.autograd.grad(fn(zg, y).sum(), zg)[0].double()
            rel = (got - ref).norm(dim=1) / ref.norm(dim=1)
            row[name] = {k: statistics.median(v) for k, v in times[name].items()}
            row[name]["max_rel_grad_err"] = float(rel.max())
        for k in ("fwd_bwd", "vmap"):
            row[f"library/session8 {k}"] = row["library"][k] / row["session8"][k]
            row[f"library/log_softmax {k}"] = row["library"][k] / row["log_softmax"][k]
        out[f"{B}x{C}"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="minilm,gpt2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--lm-steps", type=int, default=2000, help="training steps of the tiny GPT-2 (0: skip it)")
    ap.add_argument("--child", nargs=3, metavar=("FORM", "SHAPE", "REPS"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], SHAPES[a.child[1]], int(a.child[2]))))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    res: dict = {"load_start": os.getloadavg()[0], "runs": []}
    for shape in a.shapes.split(","):
        for r in range(a.rounds):
            for form in (("old", "new") if r % 2 == 0 else ("new", "old")):
                cp = subprocess.run([sys.executable, __file__, "--child", form, shape, str(a.reps)], env=env,
                                    capture_output=True, text=True, check=True)
                row = json.loads(cp.stdout.strip().splitlines()[-1])
                row["name"] = shape
                res["runs"].append(row)
                print(f"{shape} round {r} {form}: rise {row['rise_bytes'] / row['logits_bytes']:.2f}x logits, "
                      f"cpu {min(row['cpu_s']):.3f}s", flush=True)
    res["summary"] = {}
    for shape in a.shapes.split(","):
        rows = {f: [x for x in res["runs"] if x["name"] == shape and x["form"] == f] for f in FORMS}
        s = {}
        for f, xs in rows.items():
            s[f] = {"rise_logits": statistics.median(x["rise_bytes"] / x["logits_bytes"] for x in xs),
                    "rise_MB": statistics.median(x["rise_bytes"] for x in xs) / 2**20,
                    "cpu_s": statistics.median(t for x in xs for t in x["cpu_s"])}
        s["memory_ratio"] = s["new"]["rise_MB"] / s["old"]["rise_MB"]
        s["time_ratio"] = s["new"]["cpu_s"] / s["old"]["cpu_s"]
        res["summary"][shape] = s
        print(shape, json.dumps(s), flush=True)
    res["accuracy"] = accuracy()
    print(json.dumps(res["accuracy"]), flush=True)
    res["vmap"] = per_example_vmap()
    print("vmap(grad) per example:", json.dumps(res["vmap"]), flush=True)
    res["classifier_heads"] = classifier_heads()
    print("[B, C] heads:", json.dumps(res["classifier_heads"]), flush=True)
    if a.lm_steps > 0:
        res["tiny_gpt2"] = tiny_gpt2(a.lm_steps)
        print("tiny GPT-2 per-example gradients:", json.dumps(res["tiny_gpt2"]), flush=True)
    res["load_end"] = os.getloadavg()[0]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
