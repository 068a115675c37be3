"""Benchmarks: prompt sets with a kind (utility, harm, benign) and, for utility, references.

Utility: gsm8k (hub, test split), pubmedqa (hub, pqa_labeled), arithmetic (offline).
Harm: directharm4 and hexphi (hub), harmbench and strongreject (packaged), any JSONL with `prompt`.
Benign: overrefusal (packaged benign prompts, some with alarming words; measures refusals).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from safemerge.common.errors import InputError
from safemerge.common.packaged import harmbench_prompts, strongreject_prompts
from safemerge.evaluate.scoring import gsm8k_reference
from safemerge.train.recipes import arithmetic_problems, load_hub_rows, pubmedqa_prompt, read_rows

Kind = Literal["utility", "harm", "benign"]
UTILITY = ("gsm8k", "pubmedqa", "arithmetic")
HARM = ("directharm4", "hexphi", "harmbench", "strongreject")
BENIGN = ("overrefusal",)
BENCHMARKS = UTILITY + HARM + BENIGN
ARITHMETIC_EVAL_SIZE = 200
ARITHMETIC_EVAL_SEED = 0
HEXPHI_CATEGORIES = 11


@dataclass(frozen=True)
class Item:
    """One prompt; `reference` is the gold answer for utility benchmarks."""

    id: str
    prompt: str
    reference: str | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: Kind
    items: tuple[Item, ...]


def _harm(name: str, prompts: list[str]) -> Benchmark:
    return Benchmark(name, "harm", tuple(Item(f"{name}-{i}", p) for i, p in enumerate(prompts)))


def _gsm8k() -> Benchmark:
    rows = load_hub_rows("openai/gsm8k", "main", "test")
    items = tuple(Item(f"gsm8k-{i}", r["question"], gsm8k_reference(r["answer"])) for i, r in enumerate(rows))
    return Benchmark("gsm8k", "utility", items)


def _pubmedqa() -> Benchmark:
    rows = load_hub_rows("qiaojin/PubMedQA", "pqa_labeled", "train")
    items = tuple(
        Item(
            str(r["pubid"]),
            pubmedqa_prompt(r["question"], list(r["context"]["contexts"])),
            r["final_decision"],
        )
        for r in rows
    )
    return Benchmark("pubmedqa", "utility", items)


def _arithmetic() -> Benchmark:
    probs = arithmetic_problems(ARITHMETIC_EVAL_SIZE, ARITHMETIC_EVAL_SEED, "eval")
    return Benchmark(
        "arithmetic", "utility", tuple(Item(f"arith-{i}", q, str(c)) for i, (q, _, c) in enumerate(probs))
    )


def _directharm4() -> Benchmark:
    rows = load_hub_rows("vfleaking/DirectHarm4", None, "test")
    col = "instruction" if rows and "instruction" in rows[0] else "prompt"
    return _harm("directharm4", [str(r[col]) for r in rows])


def _hexphi() -> Benchmark:
    """HEx-PHI: 11 category CSV files (one instruction per line) in a gated hub repository."""
    from huggingface_hub import hf_hub_download

    repo = "LLM-Tuning-Safety/HEx-PHI"
    prompts: list[str] = []
    for k in range(1, HEXPHI_CATEGORIES + 1):
        try:
            path = hf_hub_download(repo, f"category_{k}.csv", repo_type="dataset")
        except Exception as exc:
            raise InputError(
                f"cannot download HEx-PHI ({repo}, category_{k}.csv): {type(exc).__name__}: {exc}. "
                f"HEx-PHI is gated: accept its terms on https://huggingface.co/datasets/{repo} and log "
                "in with `hf auth login` (or set HF_TOKEN)."
            ) from None
        prompts += [line.strip().strip('"') for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return _harm("hexphi", [p for p in prompts if p])


def _overrefusal() -> Benchmark:
    text = resources.files("safemerge").joinpath("data/benign_prompts.jsonl").read_text(encoding="utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return Benchmark("overrefusal", "benign", tuple(Item(f"benign-{i}", p) for i, p in enumerate(prompts)))


def _jsonl(path: Path) -> Benchmark:
    rows = read_rows(path)
    prompts = []
    for i, r in enumerate(rows):
        if "prompt" not in r:
            raise InputError(f"benchmark file {path}, row {i}: no `prompt` field (found: {sorted(r)})")
        if str(r["prompt"]).strip():
            prompts.append(str(r["prompt"]))
    return _harm(str(path), prompts)


def load_benchmark(name: str, limit: int | None = None) -> Benchmark:
    """A benchmark by name or JSONL path, cut to its first `limit` items; InputError if unknown or empty."""
    loaders = {
        "gsm8k": _gsm8k,
        "pubmedqa": _pubmedqa,
        "arithmetic": _arithmetic,
        "directharm4": _directharm4,
        "hexphi": _hexphi,
        "harmbench": lambda: _harm("harmbench", harmbench_prompts("test")),
        "strongreject": lambda: _harm("strongreject", strongreject_prompts()),
        "overrefusal": _overrefusal,
    }
    if name in loaders:
        bench = loaders[name]()
    elif name.lower().endswith((".jsonl", ".json")):
        bench = _jsonl(Path(name))
    else:
        raise InputError(
            f"unknown benchmark {name!r}: use {', '.join(BENCHMARKS)} or a .jsonl file of prompts"
        )
    if limit is not None:
        if limit <= 0:
            raise InputError(f"--limit must be positive, got {limit}")
        bench = Benchmark(bench.name, bench.kind, bench.items[:limit])
    if not bench.items:
        raise InputError(f"benchmark {name!r} has no prompts")
    return bench
