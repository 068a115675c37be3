"""A JSONL (or JSON-lines) file given by path, a benchmark named by its path: rows with a `prompt` field
are harmful prompts (harm); rows that also carry a `reference` are a utility task (accuracy).

A utility file is scored like the built-in utility benchmarks: a numeric reference against the last
number of the answer (`arithmetic`'s and GSM8K's flexible rule); a text reference as a label,
PubMedQA's way: the last of the benchmark's text references that occurs in the answer as whole words
(case-insensitive) must be the row's (so "yes" is not found in "eyes", and an answer ending "... so
no." scores "no").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from safemerge.common.datasets import Row, read_rows
from safemerge.common.errors import InputError
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, Record, prompt_items
from safemerge.evaluate.scoring import normalise_number

SUFFIXES = (".jsonl", ".json")


def is_prompt_file(name: str) -> bool:
    """Whether a benchmark name is a path to a prompt file rather than a registered name."""
    return name.lower().endswith(SUFFIXES)


def file_kind(path: Path) -> Kind:
    """utility when the file's first row has a `reference`, else harm (a missing file reads as harm: the
    error comes when it is loaded)."""
    try:
        rows = read_rows(path)
    except InputError:
        return "harm"
    return "utility" if rows and "reference" in rows[0] else "harm"


@dataclass(frozen=True)
class PromptFile(Benchmark):
    """Rows with a `prompt` field; empty prompts are skipped. Harm, or utility when rows have a
    `reference` (then every row needs one)."""

    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        path = Path(self.name)
        rows = read_rows(path)
        for i, r in enumerate(rows):
            if "prompt" not in r:
                raise InputError(f"benchmark file {path}, row {i}: no `prompt` field (found: {sorted(r)})")
        if self.kind == "utility":
            return _reference_items(path, rows)
        return prompt_items(self.name, [str(r["prompt"]) for r in rows if str(r["prompt"]).strip()])

    def score(self, item: Item, response: str) -> Record:
        """Numeric reference: the last number of the answer; text: the last of the file's labels."""
        if normalise_number(str(item.reference)) is not None:
            return super().score(item, response)
        labels = {it.reference for it in self.items if normalise_number(str(it.reference)) is None}
        label = last_label(response, sorted(str(x) for x in labels))
        return {
            "extracted": label,
            "correct": label is not None and label.lower() == str(item.reference).lower(),
        }


def _reference_items(path: Path, rows: list[Row]) -> list[Item]:
    """The items of a utility file: every row with a non-empty `prompt` and `reference` (numbers as the
    scorer normalises them, so 1,234 and 1234.0 are one reference)."""
    items = []
    for i, r in enumerate(rows):
        ref = r.get("reference")
        if ref is None or isinstance(ref, dict | list) or not str(ref).strip():
            raise InputError(
                f"benchmark file {path}, row {i}: a utility file needs a non-empty `reference` (a number "
                "or a label) in every row, as its first row has one"
            )
        if str(r["prompt"]).strip():
            number = normalise_number(str(ref))
            items.append(
                Item(f"{path}-{i}", str(r["prompt"]), number if number is not None else str(ref).strip())
            )
    return items


def last_label(response: str, labels: Sequence[str]) -> str | None:
    """The label (case as in `labels`) whose last whole-word occurrence in the response comes last; the
    longer label wins a tie ("not sure" over "sure"); None when none occurs."""
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = list(re.finditer(r"(?<!\w)" + re.escape(label) + r"(?!\w)", response, re.IGNORECASE))
        if found:
            cand = (found[-1].end(), len(label), label)
            best = cand if best is None or cand > best else best
    return None if best is None else best[2]
