"""FFD's random state is drawn from torch generators since 2026-12-04 (it used numpy's χ before). The draw
scheme is part of the spec, so a store or checkpoint made with the old scheme is refused as a different
sketch instead of being silently rebuilt with other numbers."""

import pytest
import torch

import gradsketch


def test_ffd_spec_names_its_draw_scheme_and_rebuilds_exactly():
    S = gradsketch.sketch("ffd", 1000, 64, seed=3)
    assert S.spec["rng"] == 2
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gradsketch.sketch(**S.spec)(x), S(x))
    assert torch.equal(gradsketch.sketch_from_spec(S.spec)(x), S(x))


def test_ffd_old_draw_scheme_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^rng: expected 2 .*got 1"):
        gradsketch.sketch("ffd", 1000, 64, rng=1)


def test_a_spec_written_before_the_scheme_was_recorded_differs_from_any_rebuilt_spec():
    old = {"kind": "ffd", "n": 1000, "d": 64, "seed": 3, "preconditioner": "hadamard", "max_factor": 1024}
    assert gradsketch.sketch(**old).spec != old  # a store's identity check compares specs: the old store is refused
