"""DirectHarm4 (harm): the hub's `vfleaking/DirectHarm4` test split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safemerge.common.datasets import load_hub_rows
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items


@dataclass(frozen=True)
class DirectHarm4(Benchmark):
    name: str = "directharm4"
    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        rows = load_hub_rows("vfleaking/DirectHarm4", None, "test")
        col = "instruction" if rows and "instruction" in rows[0] else "prompt"
        return prompt_items(self.name, [str(r[col]) for r in rows])


BENCHMARK = DirectHarm4()
