"""Named variants and the comparison of every variant with a reference row (`safemerge eval
--reference NAME`): per benchmark, the difference of the headline rates with a 95% interval, the paired
flips and the exact McNemar p-value, the statistics `safemerge experiment`'s results table reports
(common/stats.py), on the prompts both variants could be judged on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safemerge.common.stats import paired_comparison, wilson
from safemerge.evaluate.config import EvalConfig, variant_keys
from safemerge.evaluate.runner import Record, Variant

# The verdict each headline rate counts (harmful_rate, accuracy, refusal_rate).
EVENT = {"utility": "correct", "harm": "unsafe", "benign": "refused"}


def named_variants(cfg: EvalConfig) -> list[Variant]:
    """The variants of `cfg`: the model (unless excluded), then each adapter under its name or path."""
    keys = variant_keys(cfg)
    base = [Variant(cfg.model, None)] if cfg.include_base else []
    return base + [Variant(k, a) for k, a in zip(keys[len(base) :], cfg.adapters, strict=True)]


def events(records: Sequence[Record], variant: str, benchmark: str) -> dict[str, bool]:
    """Prompt id → counted by the headline rate, for one variant on one benchmark (malformed judge
    outputs left out, as the rate leaves them out)."""
    return {
        r["id"]: r["verdict"] == EVENT[r["kind"]]
        for r in records
        if r["variant"] == variant and r["benchmark"] == benchmark and r["verdict"] != "malformed"
    }


def compare(reference: dict[str, bool], variant: dict[str, bool]) -> dict[str, Any]:
    """variant − reference on their common prompts: both rates, the variant's Wilson interval, the
    difference with its 95% interval, the flips (`fixed`: counted under the reference only; `broken`:
    under the variant only) and McNemar's exact two-sided p (common/stats.paired_comparison, one seed)."""
    common = sorted(reference.keys() & variant.keys())
    if not common:
        return {"n": 0, "reference_rate": None, "rate": None, "rate_ci95": None, "diff": None,
                "diff_ci95": None, "fixed": 0, "broken": 0, "p_value": 1.0}  # fmt: skip
    c = paired_comparison([{i: reference[i] for i in common}], [{i: variant[i] for i in common}])
    v = wilson(sum(variant[i] for i in common), len(common))
    return {
        "n": len(common),
        "reference_rate": sum(reference[i] for i in common) / len(common),
        "rate": v.p,
        "rate_ci95": [v.lo, v.hi],
        "diff": c.diff,
        "diff_ci95": [c.lo, c.hi],
        "fixed": c.fixed,
        "broken": c.broken,
        "p_value": c.p_value,
    }


def add_reference_comparison(
    reference: str | None, records: Sequence[Record], metrics: dict[str, Any]
) -> dict[str, Any]:
    """`metrics` with, under every other variant, `vs_reference`: the reference's name and, per benchmark,
    `compare` of that variant with it (metrics.json; summary.md's comparison table). Unchanged without a
    reference."""
    if reference is None:
        return metrics
    for key, v in metrics.items():
        if key == reference:
            continue
        per = {b: compare(events(records, reference, b), events(records, key, b)) for b in v["benchmarks"]}
        v["vs_reference"] = {"reference": reference, "benchmarks": per}
    return metrics
