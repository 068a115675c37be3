"""PubMedQA (utility): the hub's `qiaojin/PubMedQA` `pqa_labeled` set (1,000; training uses pqa_artificial).

The label is an explicit `Answer: x` if present, else the first of yes/no/maybe as a word; answers with
neither are counted in `n_unparsed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safemerge.common.datasets import load_hub_rows, pubmedqa_prompt
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, Record
from safemerge.evaluate.scoring import parse_pubmedqa


@dataclass(frozen=True)
class PubMedQA(Benchmark):
    name: str = "pubmedqa"
    kind: Kind = "utility"

    def load_items(self) -> Sequence[Item]:
        rows = load_hub_rows("qiaojin/PubMedQA", "pqa_labeled", "train")
        return [
            Item(
                str(r["pubid"]),
                pubmedqa_prompt(r["question"], list(r["context"]["contexts"])),
                r["final_decision"],
            )
            for r in rows
        ]

    def score(self, item: Item, response: str) -> Record:
        label = parse_pubmedqa(response)
        return {"extracted": label, "correct": label == item.reference}

    def metrics(self, records: Sequence[Record], judge_name: str) -> dict[str, Any]:
        m = super().metrics(records, judge_name)
        m["n_unparsed"] = sum(r["extracted"] is None for r in records)
        return m


BENCHMARK = PubMedQA()
