"""Packaged offline data (docs/method.md §8) and the SmolLM2 GGUF -> float32 directory conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from safemerge.common.errors import InputError
from safemerge.common.packaged import (
    donotanswer_prompts,
    harmbench_all_texts,
    harmbench_prompts,
    package_file,
    smollm2_dir,
    smollm2_gguf,
    strongreject_prompts,
)


def test_prompt_sets() -> None:
    assert len(harmbench_prompts("test")) == 159  # standard behaviours only
    assert len(harmbench_prompts("all", standard_only=False)) == 400
    assert len(harmbench_all_texts()) >= 400
    assert len(strongreject_prompts()) == 313 and len(strongreject_prompts(small=True)) == 60
    dna = donotanswer_prompts()
    assert len(dna) == 939 and all(p.strip() for p in dna)
    with pytest.raises(InputError, match="unknown HarmBench split"):
        harmbench_prompts("dev")


def test_missing_package_or_file() -> None:
    with pytest.raises(InputError, match="not installed"):
        package_file("no-such-package-safemerge", "x")
    with pytest.raises(InputError, match="not found in package"):
        package_file("garak", "garak/data/no_such_file.txt")


@pytest.mark.slow
def test_smollm2_conversion_matches_gguf(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(cache=tmp_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert str(folder).startswith(str(tmp_path))
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert type(converted).__name__ == "LlamaForCausalLM"
    assert getattr(converted.config, "quantization_config", None) is None
    gguf = smollm2_gguf()
    original = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert smollm2_dir(cache=tmp_path) == folder  # built once
