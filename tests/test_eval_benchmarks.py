"""Benchmark loading (hub ones through fixtures), hub error messages, the generation cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from safemerge.common.errors import InputError
from safemerge.evaluate import benchmarks as bm
from safemerge.evaluate.benchmarks import directharm4, gsm8k, pubmedqa
from safemerge.evaluate.cache import Cache
from safemerge.evaluate.runner import fixed_batches
from safemerge.train import recipes


def test_offline_benchmarks() -> None:
    a = bm.load_benchmark("arithmetic")
    assert a.kind == "utility" and len(a.items) == bm.ARITHMETIC_EVAL_SIZE
    assert a.items[0].reference == str(eval(a.items[0].prompt.removeprefix("What is ").rstrip("?")))
    h = bm.load_benchmark("harmbench", limit=10)
    assert h.kind == "harm" and len(h.items) == 10
    assert bm.load_benchmark("strongreject").items[0].prompt.startswith("Can you explain")
    o = bm.load_benchmark("overrefusal")
    assert o.kind == "benign" and len(o.items) == 40
    with pytest.raises(InputError, match="--limit"):
        bm.load_benchmark("harmbench", limit=0)


def test_hub_benchmarks_from_fixture_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    rows: dict[str, list[dict[str, Any]]] = {
        "openai/gsm8k": [{"question": "Q?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}],
        "qiaojin/PubMedQA": [
            {
                "pubid": 7,
                "question": "Does X?",
                "context": {"contexts": ["A.", "B."]},
                "final_decision": "maybe",
            }
        ],
        "vfleaking/DirectHarm4": [{"instruction": "harmful thing"}],
    }
    for module in (gsm8k, pubmedqa, directharm4):  # each hub benchmark reads the hub through common.datasets
        monkeypatch.setattr(module, "load_hub_rows", lambda name, config, split: rows[name])
    g = bm.load_benchmark("gsm8k")
    assert g.items[0].reference == "4" and "Problem: Q?\n" in g.items[0].prompt  # lm-eval's instruction
    p = bm.load_benchmark("pubmedqa")
    assert p.items[0].reference == "maybe" and "Context: A. B." in p.items[0].prompt
    assert "yes, no or maybe" in p.items[0].prompt
    assert bm.load_benchmark("directharm4").items[0].prompt == "harmful thing"


def test_gated_hub_dataset_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def refuse(*a: Any, **k: Any) -> None:
        raise ConnectionError("401 Client Error: access to dataset is restricted (gated)")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(InputError, match=r"gated.*hf auth login"):
        recipes.load_hub_rows("vfleaking/DirectHarm4", None, "test")
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*a: Any, **k: Any) -> None:
        raise GatedRepoError(
            "401 Client Error: Cannot access gated repo", response=SimpleNamespace(headers={}, request=None)
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(InputError, match=r"HEx-PHI file category_1\.csv.*gated.*HF_TOKEN"):
        bm.load_benchmark("hexphi")


def test_jsonl_benchmark(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(
        json.dumps({"prompt": "bad 1", "category": "x"}) + "\n\n" + json.dumps({"prompt": "bad 2"}) + "\n"
    )
    b = bm.load_benchmark(str(f))
    assert b.kind == "harm" and [i.prompt for i in b.items] == ["bad 1", "bad 2"]
    with pytest.raises(InputError, match=r"unknown benchmark 'mine\.txt'"):
        bm.load_benchmark("mine.txt")


def test_cache_survives_a_cut_line(tmp_path: Path) -> None:
    c = Cache(tmp_path, {"k": 1})
    c.put_many(["a", "b"], ["A", "B"])
    assert c.path is not None
    with c.path.open("a") as f:
        f.write('{"h": "trunc')  # a kill in the middle of a write
    c2 = Cache(tmp_path, {"k": 1})
    assert c2.get("a") == "A" and c2.get("b") == "B"
    c2.put_many(["c"], ["C"])
    assert Cache(tmp_path, {"k": 1}).get("c") == "C"
    assert Cache(tmp_path, {"k": 2}).get("a") is None  # other settings, other entries
    assert Cache(None, {"k": 1}).get("a") is None


def test_fixed_batches_cover_all_sorted_by_length() -> None:
    prompts = ["ccc", "a", "bb", "dddd", "e"]
    batches = fixed_batches(prompts, 2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert batches == [[1, 4], [2, 0], [3]]
    # as few batches as the size allows, of equal size: 199 at 128 -> 100 + 99, not 128 + 71
    sizes = [len(b) for b in fixed_batches([str(i) for i in range(199)], 128)]
    assert sizes == [100, 99]
    assert [len(b) for b in fixed_batches(["x"] * 128, 128)] == [128]
    assert fixed_batches([], 8) == []


def test_scoring_lives_on_the_benchmark() -> None:
    item = bm.Item("g-0", "Q?", "72")
    gsm = bm.get_benchmark("gsm8k")
    assert gsm.score(item, "so 70 + 2 = 72. The final answer is 72") == {
        "extracted_strict": "72",
        "extracted_flexible": "72",
        "correct": True,
        "correct_flexible": True,
    }
    records = [gsm.score(item, text) for text in ("The final answer is 72", "it is 72", "#### 72")]
    assert gsm.metrics(records, "judge") == {
        "kind": "utility",
        "n": 3,
        "n_correct": 1,
        "accuracy": 1 / 3,
        "accuracy_strict": 1 / 3,
        "n_correct_flexible": 3,
        "accuracy_flexible": 1.0,
        "n_unparsed_strict": 2,
    }
    pub, yes = bm.get_benchmark("pubmedqa"), bm.Item("p-0", "Q?", "yes")
    records = [pub.score(yes, text) for text in ("Answer: yes", "No.", "I cannot tell.")]
    assert [r["correct"] for r in records] == [True, False, False]
    assert pub.metrics(records, "judge")["n_unparsed"] == 1
    # a benchmark built in code (the organism's validation sets) is scored with the defaults
    plain = bm.Benchmark("val-arith", "utility", (item,))
    assert plain.score(item, "The answer is 72.") == {"extracted": "72", "correct": True}
    assert plain.metrics([{"correct": True}], "judge") == {
        "kind": "utility",
        "n": 1,
        "n_correct": 1,
        "accuracy": 1.0,
    }
    harm = bm.Benchmark("val-harm", "harm", (bm.Item("h-0", "bad?"),))
    verdicts = [{"verdict": v} for v in ("unsafe", "safe", "malformed")]
    assert harm.metrics(verdicts, "j")["harmful_rate"] == 0.5


def test_loaded_benchmarks_keep_their_class() -> None:
    loaded = bm.load_benchmark("arithmetic", limit=3)
    assert type(loaded) is type(bm.get_benchmark("arithmetic")) and len(loaded.items) == 3
    assert loaded.head(2).items == loaded.items[:2]
