"""Choosing one grid cell on validation benchmarks (`choose:` of a defence): the rule, as a pure function.

The rule `safest-within-tolerance` (see `ChooseSpec`): keep the cells that lose at most
`max_utility_drop` of mean validation utility and add at most `max_refusal_rise` of mean validation
refusal rate against the reference row, take the one with the lowest mean validation harmful rate;
if none is kept, take the one with the highest utility. Ties go to the better other metric, then to
the earlier cell in grid order, so a choice is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from safemerge.common.stats import at_least, at_most
from safemerge.experiment.config import ChooseSpec


@dataclass(frozen=True)
class Summary:
    """Mean validation rates of one row by benchmark kind; None where the kind has no benchmark."""

    harmful: float | None
    utility: float | None
    refusal: float | None


@dataclass
class Choice:
    """What one `choose` decided, for the results files."""

    defence: str  # the defence's row name
    reference: str  # label of the reference row
    chosen: str  # label of the chosen cell
    met: bool  # False: no cell met the tolerances and the fallback chose
    rule: str  # the rule in words
    candidates: list[str] = field(default_factory=list)


def within_tolerance(cell: Summary, reference: Summary, spec: ChooseSpec) -> bool:
    """Whether a cell keeps the reference's utility and refusal rate within the spec's tolerances."""
    lost_utility = (
        cell.utility is not None
        and reference.utility is not None
        and not at_least(cell.utility - reference.utility, -spec.max_utility_drop)
    )
    added_refusal = (
        cell.refusal is not None
        and reference.refusal is not None
        and not at_most(cell.refusal - reference.refusal, spec.max_refusal_rise)
    )
    return not (lost_utility or added_refusal)


def choose_cell(
    candidates: Sequence[tuple[str, Summary]], reference: Summary, spec: ChooseSpec
) -> tuple[str, bool]:
    """(label of the chosen candidate, whether it met the tolerances); `candidates` in grid order."""
    if not candidates:
        raise ValueError("no candidate cells to choose from")

    def harm(s: Summary) -> float:
        return s.harmful if s.harmful is not None else 0.0

    def utility(s: Summary) -> float:
        return s.utility if s.utility is not None else 0.0

    ok = [(label, s) for label, s in candidates if within_tolerance(s, reference, spec)]
    if ok:  # min/max keep the first of equal keys: grid order breaks the last ties
        return min(ok, key=lambda c: (harm(c[1]), -utility(c[1])))[0], True
    return max(candidates, key=lambda c: (utility(c[1]), -harm(c[1])))[0], False


def _pts(x: float) -> str:
    return f"{100 * x:g}"


def rule_text(spec: ChooseSpec, met: bool, reference: str) -> str:
    """The rule that decided, in words (`reference`: how to call the reference row)."""
    if met:
        return (
            f"lowest validation harmful rate with task ≥ {reference} − {_pts(spec.max_utility_drop)} pts "
            f"and over-refusal ≤ {reference} + {_pts(spec.max_refusal_rise)} pts"
        )
    return "no cell met the task/over-refusal constraints on validation: highest validation task accuracy"
