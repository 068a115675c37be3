"""The benchmarks by name: every `Benchmark` registered in the entry-point group `safemerge.benchmarks`,
plus JSONL files given by path (harm prompts, or a utility task when rows carry a `reference`).

The built-in benchmarks are registered by safemerge's own pyproject.toml, exactly as another installed
package registers its own (`[project.entry-points."safemerge.benchmarks"] NAME = "module:OBJECT"`).
Listing names reads package metadata only; a benchmark's module is imported when it is first used, and
a plugin that fails to import, or is not a `Benchmark` of a known kind, is an `InputError` naming it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from safemerge.common.errors import InputError
from safemerge.common.plugins import clear_plugin_cache, entry_point, load_plugin, plugin_label, plugin_names
from safemerge.evaluate.benchmarks.base import KINDS, Benchmark
from safemerge.evaluate.benchmarks.jsonl import PromptFile, file_kind, is_prompt_file

GROUP = "safemerge.benchmarks"


def benchmark_names() -> list[str]:
    """The registered benchmarks' names, sorted (reads package metadata, imports nothing)."""
    return plugin_names(GROUP)


@functools.cache
def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as `name` (items not loaded), imported on first use."""
    hint = f"use {', '.join(benchmark_names())} or a .jsonl file of prompts"
    obj: Benchmark = load_plugin(GROUP, name, Benchmark, "benchmark", unknown_hint=hint)
    if obj.name != name or obj.kind not in KINDS:
        raise InputError(
            f"{plugin_label('benchmark', entry_point(GROUP, name))}: its name must be {name!r} (got "
            f"{obj.name!r}) and its kind one of {', '.join(KINDS)} (got {obj.kind!r})"
        )
    return obj


def benchmark_kind(name: str) -> str:
    """utility, harm or benign, without loading the items (a file: by its first row)."""
    return file_kind(Path(name)) if is_prompt_file(name) else get_benchmark(name).kind


def load_benchmark(name: str, limit: int | None = None) -> Benchmark:
    """A benchmark by name or JSONL path with its first `limit` items; InputError if unknown or empty."""
    if is_prompt_file(name):
        source: Benchmark = PromptFile(str(Path(name)), file_kind(Path(name)))
    else:
        source = get_benchmark(name)
    return source.load(limit)


def clear_cache() -> None:
    """Forget the registered benchmarks (after installing a plugin in-process, e.g. in tests)."""
    clear_plugin_cache()
    get_benchmark.cache_clear()
