"""StrongREJECT (harm, packaged): 313 forbidden prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safemerge.common.packaged import strongreject_prompts
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items


@dataclass(frozen=True)
class StrongReject(Benchmark):
    name: str = "strongreject"
    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        return prompt_items(self.name, strongreject_prompts())


BENCHMARK = StrongReject()
