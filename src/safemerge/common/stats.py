"""Honest statistics for small evaluation sets: Wilson 95% intervals with counts, and paired flips.

Every rate in the organism's table is shown as `k/n = p% [lo, hi]`. Two variants evaluated on the same
prompts are compared by their discordant pairs (prompts that flipped each way) and an exact McNemar
test, which is what tells a reader whether a difference of a few points is real.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile
# Rates are k/n with n in the thousands at most, so two different rates (or differences of rates) differ
# by far more than this, while float arithmetic on them errs by ~1e-16: 0.46 − 0.03 = 0.43000000000000005.
RATE_TOLERANCE = 1e-9


def at_least(x: float, bound: float) -> bool:
    """x ≥ bound for rates and differences of rates, immune to float rounding at the boundary."""
    return x >= bound - RATE_TOLERANCE


def at_most(x: float, bound: float) -> bool:
    """x ≤ bound for rates and differences of rates, immune to float rounding at the boundary."""
    return x <= bound + RATE_TOLERANCE


@dataclass(frozen=True)
class Rate:
    """k successes out of n, with a Wilson score interval."""

    k: int
    n: int
    lo: float
    hi: float

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def fmt(self, digits: int = 1) -> str:
        """'21/159 = 13.2% [8.8, 19.4]'."""
        if not self.n:
            return "n/a"
        pct = f"{100 * self.p:.{digits}f}"
        return f"{self.k}/{self.n} = {pct}% [{100 * self.lo:.{digits}f}, {100 * self.hi:.{digits}f}]"


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """Wilson score interval for k of n (n = 0 gives NaN bounds)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Rate(0, 0, float("nan"), float("nan"))
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the edges (no float residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, lo, hi)


@dataclass(frozen=True)
class Flips:
    """Paired comparison of a variant against a reference on the same items (True = event, e.g. unsafe).

    `fixed`: event under the reference, not under the variant; `broken`: the other way round."""

    fixed: int
    broken: int
    both: int
    neither: int

    @property
    def n(self) -> int:
        return self.fixed + self.broken + self.both + self.neither

    @property
    def p_value(self) -> float:
        """Exact two-sided McNemar (binomial) test on the discordant pairs."""
        return mcnemar_exact(self.fixed, self.broken)

    def fmt(self) -> str:
        return f"-{self.fixed}/+{self.broken} (p={self.p_value:.2g})"


def paired_flips(reference: Mapping[str, bool], variant: Mapping[str, bool]) -> Flips:
    """Count flips between two verdict maps keyed by item id; the item sets must be the same."""
    if set(reference) != set(variant):
        missing = sorted(set(reference) ^ set(variant))[:3]
        raise ValueError(f"paired comparison needs the same items in both (differ on e.g. {missing})")
    fixed = sum(reference[i] and not variant[i] for i in reference)
    broken = sum(variant[i] and not reference[i] for i in reference)
    both = sum(reference[i] and variant[i] for i in reference)
    return Flips(fixed, broken, both, len(reference) - fixed - broken - both)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: 2 · P(X ≤ min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
