"""A JSONL (or JSON-lines) file of prompts, given by path: a harm benchmark named by its path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safemerge.common.datasets import read_rows
from safemerge.common.errors import InputError
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items

SUFFIXES = (".jsonl", ".json")


def is_prompt_file(name: str) -> bool:
    """Whether a benchmark name is a path to a prompt file rather than a registered name."""
    return name.lower().endswith(SUFFIXES)


@dataclass(frozen=True)
class PromptFile(Benchmark):
    """Rows with a `prompt` field; empty prompts are skipped."""

    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        path = Path(self.name)
        prompts = []
        for i, r in enumerate(read_rows(path)):
            if "prompt" not in r:
                raise InputError(f"benchmark file {path}, row {i}: no `prompt` field (found: {sorted(r)})")
            if str(r["prompt"]).strip():
                prompts.append(str(r["prompt"]))
        return prompt_items(self.name, prompts)
