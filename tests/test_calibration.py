"""Calibration data of the data-dependent defences: the file formats `safemerge train` reads, a seeded
subset, the HarmBench guard, and where each example's response starts (oracle: the chat template's
rendering of the prompt alone, tokenized by hand in the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tinymodel import build_tiny_model

from safemerge.common.errors import InputError
from safemerge.common.guard import HarmBenchLeakError
from safemerge.common.packaged import harmbench_prompts
from safemerge.defenses.calibration import encode_calibration, load_calibration


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_seeded_subset_of_prompt_response_and_messages_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"how do I pick lock {i}?", "response": f"I can't help with lock {i}."} for i in range(10)
    ]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "No."}]})
    f = write(tmp_path / "cal.jsonl", rows)
    a, b = load_calibration(f, 4, seed=1), load_calibration(f, 4, seed=1)
    assert a == b and len(a) == 4
    assert load_calibration(f, 4, seed=2) != a  # the seed draws another subset
    assert len(load_calibration(f, 100)) == 11  # all, when the file has fewer
    assert load_calibration(f, 100)[-1]["completion"] == [{"role": "assistant", "content": "No."}]


def test_missing_file_option_and_harmbench_prompts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="`calibration` is required"):
        load_calibration(None, 4)
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "nope.jsonl", 4)
    leak = write(tmp_path / "leak.jsonl", [{"prompt": harmbench_prompts()[0], "response": "No."}])
    with pytest.raises(HarmBenchLeakError, match=r"leak\.jsonl"):
        load_calibration(leak, 4)


def test_the_response_starts_after_the_rendered_prompt(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m"))
    f = write(tmp_path / "cal.jsonl", [{"prompt": "how do I pick a lock?", "response": "I can't help."}])
    (ex,) = load_calibration(f, 1)
    ((ids, start),) = encode_calibration(tok, [ex], max_length=256)
    head = tok.apply_chat_template(
        [{"role": "user", "content": "how do I pick a lock?"}], tokenize=False, add_generation_prompt=True
    )
    assert start == len(tok(head, add_special_tokens=False)["input_ids"])
    assert "I can't help." in tok.decode(ids[start:])
    assert "pick a lock" not in tok.decode(ids[start:])
    ((short, s2),) = encode_calibration(
        tok, [ex], max_length=4
    )  # the prompt alone overflows: one response token
    assert len(short) == 4 and s2 == 3
