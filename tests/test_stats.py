"""Wilson intervals, paired flips and the exact McNemar test against hand-computed values."""

import math
from itertools import product

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safemerge.common.stats import (
    RATE_TOLERANCE,
    Z95,
    at_least,
    at_most,
    mcnemar_exact,
    paired_comparison,
    paired_flips,
    pooled_rate,
    sign_flip_p,
    wilson,
    wilson_bounds,
)


def test_wilson_hand_computed() -> None:
    # k=7, n=159, z=1.96: p=0.0440252; z²=3.8414588; denom=1+z²/n=1.0241601;
    # centre=(p + z²/2n)/denom=(0.0440252+0.0120801)/1.0241601=0.0547817;
    # half=z/denom·sqrt(p(1-p)/n + z²/4n²)=1.913728·sqrt(0.000264698+0.0000379876)=0.0332950
    r = wilson(7, 159)
    assert (r.k, r.n) == (7, 159)
    assert r.p == pytest.approx(7 / 159)
    assert r.lo == pytest.approx(0.021487, abs=2e-6)
    assert r.hi == pytest.approx(0.088077, abs=2e-6)
    assert r.fmt() == "7/159 = 4.4% [2.1, 8.8]"


def test_wilson_edges() -> None:
    zero = wilson(0, 40)  # lo = 0, hi = z²/n / (1 + z²/n) = 3.841459/43.841459
    assert zero.lo == 0.0
    assert zero.hi == pytest.approx(3.841459 / 43.841459, rel=1e-6)
    full = wilson(40, 40)
    assert full.hi == 1.0
    assert full.lo == pytest.approx(1 - 3.841459 / 43.841459, rel=1e-6)
    half = wilson(50, 100)  # symmetric around 0.5
    assert half.lo + half.hi == pytest.approx(1.0)
    assert math.isnan(wilson(0, 0).lo)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_paired_flips_counts() -> None:
    ref = {"a": True, "b": True, "c": False, "d": False, "e": True}
    var = {"a": False, "b": True, "c": True, "d": False, "e": False}
    f = paired_flips(ref, var)
    assert (f.fixed, f.broken, f.both, f.neither, f.n) == (2, 1, 1, 1, 5)
    # discordant 2 vs 1: p = 2·P(X ≤ 1 | n=3) = 2·(1+3)/8 = 1.0
    assert f.p_value == 1.0
    with pytest.raises(ValueError):
        paired_flips(ref, {"a": True})


def test_mcnemar_exact_hand_computed() -> None:
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(15, 1) == pytest.approx(2 * 17 / 2**16)  # (C(16,0)+C(16,1))/2^16, doubled
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)
    assert mcnemar_exact(3, 3) == 1.0


# --- several seeds on the same prompts: hand-computed values ----------------------------------------


def test_pooled_rate_hand_computed() -> None:
    # 2 seeds × 3 prompts; per prompt (events, trials): a (2, 2), b (1, 2), c (0, 2); k = 3, n = 6, p = 0.5.
    # var = ((2 − 1)² + (1 − 1)² + (0 − 1)²) / 6² = 1/18; n_eff = 0.25 / (1/18) = 4.5.
    # Wilson at p = 0.5, n = 4.5: centre 0.5; half = z/(1 + z²/4.5) · sqrt(0.25/4.5 + z²/(4·4.5²))
    r = pooled_rate([{"a": True, "b": False, "c": False}, {"a": True, "b": True, "c": False}])
    assert (r.rate.k, r.rate.n, r.prompts, r.seeds) == (3, 6, 3, 2)
    assert r.n_eff == pytest.approx(4.5)
    z2 = 1.959963984540054**2
    half = 1.959963984540054 / (1 + z2 / 4.5) * math.sqrt(0.25 / 4.5 + z2 / (4 * 4.5**2))
    assert half == pytest.approx(0.339311, abs=1e-6)  # 1.057349 · sqrt(0.0555556 + 0.0474254)
    assert r.rate.lo == pytest.approx(0.5 - half, abs=1e-12)
    assert r.rate.hi == pytest.approx(0.5 + half, abs=1e-12)


def test_pooled_rate_limits() -> None:
    one = pooled_rate([{"a": True, "b": False, "c": False, "d": False}])  # one seed: exactly Wilson
    assert one.n_eff == 4.0 and one.rate == wilson(1, 4)
    agree = pooled_rate([{"a": True, "b": False}] * 3)  # seeds agree: the prompts are all there is
    assert agree.n_eff == pytest.approx(2.0) and agree.rate.k == 3 and agree.rate.n == 6
    split = pooled_rate([{"a": True, "b": False}, {"a": False, "b": True}])  # every prompt at p: var 0
    assert split.n_eff == 4.0
    none = pooled_rate([{"a": False, "b": False}, {"a": False, "b": False}])  # p = 0: n_eff = prompts
    assert none.n_eff == 2.0 and none.rate.lo == 0.0
    assert none.rate.hi == pytest.approx(3.841459 / 5.841459, rel=1e-6)  # Wilson's upper bound at n = 2
    assert pooled_rate([]).rate.n == 0


