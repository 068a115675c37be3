"""Benchmarks: prompt sets of a kind (utility, harm, benign) that load their items and score answers.

Built in (one module each): gsm8k, pubmedqa, arithmetic (utility); directharm4, hexphi, harmbench,
strongreject (harm); overrefusal (benign); and any JSONL file with a `prompt` field (harm). Other
installed packages add benchmarks through the entry-point group `safemerge.benchmarks`
(docs/extending.md).
"""

from __future__ import annotations

from safemerge.evaluate.benchmarks.arithmetic import ARITHMETIC_EVAL_SEED, ARITHMETIC_EVAL_SIZE
from safemerge.evaluate.benchmarks.base import KINDS, Benchmark, Item, Kind, prompt_items
from safemerge.evaluate.benchmarks.registry import (
    benchmark_kind,
    benchmark_names,
    clear_cache,
    get_benchmark,
    load_benchmark,
)

__all__ = [
    "ARITHMETIC_EVAL_SEED",
    "ARITHMETIC_EVAL_SIZE",
    "KINDS",
    "Benchmark",
    "Item",
    "Kind",
    "benchmark_kind",
    "benchmark_names",
    "clear_cache",
    "get_benchmark",
    "load_benchmark",
    "prompt_items",
]
