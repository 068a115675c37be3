"""The HarmBench guard: HarmBench prompts are reserved for evaluation and never enter training data, nor
the calibration data of a data-dependent defence."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from safemerge.common.errors import InputError
from safemerge.common.packaged import harmbench_all_texts

MIN_SUBSTRING = 24  # a behaviour at least this long found inside a prompt counts as a leak


class HarmBenchLeakError(InputError):
    """Training data contains a HarmBench prompt."""


def normalise(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: trivial edits must not hide a HarmBench prompt."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


@lru_cache(maxsize=1)
def _reserved() -> frozenset[str]:
    return frozenset(n for n in (normalise(t) for t in harmbench_all_texts()) if n)


def find_leaks(texts: Iterable[str], reserved: Iterable[str] | None = None) -> list[tuple[int, str]]:
    """(index, text) of every text equal to, or containing, a reserved (HarmBench) prompt."""
    pool = frozenset(normalise(r) for r in reserved) if reserved is not None else _reserved()
    long = [r for r in pool if len(r) >= MIN_SUBSTRING]
    leaks = []
    for i, text in enumerate(texts):
        n = normalise(text)
        if n in pool or any(r in n for r in long):
            leaks.append((i, text))
    return leaks


def check_no_harmbench(texts: Iterable[str], source: str, reserved: Iterable[str] | None = None) -> None:
    """Raise HarmBenchLeakError naming `source` if any text is (or contains) a HarmBench prompt."""
    leaks = find_leaks(texts, reserved)
    if leaks:
        i, text = leaks[0]
        raise HarmBenchLeakError(
            f"{source}: {len(leaks)} training example(s) contain HarmBench prompts, which are reserved for "
            f"evaluation (first: example {i}: {text[:80]!r}); remove them from the training data"
        )
