"""arithmetic (utility, offline): 200 held-out three-digit additions and subtractions.

The problems come from the same generator as the `arithmetic` training recipe, from the evaluation
split (one problem in ten by hash), so train and eval never overlap. Scored by the last number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safemerge.common.datasets import arithmetic_problems
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind

ARITHMETIC_EVAL_SIZE = 200
ARITHMETIC_EVAL_SEED = 0


@dataclass(frozen=True)
class Arithmetic(Benchmark):
    name: str = "arithmetic"
    kind: Kind = "utility"

    def load_items(self) -> Sequence[Item]:
        probs = arithmetic_problems(ARITHMETIC_EVAL_SIZE, ARITHMETIC_EVAL_SEED, "eval")
        return [Item(f"arith-{i}", q, str(c)) for i, (q, _, c) in enumerate(probs)]


BENCHMARK = Arithmetic()
