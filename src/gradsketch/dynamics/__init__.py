"""gradsketch.dynamics: correlation mode decomposition (CMD) of training dynamics (Brokman et al., ICLR 2024).

* :class:`TrajectoryRecorder` / :class:`Trajectory`: weight snapshots on disk (a float32 store, one
  checksummed chunk per snapshot, resumable), read in column blocks.
* :func:`cmd`: post-hoc CMD of a trajectory ``[N, E]`` → :class:`CMDResult` (``.reconstruct(t)``).
* :class:`OnlineCMD`: modes fixed after a warm-up, ``(a, b)`` updated recursively each epoch.
* :class:`EmbeddedCMD`: training in which weights are progressively frozen onto ``a · w_r + b``.
* :func:`cmd_model`, :func:`evaluate_snapshots`, :func:`accuracy`: evaluate CMD weights in model copies.
* :mod:`gradsketch.dynamics.plots`: figures (matplotlib ``Figure`` objects, Agg canvas).

Application layer: imports ``store`` (and torch/numpy/scipy), nothing above it.
"""

from . import plots
from ._layout import Layout, model_with_weights
from .embedded import EmbeddedCMD
from .evaluate import accuracy, cmd_model, evaluate_snapshots
from .online import OnlineCMD
from .posthoc import CONSTANT, KEPT, CMDResult, cmd
from .trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "CMDResult", "CONSTANT", "EmbeddedCMD", "KEPT", "Layout", "OnlineCMD", "Trajectory", "TrajectoryRecorder",
    "accuracy", "cmd", "cmd_model", "evaluate_snapshots", "model_with_weights", "plots",
]
