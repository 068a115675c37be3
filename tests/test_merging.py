"""Merge operators on factors and dense updates: algebra (property-based), seeding, DARE, SVD."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safemerge.common.errors import InputError
from safemerge.engine.lora import LoraFactors
from safemerge.engine.merging import (
    dare,
    exact_merge,
    merge_dense,
    module_seed,
    pad_rank,
    peft_linear_merge,
    svd_factors,
)

F64 = torch.float64


def factors(d_out: int, d_in: int, r: int, scaling: float, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scaling)


def dw(f: LoraFactors) -> torch.Tensor:
    return f.scaling * (f.B.to(F64) @ f.A.to(F64))


shapes = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 4), st.integers(1, 4))
weights = st.floats(-2.0, 2.0, allow_nan=False)
scales = st.floats(0.1, 8.0)


@settings(max_examples=60, deadline=None)
@given(shapes, weights, weights, scales, scales, scales, st.integers(0, 999))
def test_exact_merge_is_the_weighted_sum_of_products(shape, wf, ws, sf, ss, out_scale, seed) -> None:
    d_out, d_in, rf, rs = shape
    t, s = factors(d_out, d_in, rf, sf, seed), factors(d_out, d_in, rs, ss, seed + 1)
    a, b = exact_merge(t, s, wf, ws, out_scale)
    assert a.shape == (rf + rs, d_in) and b.shape == (d_out, rf + rs)
    torch.testing.assert_close(out_scale * (b @ a), wf * dw(t) + ws * dw(s), rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(shapes, scales, st.integers(0, 999))
def test_unselected_module_keeps_factors_bit_for_bit_when_scaling_is_kept(shape, sf, seed) -> None:
    d_out, d_in, rf, rs = shape
    t, s = factors(d_out, d_in, rf, sf, seed), factors(d_out, d_in, rs, 1.0, seed + 1)
    a, b = exact_merge(t, s, 1.0, 0.0, out_scale=sf)  # unselected, output keeps the task scaling
    assert torch.equal(a[:rf].float(), t.A) and torch.equal(b[:, :rf].float(), t.B)
    assert not a[rf:].any()
    a0, b0 = exact_merge(t, None, 1.0, 0.0, out_scale=sf)
    assert torch.equal(a0.float(), t.A) and torch.equal(b0.float(), t.B)


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0.0, 2.0), st.floats(0.0, 2.0), scales, scales, scales, st.integers(0, 999))
def test_peft_linear_has_the_documented_cross_terms(shape, wf, ws, sf, ss, out_scale, seed) -> None:
    d_out, d_in, r, _ = shape
    t, s = factors(d_out, d_in, r, sf, seed), factors(d_out, d_in, r, ss, seed + 1)
    a, b = peft_linear_merge(t, s, wf, ws, out_scale)
    cross = (wf * sf * ws * ss) ** 0.5 * (t.B.to(F64) @ s.A.to(F64) + s.B.to(F64) @ t.A.to(F64))
    torch.testing.assert_close(out_scale * (b @ a), wf * dw(t) + ws * dw(s) + cross, rtol=1e-9, atol=1e-9)


def test_peft_linear_needs_equal_ranks() -> None:
    with pytest.raises(ValueError, match="equal ranks"):
        peft_linear_merge(factors(4, 4, 2, 1.0, 0), factors(4, 4, 3, 1.0, 1), 0.8, 0.2, 1.0)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(0, 6), st.integers(0, 999))
def test_pad_rank_preserves_the_product(shape, extra, seed) -> None:
    d_out, d_in, r, _ = shape
    f = factors(d_out, d_in, r, 1.0, seed)
    a, b = pad_rank(f.A, f.B, r + extra)
    assert a.shape[0] == r + extra
    assert torch.equal(b @ a, f.B @ f.A) or torch.allclose(b @ a, f.B @ f.A, rtol=0, atol=1e-6)


def test_module_seed_depends_on_name_and_seed_only() -> None:
    assert module_seed(0, "a.q_proj") == module_seed(0, "a.q_proj")
    assert module_seed(0, "a.q_proj") != module_seed(1, "a.q_proj")
    assert module_seed(0, "a.q_proj") != module_seed(0, "a.v_proj")


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_dense_methods_are_seeded_and_leave_global_rng_alone(method: str) -> None:
    d1, d2 = dw(factors(16, 12, 2, 1.0, 0)).float(), dw(factors(16, 12, 2, 1.0, 1)).float()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    x = merge_dense([d1, d2], [0.8, 0.2], method, 0.5, seed=7)
    after = torch.rand(1)
    y = merge_dense([d1, d2], [0.8, 0.2], method, 0.5, seed=7)
    assert torch.equal(x, y)
    assert torch.equal(before, after)  # fork_rng: the caller's RNG stream is untouched
    if method != "ties":
        assert not torch.equal(x, merge_dense([d1, d2], [0.8, 0.2], method, 0.5, seed=8))


def test_linear_dense_is_weighted_sum() -> None:
    d1, d2 = torch.randn(5, 6), torch.randn(5, 6)
    torch.testing.assert_close(merge_dense([d1, d2], [0.8, 0.2], "linear", 1.0, 0), 0.8 * d1 + 0.2 * d2)


def test_dare_rescale_is_correct_in_expectation() -> None:
    d1 = torch.randn(20, 20, generator=torch.Generator().manual_seed(0))
    zero = torch.zeros_like(d1)
    n = 400
    mean = sum(merge_dense([d1, zero], [1.0, 0.0], "dare_linear", 0.3, seed=s) for s in range(n)) / n
    # each entry is d·Bernoulli(0.3)/0.3: mean d, std |d|·sqrt(0.7/0.3)/sqrt(n)
    tol = 4 * d1.abs() * (0.7 / 0.3) ** 0.5 / n**0.5 + 1e-6
    assert bool(((mean - d1).abs() <= tol).all())
    # and one draw keeps about 30% of the entries, each multiplied by 1/0.3
    one = merge_dense([d1, zero], [1.0, 0.0], "dare_linear", 0.3, seed=1)
    kept = one != 0
    assert 0.2 < kept.float().mean() < 0.4
    torch.testing.assert_close(one[kept], d1[kept] / 0.3)


def test_dare_is_seeded_and_rescaled() -> None:
    x = torch.ones(200, 100)
    a, b = dare(x, 0.25, 7), dare(x, 0.25, 7)
    assert torch.equal(a, b)
    kept = a != 0
    assert 0.2 < float(kept.float().mean()) < 0.3
    assert torch.all(a[kept] == 4.0)
    assert not torch.equal(a, dare(x, 0.25, 8))
    assert torch.equal(dare(x, 1.0, 7), x)
    with pytest.raises(ValueError, match="density"):
        dare(x, 0.0, 7)


def _peft_under_seed(
    method: str, deltas: list[torch.Tensor], w: list[float], p: float, seed: int
) -> torch.Tensor:
    """The oracle: PEFT's own dare_linear / dare_ties, run after torch.manual_seed(seed)."""
    from peft.utils.merge_utils import dare_linear, dare_ties

    wt = torch.tensor(w, dtype=deltas[0].dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method == "dare_linear":
            return dare_linear(deltas, wt, p)
        return dare_ties(deltas, wt, p, "total")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dare_mask_is_peft_dare_linear_first_delta_mask(dtype: torch.dtype) -> None:
    """One DARE: `dare`'s mask is the one PEFT's dare_linear (and so merge_dense) puts on the first update."""
    ones = torch.ones(40, 30, dtype=dtype)
    d2 = torch.randn(40, 30, generator=torch.Generator().manual_seed(1)).to(dtype)
    seed = module_seed(3, "model.layers.0.self_attn.q_proj")
    mask = dare(ones, 0.4, seed) != 0
    assert 0.3 < float(mask.float().mean()) < 0.5
    peft_mask = _peft_under_seed("dare_linear", [ones, d2], [1.0, 0.0], 0.4, seed) != 0
    ours = merge_dense([ones, d2], [1.0, 0.0], "dare_linear", 0.4, seed) != 0
    assert torch.equal(mask, peft_mask) and torch.equal(mask, ours)
    # the values too: kept entries are 1/density, bit for bit
    torch.testing.assert_close(dare(ones, 0.4, seed), ones * mask / 0.4, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dense_dare_is_bit_identical_to_peft(method: str) -> None:
    """merge_dense keeps PEFT's outputs (the golden merge --method dare_ties depends on it)."""
    g = torch.Generator().manual_seed(0)
    d1, d2 = torch.randn(24, 18, generator=g), torch.randn(24, 18, generator=g)
    want = _peft_under_seed(method, [d1, d2], [0.8, 0.2], 0.5, 11)
    assert torch.equal(merge_dense([d1, d2], [0.8, 0.2], method, 0.5, 11), want)


def test_ties_trims_elects_and_averages() -> None:
    a = torch.tensor([[4.0, -1.0, 2.0, 0.5]])
    b = torch.tensor([[2.5, 3.0, -2.0, 0.1]])
    # density 0.5 keeps the two largest |x| of each: a → [4, 0, 2, 0], b → [2.5, 3, 0, 0]
    out = merge_dense([a, b], [1.0, 1.0], "ties", 0.5, seed=0)
    # all elected signs are +; disjoint mean over the survivors
    torch.testing.assert_close(out, torch.tensor([[3.25, 3.0, 2.0, 0.0]]))


def test_svd_error_is_zero_when_rank_suffices_and_reported_otherwise() -> None:
    low = dw(factors(40, 30, 3, 1.5, 0))
    a, b, err = svd_factors(low, rank=5, out_scale=2.0, seed=0)
    assert a.shape == (5, 30) and b.shape == (40, 5)
    assert err < 1e-10
    torch.testing.assert_close(2.0 * (b @ a), low, rtol=1e-9, atol=1e-9)
    full = torch.randn(40, 30, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, _, err_full = svd_factors(full, rank=5, out_scale=1.0, seed=0)
    s = torch.linalg.svdvals(full)
    assert err_full == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-9)  # Eckart–Young optimum


def test_randomised_svd_for_large_matrices_is_exact_on_low_rank_and_seeded() -> None:
    low = dw(factors(1100, 1030, 4, 1.0, 3))
    a1, b1, err = svd_factors(low, rank=8, out_scale=1.0, seed=5)
    a2, b2, _ = svd_factors(low, rank=8, out_scale=1.0, seed=5)
    assert err < 1e-9
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_merge_modules_on_in_memory_factors() -> None:
    from safemerge.engine.pipeline import merge_modules

    task = {"m.q": factors(6, 5, 2, 2.0, 0), "m.v": factors(4, 5, 2, 2.0, 1), "m.k": factors(4, 5, 2, 2.0, 2)}
    safety = {"m.q": factors(6, 5, 3, 0.5, 3), "m.v": factors(4, 5, 3, 0.5, 4)}
    with pytest.raises(InputError, match="1 selected module"):  # m.k has no safety counterpart
        merge_modules(task, safety, {"m.q", "m.k"}, weights=(0.7, 0.3))
    out = merge_modules(task, safety, {"m.q", "m.k"}, weights=(0.7, 0.3), allow_partial=True)
    assert out.rank == 5 and out.scaling == 2.0 and out.lora_alpha == 10.0
    assert out.merged == {"m.q"} and out.no_safety_counterpart == ["m.k"]
    for name, (a, b) in out.factors.items():
        expected = dw(task[name]) if name not in out.merged else 0.7 * dw(task[name]) + 0.3 * dw(safety[name])
        torch.testing.assert_close(out.scaling * (b @ a), expected, rtol=1e-12, atol=1e-12)
