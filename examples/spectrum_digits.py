"""Hessian spectrum of a digits MLP: exact top-10, a sketched (AFFD) estimate, the SLQ density, the
outlier / negative-ratio / alignment diagnostics, a checkpoint series and an HTML report.

Run: python examples/spectrum_digits.py [out_dir]   (CPU, ~1 minute)
"""

from __future__ import annotations

import os
import sys

import torch

from gradsketch import Task
from gradsketch.datasets import trained_digits_mlp
from gradsketch.spectrum import density, spectrum, spectrum_over_checkpoints, write_report


def main(out: str = "spectrum_digits_out") -> None:
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, data, states, _ = trained_digits_mlp(hidden=(64, 64), n_train=512, n_test=0, epochs=5)
    task = Task.from_classifier(model)
    print(task)
    exact = spectrum(task, data, k=10, which="BE", n_iter=120)
    print("exact (both ends):", exact)
    print(f"outliers (λ/λ1 > 0.2): {len(exact.outliers(0.2))}, negative ratio: {exact.negative_ratio:.3f}")
    top = spectrum(task, data, k=10)
    sk = spectrum(task, data, k=10, sketch=task.block_sketch(1024, "affd", seed=0))
    rel = ((sk.eigenvalues - top.eigenvalues).abs() / top.eigenvalues.abs()).max()
    print(f"AFFD d=1024: max relative error of the top-10 eigenvalues {float(rel):.3%}")
    g = task.grads(data[0]).mean(0)
    print(f"alignment of the mean gradient with the top-10 eigenspace: exact {top.alignment(g):.3f}, "
          f"sketched {sk.alignment(g):.3f}")
    dens = density(task, data, n_probes=8, n_steps=60)
    series = spectrum_over_checkpoints(task, states, data, k=5, labels=[f"epoch {i + 1}" for i in range(len(states))],
                                       plot=os.path.join(out, "evolution.png"))
    top.save(os.path.join(out, "top10.json"))
    path = write_report(os.path.join(out, "report.html"), spectrum=[top, sk], density=dens, series=series, grads=g,
                        notes=[f"both-ends run: negative ratio {exact.negative_ratio:.3f}"])
    print("report:", path)


if __name__ == "__main__":
    main(*sys.argv[1:2])
