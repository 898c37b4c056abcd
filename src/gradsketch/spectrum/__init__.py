"""Hessian spectrum analysis: top eigenpairs (exact or sketched), spectral density, trace, checkpoints.

``spectrum(task, data, k, sketch=...)`` -> :class:`SpectrumResult` (with ``outliers``, ``negative_ratio``,
``alignment``); ``density`` (SLQ); ``trace`` (Hutch++/Hutchinson); ``spectrum_over_checkpoints``; plots
and ``write_report`` (re-exported from :mod:`gradsketch.report`); ``run_spectrum`` (the ``gradsketch
spectrum`` pipeline, :mod:`gradsketch.spectrum.pipeline`). Source: Schioppa, NeurIPS 2024 (arXiv 2402.03994), §3 and §5.
"""

import types as _types

from ..report.plots import plot_density, plot_eigenvalues, plot_evolution  # the plots live in gradsketch.report
from ..report.spectrum import write_report
from .checkpoints import SpectrumSeries, spectrum_over_checkpoints
from .core import SpectrumResult, curvature_operator, spectrum
from .density import DensityResult, density, trace
from .local_ensembles import LocalEnsemble, local_ensemble_score

__all__ = [
    "spectrum", "SpectrumResult", "curvature_operator",
    "density", "DensityResult", "trace",
    "LocalEnsemble", "local_ensemble_score",
    "spectrum_over_checkpoints", "SpectrumSeries",
    "plot_eigenvalues", "plot_density", "plot_evolution", "write_report",
]


class _CallableModule(_types.ModuleType):
    """Lets ``gradsketch.spectrum(task, data, ...)`` call :func:`spectrum` while ``gradsketch.spectrum``
    stays the subpackage (so ``gradsketch.spectrum.density`` and ``import gradsketch.spectrum.core`` keep
    working)."""

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return spectrum(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
