"""Test-wide settings: everything runs offline, on the CPU, deterministically."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def smollm2_models() -> Path:
    """The session cache's `models/` folder with the packaged SmolLM2 converted in it (once per session:
    the conversion takes ~25 s); a test that builds an organism in a cache of its own links it there."""
    from safemerge.common.packaged import cache_root, smollm2_dir

    smollm2_dir()
    return cache_root() / "models"
