"""Calibration data of the data-dependent defences (Safe Delta, Antidote, reset, one-shot).

A defence that weighs parameters by activations or gradients reads them on a handful of safety examples
(harmful prompt → refusal) given as a local JSONL/CSV file in the format `safemerge train` reads: `prompt`
and `response` columns, or a chat `messages` column. Never HarmBench: the leak guard that keeps HarmBench
out of training data keeps it out of calibration data too (docs/defenses.md, "Calibration data").
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from safemerge.common.datasets import Example, chat_rows
from safemerge.common.errors import InputError
from safemerge.common.guard import check_no_harmbench


class CalibrationOptions(BaseModel):
    """The options every data-dependent defence shares (compose them into its option model)."""

    calibration: str | None = Field(
        None, description="JSONL/CSV of safety examples (prompt, response) the defence measures on"
    )
    calibration_samples: int = Field(64, ge=1, description="how many calibration examples to use")
    calibration_max_length: int = Field(256, ge=8, description="tokens per example, prompt included")


def load_calibration(
    path: str | Path | None, n: int, seed: int = 0, option: str = "calibration"
) -> list[Example]:
    """A seeded subset of n examples of the calibration file (all when it has fewer), HarmBench-free.

    `option` is the name the user gave the file under, for the error when it is missing."""
    if path is None:
        raise InputError(f"`{option}` is required: a JSONL/CSV of safety examples (`prompt`, `response`)")
    examples = chat_rows(Path(path))
    check_no_harmbench(
        (m["content"] for e in examples for m in e["prompt"] if m["role"] == "user"), f"{option} {path}"
    )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in sorted(order[:n])]


def encode_calibration(
    tokenizer: Any, examples: list[Example], max_length: int
) -> list[tuple[list[int], int]]:
    """Token ids of each example under the tokenizer's chat template, and where its response starts
    (the loss and the "harmful answer" importance are taken over the response tokens only).

    The response start is the length of the prompt rendered with the generation prompt; an example
    whose prompt alone fills `max_length` keeps one response token, so every example contributes."""
    out = []
    for e in examples:
        head = tokenizer.apply_chat_template(e["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=False)
        p = list(tokenizer(str(head), add_special_tokens=False)["input_ids"])
        ids = list(tokenizer(str(full), add_special_tokens=False)["input_ids"])
        start = min(len(p), max_length - 1, len(ids) - 1)
        out.append((ids[: max(max_length, start + 1)], start))
    return out
