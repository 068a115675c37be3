"""Honest statistics for small evaluation sets: Wilson 95% intervals with counts, and paired flips.

Every rate in the organism's table is shown as `k/n = p% [lo, hi]`. Two variants evaluated on the same
prompts are compared by their discordant pairs (prompts that flipped each way) and an exact McNemar
test, which is what tells a reader whether a difference of a few points is real.

Several training seeds evaluated on the same prompts are pooled with the prompt as the unit
(docs/organism.md, "Statistics over seeds"): a pooled rate's interval is Wilson's at the effective
sample size of the clustered design, and a paired comparison is an exact sign-flip test on each prompt's
difference summed over seeds. With one seed both reduce to the single-seed methods above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    lo, hi = wilson_bounds(k / n, n, z)
    lo = 0.0 if k == 0 else lo  # exact at the edges (no float residue)
    hi = 1.0 if k == n else hi
    return Rate(k, n, lo, hi)


def wilson_bounds(p: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score bounds for a proportion p observed on n trials (n may be an effective size)."""
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


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


# --- several seeds on the same prompts ---------------------------------------------------------------
# Each seed's events are a map prompt id → bool. The same prompts repeat across seeds, so the (seed,
# prompt) outcomes are not independent: prompts are the clusters, and every interval and test below
# treats the prompt as the unit of resampling.


def _per_prompt(events: Sequence[Mapping[str, bool]]) -> dict[str, tuple[int, int]]:
    """prompt id → (events, trials) summed over seeds (a prompt judged in some seeds only counts there)."""
    out: dict[str, tuple[int, int]] = {}
    for seed_events in events:
        for pid, e in seed_events.items():
            k, n = out.get(pid, (0, 0))
            out[pid] = (k + int(e), n + 1)
    return out


@dataclass(frozen=True)
class PooledRate:
    """A rate over seeds × prompts: counts, and Wilson bounds at the design's effective sample size."""

    rate: Rate  # k and n over all (seed, prompt) pairs; lo / hi from the effective sample size
    prompts: int
    seeds: int
    n_eff: float  # between the number of prompts (seeds agree on every prompt) and n (seeds independent)


def pooled_rate(events: Sequence[Mapping[str, bool]], z: float = Z95) -> PooledRate:
    """The pooled rate of several seeds' events and its 95% interval.

    p = k/n over all (seed, prompt) pairs. Its variance under prompt clustering (the ratio estimator's,
    Σ_prompts (k_p − p·n_p)² / n²) gives the effective sample size n_eff = p(1 − p)/var, between the
    number of prompts and n; the interval is Wilson's at n_eff. One seed: n_eff = n, exactly Wilson.
    A variance of 0 means either p is 0 or 1 (then n_eff is the number of prompts, the conservative end)
    or every prompt's own rate equals p (then n_eff = n: the seeds carry all the variation).
    """
    per = _per_prompt(events)
    k = sum(e for e, _ in per.values())
    n = sum(t for _, t in per.values())
    if n == 0:
        return PooledRate(wilson(0, 0), 0, len(events), 0.0)
    p = k / n
    var = sum((e - p * t) ** 2 for e, t in per.values()) / n**2
    spread = float(n) if 0 < k < n else float(len(per))  # the two cases of a zero variance
    n_eff = min(float(n), p * (1 - p) / var) if var > 0 else spread
    lo, hi = wilson_bounds(p, n_eff, z)
    return PooledRate(Rate(k, n, 0.0 if k == 0 else lo, 1.0 if k == n else hi), len(per), len(events), n_eff)


@dataclass(frozen=True)
class PairedComparison:
    """variant − reference on the same prompts, pooled over seeds: the difference of rates with a 95%
    interval, the flips each way, and the exact sign-flip p-value (two-sided)."""

    diff: float  # rate(variant) − rate(reference) over the paired (seed, prompt) outcomes
    lo: float
    hi: float
    p_value: float
    fixed: int  # pairs with the event under the reference only
    broken: int  # pairs with the event under the variant only
    pairs: int
    prompts: int

    def fmt(self) -> str:
        """'−11.3 pts [−16.1, −6.5], −20/+2 of 477, p=1.2e-05'."""
        pts = f"{100 * self.diff:+.1f} pts [{100 * self.lo:+.1f}, {100 * self.hi:+.1f}]"
        return f"{pts}, -{self.fixed}/+{self.broken} of {self.pairs}, p={self.p_value:.2g}"


def paired_comparison(
    reference: Sequence[Mapping[str, bool]], variant: Sequence[Mapping[str, bool]], z: float = Z95
) -> PairedComparison:
    """Compare `variant` with `reference`, seed by seed (`reference[i]` and `variant[i]` are the same
    seed), on the prompts both could be judged on in that seed.

    Per prompt, d_p = Σ_seeds (variant − reference) and n_p its pairs. The difference is Σ d_p / Σ n_p;
    its interval is normal with the clustered variance Σ (d_p − diff·n_p)² / n² (prompts as the unit;
    one seed: the usual paired variance). The p-value is the exact sign-flip (permutation) test of
    "each prompt's difference is symmetric about 0": S = Σ d_p against the 2^P sums Σ ±|d_p|, counted by
    dynamic programming over the integer sums. One seed: exactly McNemar's exact test.
    """
    if len(reference) != len(variant):
        raise ValueError(f"need the same seeds: {len(reference)} reference vs {len(variant)} variant")
    d: dict[str, int] = {}
    npairs: dict[str, int] = {}
    fixed = broken = 0
    for ref, var in zip(reference, variant, strict=True):
        for pid in ref.keys() & var.keys():
            x, y = int(ref[pid]), int(var[pid])
            d[pid] = d.get(pid, 0) + y - x
            npairs[pid] = npairs.get(pid, 0) + 1
            fixed += x > y
            broken += y > x
    n = sum(npairs.values())
    if n == 0:
        return PairedComparison(0.0, float("nan"), float("nan"), 1.0, 0, 0, 0, 0)
    diff = sum(d.values()) / n
    half = z * math.sqrt(sum((d[p] - diff * npairs[p]) ** 2 for p in d)) / n
    return PairedComparison(
        diff, diff - half, diff + half, sign_flip_p(list(d.values())), fixed, broken, n, len(d)
    )


def sign_flip_p(diffs: Sequence[int]) -> float:
    """Exact two-sided p-value of the sign-flip test: P(|Σ ±|d_i|| ≥ |Σ d_i|) with independent fair
    signs. The distribution of the signed sum is built by convolution over the integers (exact counts)."""
    mags = [abs(x) for x in diffs if x != 0]
    observed = abs(sum(diffs))
    counts = {0: 1}
    for m in mags:
        nxt: dict[int, int] = {}
        for s, c in counts.items():
            nxt[s + m] = nxt.get(s + m, 0) + c
            nxt[s - m] = nxt.get(s - m, 0) + c
        counts = nxt
    extreme = sum(c for s, c in counts.items() if abs(s) >= observed)
    return min(1.0, extreme / 2 ** len(mags))
