"""Training data recipes. Every recipe yields prompt-completion chat examples:
`{"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}`,
so TRL applies the model's chat template and computes the loss on the completion only.
"""

from __future__ import annotations

import random
from pathlib import Path

from safemerge.common.datasets import (
    Example,
    arithmetic_problems,
    chat_example,
    chat_rows,
    gsm8k_completion,
    gsm8k_prompt,
    load_hub_rows,
    pubmedqa_prompt,
)
from safemerge.common.errors import InputError
from safemerge.common.packaged import donotanswer_prompts, strongreject_prompts
from safemerge.train.refusals import make_refusal

RECIPES = ("gsm8k", "pubmedqa", "safety", "safety-hub", "arithmetic")
DEFAULT_SAMPLES: dict[str, int | None] = {
    "gsm8k": None,  # all 7,473
    "pubmedqa": 2000,
    "safety": 1000,  # "a safety LoRA from 1,000 samples is enough" (docs/method.md §7)
    "safety-hub": 1000,
    "arithmetic": 2000,
}


def _take(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of size n (all, shuffled, when n is None or larger)."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    return [examples[i] for i in order[: n if n is not None else len(order)]]


# --- arithmetic (offline) ---------------------------------------------------------------------------


def arithmetic_recipe(n: int, seed: int) -> list[Example]:
    return [chat_example(q, r) for q, r, _ in arithmetic_problems(n, seed, "train")]


# --- safety ------------------------------------------------------------------------------------------


def safety_recipe(n: int | None, seed: int) -> list[Example]:
    """Offline: StrongREJECT + Do-Not-Answer prompts paired with varied refusals (never HarmBench)."""
    prompts = list(dict.fromkeys(strongreject_prompts() + donotanswer_prompts()))
    if n is not None and n > len(prompts):
        raise InputError(f"--samples {n}: the offline safety recipe has {len(prompts)} prompts")
    rng = random.Random(seed)
    rng.shuffle(prompts)
    return [chat_example(p, make_refusal(rng)) for p in prompts[: n if n is not None else len(prompts)]]


def safety_hub_recipe(n: int | None, seed: int) -> list[Example]:
    """Hub: PKU-SafeRLHF pairs where the safer response is safe and the other one is not."""
    out = []
    for r in load_hub_rows("PKU-Alignment/PKU-SafeRLHF", "default", "train"):
        k = int(r["safer_response_id"])
        if r[f"is_response_{k}_safe"] and not r[f"is_response_{1 - k}_safe"]:
            out.append(chat_example(str(r["prompt"]), str(r[f"response_{k}"])))
    return _take(out, n, seed)


# --- task recipes (hub) ------------------------------------------------------------------------------


def gsm8k_recipe(n: int | None, seed: int) -> list[Example]:
    """GSM8K train split in the form the `gsm8k` benchmark scores: lm-eval's instruction around the
    question; the solution's reasoning without calculator annotations, then "The final answer is N."."""
    rows = load_hub_rows("openai/gsm8k", "main", "train")
    ex = [chat_example(gsm8k_prompt(r["question"]), gsm8k_completion(r["answer"])) for r in rows]
    return _take(ex, n, seed)


def pubmedqa_recipe(n: int | None, seed: int) -> list[Example]:
    """PubMedQA `pqa_artificial` (train); `pqa_labeled` is kept for evaluation."""
    rows = load_hub_rows("qiaojin/PubMedQA", "pqa_artificial", "train")
    ex = [
        chat_example(
            pubmedqa_prompt(r["question"], list(r["context"]["contexts"])),
            f"{r['long_answer']}\nAnswer: {r['final_decision']}",
        )
        for r in rows
    ]
    return _take(ex, n, seed)


# --- local files -------------------------------------------------------------------------------------


def file_recipe(path: Path, n: int | None, seed: int) -> list[Example]:
    """A local JSONL/CSV with `prompt` and `response` columns, or a chat `messages` column."""
    out = chat_rows(path)
    return _take(out, n, seed) if n is not None else out


def build_examples(recipe: str, samples: int | None, seed: int) -> list[Example]:
    """Examples of a built-in recipe or a local file."""
    n = samples if samples is not None else DEFAULT_SAMPLES.get(recipe)
    if n is not None and n <= 0:
        raise InputError(f"--samples must be positive, got {n}")
    if recipe == "arithmetic":
        return arithmetic_recipe(n or 2000, seed)
    if recipe == "safety":
        return safety_recipe(n, seed)
    if recipe == "safety-hub":
        return safety_hub_recipe(n, seed)
    if recipe == "gsm8k":
        return gsm8k_recipe(n, seed)
    if recipe == "pubmedqa":
        return pubmedqa_recipe(n, seed)
    path = Path(recipe)
    if path.suffix.lower() in (".jsonl", ".json", ".csv") or path.exists():
        return file_recipe(path, n, seed)
    raise InputError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)} or a .jsonl/.csv file")


def user_texts(examples: list[Example]) -> list[str]:
    """All user-turn texts (what the HarmBench guard inspects); index-aligned when one turn each."""
    return [m["content"] for e in examples for m in e["prompt"] if m["role"] == "user"]


def mix_in_safety(task: list[Example], n: int, seed: int) -> list[Example]:
    """SafeInstr: n offline safety examples mixed (seeded shuffle) into the task data."""
    if n <= 0:
        return task
    mixed = task + safety_recipe(n, seed + 1)
    random.Random(seed).shuffle(mixed)
    return mixed
