"""HEx-PHI (harm): 11 category CSV files (one instruction per line) in a gated hub repository."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from safemerge.common.errors import InputError
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items

HEXPHI_REPO = "LLM-Tuning-Safety/HEx-PHI"
HEXPHI_CATEGORIES = 11


def category_prompts(k: int) -> list[str]:
    """The instructions of category file `k`; InputError explaining the gate when it cannot be fetched."""
    try:
        path = huggingface_hub.hf_hub_download(HEXPHI_REPO, f"category_{k}.csv", repo_type="dataset")
    except Exception as exc:  # the hub raises many types: offline, gated, missing
        raise InputError(
            f"cannot download HEx-PHI ({HEXPHI_REPO}, category_{k}.csv): {type(exc).__name__}: {exc}. "
            f"HEx-PHI is gated: accept its terms on https://huggingface.co/datasets/{HEXPHI_REPO} and log "
            "in with `hf auth login` (or set HF_TOKEN)."
        ) from None
    return [line.strip().strip('"') for line in Path(path).read_text(encoding="utf-8").splitlines()]


@dataclass(frozen=True)
class HexPhi(Benchmark):
    name: str = "hexphi"
    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        prompts = [p for k in range(1, HEXPHI_CATEGORIES + 1) for p in category_prompts(k)]
        return prompt_items(self.name, [p for p in prompts if p])


BENCHMARK = HexPhi()
