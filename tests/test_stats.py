"""Wilson intervals, paired flips and the exact McNemar test against hand-computed values."""

import math

import pytest

from safemerge.common.stats import mcnemar_exact, paired_flips, wilson


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
