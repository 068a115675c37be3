"""Benign (over-refusal) verdicts before and after the switch of refusal classifier, on saved generations.

    python benchmarks/compare_refusal_classifiers.py runs/eval/generations.jsonl [more.jsonl ...]
    python benchmarks/compare_refusal_classifiers.py demo_out/evals/*/*/generations.jsonl

Old: the verdict recorded in the file (written by the keyword classifier: a refusal marker anywhere in
the answer), or, for a record without one, that classifier recomputed (`judges.refused`). New: the
over-refusal classifier (`judges.refusal_opener`: a refusal opener at the start of the answer). Prints,
per variant and benchmark, the refusal rate old → new, then how many benign verdicts change and each
changed answer (its id, the old marker and the new opener, the answer's start).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.evaluate.judges import refusal_opener, refused


@dataclass(frozen=True)
class Change:
    """One benign answer whose verdict differs between the two classifiers."""

    file: str
    variant: str
    benchmark: str
    id: str
    old: str
    new: str
    marker: str | None
    opener: str | None
    response: str


@dataclass
class Comparison:
    total: int = 0
    changed: list[Change] = field(default_factory=list)
    # (variant, benchmark) -> [n, old refused, new refused]
    rates: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))


def benign_records(paths: Iterable[Path]) -> Iterable[tuple[Path, dict[str, object]]]:
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("kind") == "benign":
                    yield path, rec


def compare(paths: Sequence[Path]) -> Comparison:
    """Old and new verdicts of every benign record in the files."""
    out = Comparison()
    for path, rec in benign_records(paths):
        response = str(rec.get("response", ""))
        marker, opener = refused(response), refusal_opener(response)
        recorded = rec.get("verdict")
        old = str(recorded) if recorded in ("refused", "answered") else ("refused" if marker else "answered")
        new = "refused" if opener else "answered"
        variant, bench = str(rec.get("variant")), str(rec.get("benchmark"))
        counts = out.rates[(variant, bench)]
        counts[0] += 1
        counts[1] += old == "refused"
        counts[2] += new == "refused"
        out.total += 1
        if old != new:
            change = Change(str(path), variant, bench, str(rec.get("id")), old, new, marker, opener, response)
            out.changed.append(change)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="generations.jsonl files")
    args = parser.parse_args(argv)
    result = compare(args.files)
    print("variant | benchmark | n | refusal rate old (markers anywhere) | new (opener at the start)")
    for (variant, bench), (n, old, new) in sorted(result.rates.items()):
        print(f"{variant} | {bench} | {n} | {old}/{n} = {old / n:.1%} | {new}/{n} = {new / n:.1%}")
    ups = sum(c.new == "refused" for c in result.changed)
    print(
        f"\n{len(result.changed)} of {result.total} benign verdicts change "
        f"({len(result.changed) - ups} refused → answered, {ups} answered → refused)"
    )
    for c in result.changed:
        start = " ".join(c.response.split())[:100]
        print(
            f"- {c.variant} {c.benchmark} {c.id}: {c.old} → {c.new} "
            f"(marker {c.marker!r}, opener {c.opener!r}): {start!r}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