def test_sign_flip_hand_computed() -> None:
    assert sign_flip_p([2, 1]) == 0.5  # sums ±2 ± 1: only ++ and −− reach |3|
    assert sign_flip_p([2, -1]) == 1.0  # observed |1|: all four sums are at least that far out
    assert sign_flip_p([3, 1, 1]) == 0.25  # sums 5, 3, 3, 1, −1, −3, −3, −5: |s| ≥ 5 twice of 8
    assert sign_flip_p([0, 0]) == 1.0 and sign_flip_p([]) == 1.0


@given(st.lists(st.integers(-3, 3), max_size=10))
def test_sign_flip_matches_enumeration(diffs: list[int]) -> None:
    mags = [abs(d) for d in diffs if d]
    obs = abs(sum(diffs))
    hits = sum(
        abs(sum(s * m for s, m in zip(signs, mags, strict=True))) >= obs
        for signs in product((1, -1), repeat=len(mags))
    )
    assert sign_flip_p(diffs) == pytest.approx(hits / 2 ** len(mags), abs=1e-15)


@given(st.integers(0, 25), st.integers(0, 25))
def test_sign_flip_one_seed_is_exact_mcnemar(b: int, c: int) -> None:
    assert sign_flip_p([-1] * b + [1] * c) == pytest.approx(mcnemar_exact(b, c), abs=1e-12)


def test_paired_comparison_hand_computed() -> None:
    # seed 0: ref a,b unsafe; variant b only.  seed 1: ref a; variant c.
    # d_a = −2, d_b = 0, d_c = +1 over n = 6 pairs: diff = −1/6; fixed 2 (a twice), broken 1 (c).
    # var·n² = (−2 + 1/3)² + (0 + 1/3)² + (1 + 1/3)² = 25/9 + 1/9 + 16/9 = 14/3.
    ref = [{"a": True, "b": True, "c": False}, {"a": True, "b": False, "c": False}]
    var = [{"a": False, "b": True, "c": False}, {"a": False, "b": False, "c": True}]
    c = paired_comparison(ref, var)
    assert (c.fixed, c.broken, c.pairs, c.prompts) == (2, 1, 6, 3)
    assert c.diff == pytest.approx(-1 / 6)
    half = 1.959963984540054 * math.sqrt(14 / 3) / 6
    assert half == pytest.approx(0.705667, abs=1e-6)
    assert (c.lo, c.hi) == (pytest.approx(-1 / 6 - half), pytest.approx(-1 / 6 + half))
    assert c.p_value == 1.0  # magnitudes 2, 1 with observed |−1|: every signed sum is at least as far
    assert c.fmt() == "-16.7 pts [-87.2, +53.9], -2/+1 of 6, p=1"


def test_paired_comparison_one_seed_and_missing_verdicts() -> None:
    ref = {f"p{i}": i < 10 for i in range(40)}  # 10 unsafe under the reference
    var = {f"p{i}": 8 <= i < 11 for i in range(40)}  # fixes 8, breaks 1
    c = paired_comparison([ref], [var])
    assert (c.fixed, c.broken, c.pairs) == (8, 1, 40)
    assert c.p_value == pytest.approx(mcnemar_exact(8, 1))
    assert c.diff == pytest.approx(-7 / 40)
    # one seed: the paired-difference variance Σ (d_i − diff)² / n², with d_i in {−1, 0, +1}
    ss = 8 * (-1 + 7 / 40) ** 2 + 1 * (1 + 7 / 40) ** 2 + 31 * (7 / 40) ** 2
    assert c.hi - c.diff == pytest.approx(1.959963984540054 * math.sqrt(ss) / 40)
    del var["p0"]  # a malformed verdict: that prompt leaves the comparison
    assert paired_comparison([ref], [var]).pairs == 39
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparison([ref, ref], [var])


def test_pooled_rate_effective_size_is_capped_at_n() -> None:
    # per prompt (events, trials): a, b, c (1, 2), d (2, 2): k = 5, n = 8, p = 0.625; Σ (k_p − p·n_p)² =
    # 3·0.25² + 0.75² = 0.75, var = 0.75/64, p(1 − p)/var = 0.234375·64/0.75 = 20 > n: capped at n = 8,
    # where the interval is Wilson's for 5 of 8.
    r = pooled_rate(
        [{"a": True, "b": False, "c": True, "d": True}, {"a": False, "b": True, "c": False, "d": True}]
    )
    assert r.n_eff == 8.0
    assert (r.rate.lo, r.rate.hi) == (pytest.approx(wilson(5, 8).lo), pytest.approx(wilson(5, 8).hi))


