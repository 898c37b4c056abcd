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
    with pytest.raises(ValueError, match=r"^rng: expected 2 or 3 .*got 1"):
        gradsketch.sketch("ffd", 1000, 64, rng=1)


def test_a_spec_written_before_the_scheme_was_recorded_differs_from_any_rebuilt_spec():
    old = {"kind": "ffd", "n": 1000, "d": 64, "seed": 3, "preconditioner": "hadamard", "max_factor": 1024}
    assert gradsketch.sketch(**old).spec != old  # a store's identity check compares specs: the old store is refused


def test_ffd_rng3_chunked_chi_same_structure_different_draws_and_exact_rebuild():
    """rng=3 draws S's χ values per chunk of blocks (chunk-sized temporaries); B, G and the permutations are
    those of rng=2, S has the same per-block scale law (S·‖G_i‖ = χ_L draws: mean of S²·‖G_i‖² ≈ L), the spec
    records 3 and rebuilds exactly, and the two schemes are different sketches."""
    n, d = 5 * 4096 + 100, 64  # L = 64, nb = 322 blocks; CHI_CHUNK / L = 16384 blocks per chunk -> one chunk
    a = gradsketch.sketch("ffd", n, d, seed=4)
    b = gradsketch.sketch("ffd", n, d, seed=4, rng=3)
    assert b.spec["rng"] == 3 and a.spec != b.spec
    for k in ("B", "G", "perm"):
        assert torch.equal(a._bufs[k], b._bufs[k])
    assert not torch.equal(a._bufs["S"], b._bufs["S"])
    chi2 = (b._bufs["S"].double() * b._bufs["G"].double().norm(dim=1, keepdim=True)) ** 2  # χ²_64 draws
    assert abs(float(chi2.mean()) - 64) < 6 * (128 / chi2.numel()) ** 0.5  # 6 sd of the mean
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gradsketch.sketch(**b.spec)(x), b(x))


def test_ffd_rng3_chunks_use_their_own_generators(monkeypatch):
    """With several chunks, chunk c's χ values come from generator (seed, "ffd-chi", c): S equals the
    definition evaluated by hand, chunk by chunk (chunks of 16, 16 and 8 blocks)."""
    from gradsketch.sketch._random import chi, generator
    from gradsketch.sketch.kinds import FFDSketch

    n, d, L = 64 * 40, 64, 64
    monkeypatch.setattr(FFDSketch, "CHI_CHUNK", 64 * 16)
    S = gradsketch.sketch("ffd", n, d, seed=2, rng=3)
    gnorm = S._bufs["G"].norm(dim=1, keepdim=True)
    want = torch.cat([chi(L, (b - a, L), generator(2, "ffd-chi", c)).to(torch.float32) / gnorm[a:b]
                      for c, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)])])
    assert torch.equal(S._bufs["S"], want)
    whole = torch.cat([chi(L, (40, L), generator(2, "ffd-chi", 0)).to(torch.float32) / gnorm])
    assert not torch.equal(S._bufs["S"], whole)


def _gamma_reference(alpha, shape, gen):
    """The sampler as written before it was evaluated in place (2026-12-05): the rng-2 draws must not change."""
    a = alpha if alpha >= 1 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():
        m = todo.numel()
        x = torch.randn(m, generator=gen, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        u = torch.rand(m, generator=gen, dtype=torch.float64)
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    if alpha < 1:
        out *= torch.rand(n, generator=gen, dtype=torch.float64) ** (1.0 / alpha)
    return out.reshape(shape)


@pytest.mark.parametrize("alpha,shape", [(0.3, (5000,)), (1.0, (40, 50)), (2.5, (3000,)), (8192.0, (7, 4096))])
def test_gamma_in_place_equals_the_former_sampler_bit_for_bit(alpha, shape):
    """gamma() computes in place now (half the float64 temporaries while building a large ffd); its draws are
    the former ones bit for bit, rejection rounds included (α = 0.3 and 1 reject a few percent), and the
    generator ends in the same state."""
    from gradsketch.sketch._random import gamma

    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    new, old = gamma(alpha, shape, g1), _gamma_reference(alpha, shape, g2)
    assert new.shape == old.shape and torch.equal(new, old)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_ffd_rng2_state_unchanged_by_the_in_place_sampler():
    """The rng-2 S of a sketch equals χ computed with the former sampler: existing ffd specs rebuild the same map."""
    from gradsketch.sketch._random import generator

    S = gradsketch.sketch("ffd", 3000, 64, seed=5)
    want = (2.0 * _gamma_reference(32.0, (S.nb, 64), generator(5, "ffd-chi"))).sqrt().to(torch.float32)
    assert torch.equal(S._bufs["S"], want / S._bufs["G"].norm(dim=1, keepdim=True))
