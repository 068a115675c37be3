"""GSM8K (utility): the hub's `openai/gsm8k` test split, 1,319 problems, in lm-evaluation-harness's chat
form (`gsm8k-cot-llama`): the question inside an instruction asking the answer to end with "The final
answer is N".

Headline `accuracy` is the strict extraction (the number of the last "The final answer is N"); the
flexible one (the last number in the answer) is reported beside it, each with its count, and
`n_unparsed_strict` counts answers without the strict form. The `gsm8k` training recipe writes its
answers in that form, so every row is scored on the same footing (docs/train_eval.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from safemerge.common.datasets import gsm8k_prompt, load_hub_rows
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, Record
from safemerge.evaluate.scoring import extract_flexible, extract_strict, gsm8k_reference


@dataclass(frozen=True)
class Gsm8k(Benchmark):
    name: str = "gsm8k"
    kind: Kind = "utility"

    def load_items(self) -> Sequence[Item]:
        rows = load_hub_rows("openai/gsm8k", "main", "test")
        return [
            Item(f"gsm8k-{i}", gsm8k_prompt(r["question"]), gsm8k_reference(r["answer"]))
            for i, r in enumerate(rows)
        ]

    def score(self, item: Item, response: str) -> Record:
        strict, flex = extract_strict(response), extract_flexible(response)
        return {
            "extracted_strict": strict,
            "extracted_flexible": flex,
            "correct": strict == item.reference,
            "correct_flexible": flex == item.reference,
        }

    def metrics(self, records: Sequence[Record], judge_name: str) -> dict[str, Any]:
        m = super().metrics(records, judge_name)
        n, cf = len(records), sum(bool(r["correct_flexible"]) for r in records)
        m.update(
            accuracy_strict=m["accuracy"],
            n_correct_flexible=cf,
            accuracy_flexible=cf / n,
            n_unparsed_strict=sum(r["extracted_strict"] is None for r in records),
        )
        return m


BENCHMARK = Gsm8k()
