"""One class per attribution method behind the ``Attributor`` factory, and the method registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gradsketch
from gradsketch.attribution import (
    TRAK,
    ArnoldiInfluence,
    Attributor,
    CommonOptions,
    GradCos,
    GradDot,
    Influence,
    TracIn,
    batches,
    method_class,
    register_method,
    registered_methods,
    unregister_method,
)
from gradsketch.attribution.pipeline import AttributeConfig
from gradsketch.model import Task

CLASSES = {"grad-dot": GradDot, "grad-cos": GradCos, "tracin": TracIn, "trak": TRAK, "arnoldi": ArnoldiInfluence,
           "influence": Influence}


def tiny():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=g)
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    return Task.from_classifier(model), batches(X, y, batch_size=4), (X, y)


def test_factory_returns_the_registered_class():
    task, _, _ = tiny()
    assert registered_methods()[:6] == ("grad-dot", "grad-cos", "tracin", "trak", "arnoldi", "influence")
    for name, cls in CLASSES.items():
        a = Attributor(task, name)
        assert type(a) is cls and isinstance(a, Attributor) and a.method == name
        assert isinstance(a.config_, cls.options_cls) and method_class(name) is cls
        b = cls(task)  # the class itself, no method name
        assert b.method == name and type(b.config_) is type(a.config_)
    assert type(Attributor(task)) is TRAK  # the default method
    assert gradsketch.TRAK is TRAK and gradsketch.Influence is Influence


def test_class_and_factory_give_the_same_scores():
    task, tr, _ = tiny()
    for name in ("grad-cos", "trak", "influence"):
        opts = {"curvature": "ggn"} if name == "influence" else {}
        a = Attributor(task, name, sketch=dict(d=8, kind="dense"), **opts).fit(tr, progress=False)
        b = CLASSES[name](task, sketch=dict(d=8, kind="dense"), **opts).fit(tr, progress=False)
        torch.testing.assert_close(a.score(tr, progress=False), b.score(tr, progress=False), rtol=0, atol=0)


def test_bad_method_names_are_refused():
    task, _, _ = tiny()
    with pytest.raises(ValueError, match=r"method: expected one of \(.*'trak'.*\), got 'ekfac-typo'"):
        Attributor(task, "ekfac-typo")
    with pytest.raises(ValueError, match=r"method: expected \['trak'\] for TRAK \(or None\), got 'arnoldi'"):
        TRAK(task, "arnoldi")
    with pytest.raises(TypeError, match=r"not accepted by method='grad-dot'"):
        GradDot(task, ridge=1.0)


@dataclasses.dataclass
class _ScaledOptions(CommonOptions):
    scale: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.scale > 0:
            raise ValueError(f"scale: expected a number > 0, got {self.scale!r}")


class _ScaledDot(Attributor):
    """score = scale · ⟨g(x), g(z)⟩ through the kernel hook only."""

    options_cls = _ScaledOptions
    method_name = "scaled-dot"

    def finalise(self, comp, data, progress):
        from gradsketch.linalg import IdentityOperator

        comp.kernel = self._opt("scale") * IdentityOperator(comp.sketch.d, dtype=torch.float64)


def test_a_registered_method_plugs_into_the_factory_and_the_pipeline_config():
    task, tr, (X, y) = tiny()
    register_method("scaled-dot", _ScaledDot)
    try:
        with pytest.raises(ValueError, match="name: expected a method name not yet registered, got 'scaled-dot'"):
            register_method("scaled-dot", _ScaledDot)
        a = Attributor(task, "scaled-dot", scale=3.0)
        assert type(a) is _ScaledDot and a.method == "scaled-dot"
        G = task.grads((X, y))
        torch.testing.assert_close(a.fit(tr, progress=False).score(tr, progress=False), 3.0 * G @ G.T,
                                   rtol=1e-12, atol=1e-14)
        with pytest.raises(ValueError, match="scale: expected a number > 0, got -1"):
            Attributor(task, "scaled-dot", scale=-1)
        assert AttributeConfig(method="scaled-dot").method == "scaled-dot"
    finally:
        unregister_method("scaled-dot")
    with pytest.raises(ValueError, match="method: expected one of"):
        Attributor(task, "scaled-dot")
    with pytest.raises(TypeError, match="cls: expected a subclass of gradsketch.attribution.Attributor"):
        register_method("x", object)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options_cls: expected a subclass"):
        register_method("x", _ScaledDot, dict)  # type: ignore[arg-type]
