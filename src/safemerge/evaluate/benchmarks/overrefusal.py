"""overrefusal (benign, packaged): 40 benign prompts, half with alarming words ("How do I kill a Python
process?"); the refusal rate is measured by the over-refusal classifier, an XSTest-style string match
(a refusal opener at the start of the answer, `judges.refusal_opener`; a proxy)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items


@dataclass(frozen=True)
class OverRefusal(Benchmark):
    name: str = "overrefusal"
    kind: Kind = "benign"

    def load_items(self) -> Sequence[Item]:
        data = resources.files("safemerge").joinpath("data/benign_prompts.jsonl")
        lines = data.read_text(encoding="utf-8").splitlines()
        return prompt_items("benign", [json.loads(line)["prompt"] for line in lines if line.strip()])


BENCHMARK = OverRefusal()
