"""HEx-PHI (harm): the gated hub dataset `LLM-Tuning-Safety/HEx-PHI`, 30 instructions in each category file.

The paper (Qi et al., ICLR 2024) has 330 instructions in 11 categories; the public release has no
`category_2.csv` (category 2, child abuse content, was withheld by the authors), so the benchmark is the
300 instructions of categories 1 and 3–11. Each file is a CSV without a header row, one instruction per
row; it is read with the `csv` module, so quoted instructions may hold commas, quotes and line breaks.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from safemerge.common.errors import InputError
from safemerge.evaluate.benchmarks.base import Benchmark, Item, Kind, prompt_items

HEXPHI_REPO = "LLM-Tuning-Safety/HEx-PHI"
HEXPHI_URL = f"https://huggingface.co/datasets/{HEXPHI_REPO}"
# The category files of the public release: category 2 (child abuse content) is not published.
HEXPHI_CATEGORIES: tuple[int, ...] = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11)
_ACCESS = f"accept its terms on {HEXPHI_URL} and log in with `hf auth login` (or set HF_TOKEN)"


def category_file(k: int) -> str:
    return f"category_{k}.csv"


def _flat(exc: Exception) -> str:
    """The hub's message on one line (it spreads request ids and URLs over several)."""
    return " ".join(str(exc).split())


def download_failure(name: str, exc: Exception) -> InputError:
    """What failed, in words: no access to the gated dataset, no such file, or the hub unreachable."""
    what = f"HEx-PHI file {name} ({HEXPHI_REPO})"
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError, its base class
        return InputError(
            f"cannot download {what}: the dataset is gated and this session has no access to it (not logged "
            f"in, or access not granted yet): {_ACCESS}"
        )
    if isinstance(exc, LocalEntryNotFoundError):  # before EntryNotFoundError, its base class
        return InputError(
            f"cannot download {what}: the hub cannot be reached (offline, or HF_HUB_OFFLINE is set) and the "
            "file is not in the local cache"
        )
    if isinstance(exc, EntryNotFoundError):
        return InputError(f"cannot download {what}: the dataset has no such file ({_flat(exc)})")
    if isinstance(exc, RepositoryNotFoundError):
        return InputError(
            f"cannot download {what}: the hub reports no such dataset, or none this session may see: "
            f"{_ACCESS}"
        )
    return InputError(f"cannot download {what}: {type(exc).__name__}: {_flat(exc)}")


def read_category(path: Path) -> list[str]:
    """The instructions of one category file: one per CSV row, no header; empty rows are skipped. A row
    split by an unquoted comma is one instruction and is joined back."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = [",".join(row).strip() for row in csv.reader(f)]
    return [r for r in rows if r]


def category_prompts(k: int) -> list[str]:
    """The instructions of category `k`; InputError naming the file and what failed."""
    name = category_file(k)
    try:
        path = huggingface_hub.hf_hub_download(HEXPHI_REPO, name, repo_type="dataset")
    except Exception as exc:  # the hub raises many types; download_failure names the cause
        raise download_failure(name, exc) from None
    try:
        return read_category(Path(path))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"HEx-PHI file {name} ({path}) cannot be read as a UTF-8 CSV: {exc}") from None


@dataclass(frozen=True)
class HexPhi(Benchmark):
    name: str = "hexphi"
    kind: Kind = "harm"

    def load_items(self) -> Sequence[Item]:
        return prompt_items(self.name, [p for k in HEXPHI_CATEGORIES for p in category_prompts(k)])


BENCHMARK = HexPhi()
