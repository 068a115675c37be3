"""Wilson intervals, paired flips and the exact McNemar test against hand-computed values."""

import math
from itertools import product

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safemerge.common.stats import (
    mcnemar_exact,
    paired_comparison,
    paired_flips,
    pooled_rate,
    sign_flip_p,
    wilson,
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
