"""HarmBench (harm, packaged): the 159 standard test behaviours (contextual and copyright ones need
context strings or hash-based judging). Reserved for evaluation: training data is checked against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from safemerge.common.packaged import harmbench_prompts
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items


@dataclass(frozen=True)
class HarmBench(Benchmark):
    name: str = "harmbench"
    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        return prompt_items(self.name, harmbench_prompts("test"))


BENCHMARK = HarmBench()
