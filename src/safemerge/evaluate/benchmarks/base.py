"""The benchmark interface: a prompt set with a kind, that loads its items and scores answers.

A `Benchmark` is both the registered plugin (items not loaded yet) and the loaded value the runner
evaluates (`load()` returns a copy holding its items, keeping its class and so its scoring). The kind says
how answers are judged: `utility` answers are scored by `score` (default: the last number in the answer
against the reference), `harm` answers by the harm judge, `benign` answers by the over-refusal
classifier (a refusal opener at the start of the answer, `judges.refusal_opener`). A
benchmark built in code, `Benchmark(name, kind, items)`, gets those defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from safemerge.common.errors import InputError
from safemerge.evaluate.judges import OVERREFUSAL_LABEL
from safemerge.evaluate.scoring import extract_flexible

Kind = Literal["utility", "harm", "benign"]
KINDS: tuple[str, ...] = ("utility", "harm", "benign")
Record = dict[str, Any]  # one line of generations.jsonl


@dataclass(frozen=True)
class Item:
    """One prompt; `reference` is the gold answer for utility benchmarks."""

    id: str
    prompt: str
    reference: str | None = None


@dataclass(frozen=True)
class Benchmark:
    """A named prompt set of one kind. Plugins subclass it and override `load_items` (and `score`)."""

    name: str
    kind: Kind
    items: tuple[Item, ...] = ()

    def load_items(self) -> Sequence[Item]:
        """All of the benchmark's items (a plugin reads them here); a built benchmark holds them already."""
        return self.items

    def load(self, limit: int | None = None) -> Benchmark:
        """A copy holding the first `limit` items (all when None); InputError for a bad limit or no items."""
        if limit is not None and limit <= 0:
            raise InputError(f"--limit must be positive, got {limit}")
        items = tuple(self.load_items())[:limit]
        if not items:
            raise InputError(f"benchmark {self.name!r} has no prompts")
        return replace(self, items=items)

    def head(self, limit: int | None) -> Benchmark:
        """The same benchmark cut to its first `limit` items (no reloading)."""
        return replace(self, items=self.items[:limit])

    def score(self, item: Item, response: str) -> Record:
        """Per-item fields of a utility answer, with at least `correct` (default: last number = reference)."""
        value = extract_flexible(response)
        return {"extracted": value, "correct": value == item.reference}

    def metrics(self, records: Sequence[Record], judge_name: str) -> dict[str, Any]:
        """Aggregate metrics of one variant's records, with counts (metrics.json)."""
        n = len(records)
        if self.kind == "utility":
            c = sum(bool(r["correct"]) for r in records)
            return {"kind": "utility", "n": n, "n_correct": c, "accuracy": c / n}
        if self.kind == "benign":
            k = sum(r["verdict"] == "refused" for r in records)
            return {
                "kind": "benign",
                "judge": OVERREFUSAL_LABEL,
                "n": n,
                "n_refused": k,
                "refusal_rate": k / n,
            }
        u = sum(r["verdict"] == "unsafe" for r in records)
        bad = sum(r["verdict"] == "malformed" for r in records)
        return {
            "kind": "harm",
            "judge": judge_name,
            "n": n,
            "n_unsafe": u,
            "n_malformed": bad,
            # over the judged responses (malformed left out) ...
            "harmful_rate": u / (n - bad) if n > bad else None,
            # ... and the conservative bound: every malformed verdict counted as unsafe, over all n
            "harmful_rate_conservative": (u + bad) / n if n else None,
        }


def prompt_items(prefix: str, prompts: Sequence[str]) -> tuple[Item, ...]:
    """Items without references, numbered `<prefix>-0`, `<prefix>-1`, … (harm and benign sets)."""
    return tuple(Item(f"{prefix}-{i}", p) for i, p in enumerate(prompts))
