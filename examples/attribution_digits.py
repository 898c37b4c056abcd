"""Training data attribution on digits: TRAK and Arnoldi influence on AFFD-sketched gradients.

Run: python examples/attribution_digits.py   (about 30 s on 2 CPU cores; no downloads)
"""

import torch

from gradsketch.attribution import Attributor, batches, classification_margin
from gradsketch.eval import (
    flip_labels,
    load_digits_split,
    load_model,
    make_mlp,
    mislabel_detection,
    train_models,
)
from gradsketch.model import Task

data = load_digits_split(n_train=1000, n_test=200, seed=0)
y_noisy, flipped = flip_labels(data.y_train, 0.1, n_classes=10, seed=1)  # plant 10% label noise


def model_fn():
    return make_mlp((64, 32, 10))


model = load_model(model_fn, train_models(model_fn, data.x_train, y_noisy, steps=300, lr=1e-2, weight_decay=1e-3))
task = Task.from_classifier(model)
train = batches(data.x_train, y_noisy, batch_size=250)
test = batches(data.x_test, data.y_test, batch_size=200)

# TRAK: margin gradients, sketched to d = 1024 with AFFD, written to a resumable store on disk
trak = Attributor(task, "trak", sketch=dict(kind="affd", d=1024, seed=0), store="attribution-store/trak",
                  margin_fn=classification_margin()).fit(train)
vals, idx, opp_vals, opp_idx = trak.topk(test, k=5)  # never materialises the 200 × 1000 matrix
print("test 0 (label", int(data.y_test[0]), ") proponents:", idx[0].tolist(), "opponents:", opp_idx[0].tolist())

# Arnoldi influence (Schioppa et al. 2022) on the sketched Hessian; self-influence finds flipped labels
arnoldi = Attributor(task, "arnoldi", sketch=dict(kind="affd", d=1024, seed=0), n_iters=100, top_k=30).fit(train)
res = mislabel_detection(arnoldi.self_influence(), flipped)
print(f"mislabel detection by Arnoldi self-influence: ROC-AUC {res.auc:.3f}, AP {res.ap:.3f}")
with torch.no_grad():
    print("top eigenvalues of the sketched Hessian:", arnoldi.eigenvalues_[:5].tolist())