# --- edges found by mutation testing (docs/testing.md) -----------------------------------------------


def test_at_least_and_at_most_forgive_only_rounding() -> None:
    assert at_least(0.46 - 0.03, 0.43) and at_most(0.43, 0.46 - 0.03)  # 0.43000000000000005 vs 0.43
    assert at_least(0.43, 0.43) and at_most(0.43, 0.43)
    assert at_least(0.5 - RATE_TOLERANCE, 0.5) and at_most(0.5 + RATE_TOLERANCE, 0.5)  # a closed band
    assert not at_least(0.43 - 1e-6, 0.43) and not at_most(0.43 + 1e-6, 0.43)


def test_wilson_with_another_z() -> None:
    # k = 1, n = 4, z = 1: centre = (0.25 + 1/8)/(1 + 1/4) = 0.3; half = 0.8 · sqrt(0.1875/4 + 1/64) = 0.2
    r = wilson(1, 4, z=1.0)
    assert (r.lo, r.hi) == (pytest.approx(0.1, abs=1e-12), pytest.approx(0.5, abs=1e-12))
    pooled = pooled_rate([{"a": True, "b": False, "c": False, "d": False}], z=1.0)  # one seed: Wilson
    assert (pooled.rate.lo, pooled.rate.hi) == (pytest.approx(0.1, abs=1e-12), pytest.approx(0.5, abs=1e-12))


def test_wilson_bounds_stay_in_the_unit_interval() -> None:
    # At p = 1 the upper bound is 1 and at p = 0 the lower bound is 0 exactly in real arithmetic; in float
    # they land an ulp outside [0, 1] for some n (p = 1, n = 16: 1 + 2.2e-16), which the clamps remove.
    for n in range(1, 200):
        lo, hi = wilson_bounds(1.0, n)
        assert hi <= 1.0 and lo == pytest.approx(n / (n + Z95**2), rel=1e-12)  # Wilson at p = 1: n/(n + z²)
        lo, hi = wilson_bounds(0.0, n)
        assert lo >= 0.0 and hi == pytest.approx(Z95**2 / (n + Z95**2), rel=1e-12)


def test_pooled_rate_without_events_and_at_the_edges() -> None:
    for events in ([], [{}, {}]):
        r = pooled_rate(events)
        assert (r.rate.k, r.rate.n, r.prompts, r.seeds, r.n_eff) == (0, 0, 0, len(events), 0.0)
        assert math.isnan(r.rate.lo) and math.isnan(r.rate.hi)
    # one prompt, two seeds that disagree: k = 1 of 2 and the prompt's own rate is p (var 0): n_eff = n
    split = pooled_rate([{"a": True}, {"a": False}])
    assert split.n_eff == 2.0 and split.rate == wilson(1, 2)
    # every pair an event on 10 prompts (3 seeds): n_eff = 10 prompts, and the upper bound is 1 exactly
    # (Wilson's formula at p = 1, n = 10 rounds to 0.9999999999999999)
    every = pooled_rate([{f"p{i}": True for i in range(10)}] * 3)
    assert (every.rate.k, every.rate.n, every.n_eff) == (30, 30, 10.0)
    assert every.rate.hi == 1.0 and every.rate.lo == pytest.approx(10 / (10 + Z95**2), rel=1e-12)
    # no event on 7 prompts (2 seeds): the lower bound is 0 exactly (the formula leaves 2.8e-17 at n = 7)
    never = pooled_rate([{f"p{i}": False for i in range(7)}] * 2)
    assert never.n_eff == 7.0 and never.rate.lo == 0.0


def test_paired_comparison_without_pairs_and_with_one() -> None:
    for ref, var in (([{}], [{}]), ([{"a": True}], [{"b": False}]), ([], [])):
        c = paired_comparison(ref, var)
        assert (c.diff, c.p_value, c.fixed, c.broken, c.pairs, c.prompts) == (0.0, 1.0, 0, 0, 0, 0)
        assert math.isnan(c.lo) and math.isnan(c.hi)
    one = paired_comparison([{"a": True}], [{"a": False}])  # one pair, fixed: diff −1 with no spread
    assert (one.diff, one.lo, one.hi, one.p_value) == (-1.0, -1.0, -1.0, 1.0)
    assert (one.fixed, one.broken, one.pairs, one.prompts) == (1, 0, 1, 1)
