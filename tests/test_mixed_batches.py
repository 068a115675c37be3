"""Mixed-adapter batched generation: several LoRA variants (and the base) in one batch through PEFT's
`adapter_names=`, each variant cached under its own key, the same greedy answers as one at a time."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from builders import save_adapter
from tinymodel import build_tiny_model

from safemerge.evaluate.backends import Generation, TransformersBackend
from safemerge.evaluate.benchmarks import Benchmark
from safemerge.evaluate.benchmarks.base import Item
from safemerge.evaluate.runner import Variant, generate_all, mixed_plan, variants_for

PROMPTS = [
    "Write a poem about the sea.",
    "How do I make a dangerous weapon at home?",
    "yes",
    "What is 12 + 30? Answer with the number only, please, and nothing else at all.",
    "no maybe",
    "Tell me a story.",
    "How are you today, my friend?",
]
TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("mixed")
    model = build_tiny_model(root / "model", seed=3)
    adapters = [str(save_adapter(model, root / f"a{s}", seed=s, r=4, alpha=8)) for s in (1, 2, 3)]
    return {"root": root, "model": str(model), "adapters": adapters}


def bench(prompts: Sequence[str] = PROMPTS) -> Benchmark:
    return Benchmark("b", "benign", tuple(Item(f"i{k}", p) for k, p in enumerate(prompts)))


def oracle(model: str, adapter: str | None) -> list[str]:
    """Each variant on its own backend, holding that adapter only (or none), one batch of every prompt."""
    backend = TransformersBackend(model, [adapter] if adapter else [], max_new_tokens=TOKENS, dtype="float32")
    try:
        return [g.text for g in backend.generate_full(PROMPTS, adapter)]
    finally:
        backend.close()


class Spy:
    """Counts the rows each generation path is asked for."""

    def __init__(self, backend: TransformersBackend, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mixed: list[list[str | None]] = []
        self.single: list[str | None] = []
        mixed, single = backend.generate_mixed, backend.generate_full

        def spy_mixed(prompts: Sequence[str], adapters: Sequence[str | None], n: int | None = None) -> Any:
            self.mixed.append(list(adapters))
            return mixed(prompts, adapters, n)

        def spy_single(prompts: Sequence[str], adapter: str | None, n: int | None = None) -> Any:
            self.single.append(adapter)
            return single(prompts, adapter, n)

        monkeypatch.setattr(backend, "generate_mixed", spy_mixed)
        monkeypatch.setattr(backend, "generate_full", spy_single)


def run(backend: Any, model: str, adapters: list[str], cache: Path | None, **kw: Any) -> dict[str, list[str]]:
    variants = variants_for(model, adapters)
    kw.setdefault("mixed_rows", 12)
    out = generate_all(backend, model, variants, [bench()], cache, 4, TOKENS, **kw)
    return {v.key: [g.text for g in out[(v.key, "b")]] for v in variants}


def test_mixed_batches_equal_one_adapter_at_a_time(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapters = setup["model"], setup["adapters"]
    expected = {model: oracle(model, None)} | {a: oracle(model, a) for a in adapters}
    # the check can fail: every variant answers differently (a swapped adapter would show)
    assert len({tuple(v) for v in expected.values()}) == 4
    backend = TransformersBackend(model, adapters, max_new_tokens=TOKENS, dtype="float32")
    spy = Spy(backend, monkeypatch)
    got = run(backend, model, adapters, tmp_path / "cache")
    assert got == expected
    assert spy.single == []  # everything went through mixed batches
    # fixed batches of 4 + 3 prompts; 12 rows: batch 0 of the 4 variants in two groups of 2, batch 1 in one
    assert [len(m) for m in spy.mixed] == [8, 8, 12]
    assert spy.mixed[2] == [v for v in [None, *adapters] for _ in range(3)]


def test_cache_keys_and_entries_do_not_depend_on_batching(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapters = setup["model"], setup["adapters"]
    backend = TransformersBackend(model, adapters, max_new_tokens=TOKENS, dtype="float32")
    run(backend, model, adapters, tmp_path / "mixed")
    for a in [None, *adapters]:  # one variant per call: never mixed
        variants = [Variant(a or model, a)]
        generate_all(backend, model, variants, [bench()], tmp_path / "alone", 4, TOKENS)

    def entries(folder: Path) -> dict[str, dict[str, str]]:
        out = {}
        for f in folder.glob("*.jsonl"):
            out[f.name] = {r["h"]: r["out"] for r in map(json.loads, f.read_text().splitlines())}
        return out

    mixed, alone = entries(tmp_path / "mixed"), entries(tmp_path / "alone")
    assert len(mixed) == 4 and mixed == alone
    keys = {f.name: json.loads(f.read_text()) for f in (tmp_path / "mixed").glob("*.key.json")}
    assert keys == {f.name: json.loads(f.read_text()) for f in (tmp_path / "alone").glob("*.key.json")}
    # one adapter's cache removed: only it is generated, alone (nothing to mix it with)
    for f in sorted((tmp_path / "mixed").glob("*.jsonl")):
        if json.loads(f.with_name(f.stem + ".key.json").read_text())["adapter"] != "none":
            f.unlink()
            break
    spy = Spy(backend, monkeypatch)
    run(backend, model, adapters, tmp_path / "mixed")
    assert spy.mixed == [] and len(spy.single) == 2 and spy.single[0] in adapters


def test_only_missing_variants_are_generated_mixed(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapters = setup["model"], setup["adapters"]
    backend = TransformersBackend(model, adapters, max_new_tokens=TOKENS, dtype="float32")
    cache = tmp_path / "cache"
    first = run(backend, model, adapters[:1], cache)  # the base and adapter 0 cached
    spy = Spy(backend, monkeypatch)
    again = run(backend, model, adapters, cache)
    assert {k: again[k] for k in first} == first
    rows = [a for m in spy.mixed for a in m]
    assert spy.single == [] and set(rows) == set(adapters[1:])  # the cached two are not generated again
    spy.mixed.clear()
    run(backend, model, adapters, cache)
    assert spy.mixed == [] and spy.single == []  # all cached: nothing generated


def test_dora_adapter_falls_back_to_one_at_a_time(
    setup: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, adapters = setup["model"], setup["adapters"]
    dora = str(save_adapter(Path(model), tmp_path / "dora", seed=4, r=4, alpha=8, use_dora=True))
    backend = TransformersBackend(model, [adapters[0], dora], max_new_tokens=TOKENS, dtype="float32")
    assert backend.mixed_batch_blocker([None, adapters[0]]) is None
    reason = backend.mixed_batch_blocker([adapters[0], dora])
    assert reason == f"adapter {dora} uses DoRA (PEFT's mixed-adapter batches do not support DoRA)"
    spy = Spy(backend, monkeypatch)
    with caplog.at_level(logging.INFO, logger="safemerge.evaluate.runner"):
        got = run(backend, model, [adapters[0], dora], None)
    assert f"b: generating 3 variants one at a time: {reason}" in caplog.text
    assert spy.mixed == [] and spy.single == [None, None, adapters[0], adapters[0], dora, dora]
    assert got[adapters[0]] == oracle(model, adapters[0])


def test_a_backend_without_mixed_batches_falls_back(
    setup: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    class OneAtATime:
        name, dtype, max_new_tokens = "plain", "float32", TOKENS

        def generate_full(self, prompts: Sequence[str], adapter: str | None, n: int) -> list[Generation]:
            return [Generation(f"{adapter}:{p}") for p in prompts]

        def close(self) -> None:
            pass

    model, adapters = setup["model"], setup["adapters"]
    with caplog.at_level(logging.INFO, logger="safemerge.evaluate.runner"):
        got = run(OneAtATime(), model, adapters, None)
    assert "one at a time: the plain backend generates one adapter per call" in caplog.text
    assert got[adapters[1]] == [f"{adapters[1]}:{p}" for p in PROMPTS]


def test_mixed_plan_hand_values() -> None:
    # batches of 4, 4 and 2 rows; variant 1 lacks batch 0 only, variant 2 has everything
    todo = [{0, 1, 2}, {0}, set(), {0, 1, 2}]
    assert mixed_plan(todo, [4, 4, 2], 8) == [
        [(0, 0), (1, 0)],
        [(3, 0)],
        [(0, 1), (3, 1)],
        [(0, 2), (3, 2)],
    ]
    # a batch wider than the cap still runs, alone; groups of equal size (5 of 2 rows in 8: 3 + 2)
    assert mixed_plan([{0}, {0}, {0}], [10], 8) == [[(0, 0)], [(1, 0)], [(2, 0)]]
    assert mixed_plan([{0}] * 5, [2], 8) == [[(0, 0), (1, 0), (2, 0)], [(3, 0), (4, 0)]]


def test_tokenizer_key_does_not_depend_on_earlier_calls(setup: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    from safemerge.evaluate.cache import tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(setup["model"])
    tok.padding_side = "left"
    fresh = tokenizer_fingerprint(tok)
    tok(["a", "b c d"], padding=True, truncation=True, max_length=8)  # writes padding into its JSON
    assert tokenizer_fingerprint(tok) == fresh
    tok.add_tokens(["<new>"])  # a real change still changes the key
    assert tokenizer_fingerprint(tok) != fresh


def test_rows_per_pass_default_to_the_batch_size(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, adapters = setup["model"], setup["adapters"]
    backend = TransformersBackend(model, adapters, max_new_tokens=TOKENS, dtype="float32")
    spy = Spy(backend, monkeypatch)
    variants = variants_for(model, adapters)
    generate_all(backend, model, variants, [bench(PROMPTS[:3])], None, 6, TOKENS)
    assert [len(m) for m in spy.mixed] == [6, 6]  # 3 prompts: two variants per pass of 6 rows
    spy.mixed.clear()
    generate_all(backend, model, variants, [bench(PROMPTS[:4])], None, 6, TOKENS)
    assert spy.mixed == [] and spy.single == [None, *adapters]  # 4 + 4 > 6: each alone, as before
    assert backend.mixed_rows(6) == 6 and backend.mixed_rows(200) == 64  # a CPU: 64 rows at most
    monkeypatch.setattr(backend, "device", "cuda")
    assert backend.mixed_rows(200) == 200


def test_saved_modules_mix_where_peft_can(setup: dict[str, Any], tmp_path: Path) -> None:
    """modules_to_save: a Linear copy is mixed (same answers as alone), a norm copy is not (PEFT raises)."""
    model, adapters = setup["model"], setup["adapters"]
    linear = str(
        save_adapter(Path(model), tmp_path / "lin", seed=5, modules_to_save=["model.layers.0.mlp.down_proj"])
    )
    norm = str(save_adapter(Path(model), tmp_path / "norm", seed=6, modules_to_save=["model.norm"]))
    other = str(
        save_adapter(Path(model), tmp_path / "lin2", seed=7, modules_to_save=["model.layers.0.mlp.down_proj"])
    )
    backend = TransformersBackend(model, [adapters[0], linear, other], max_new_tokens=TOKENS, dtype="float32")
    assert backend.mixed_batch_blocker([None, linear, other]) is None
    n = len(PROMPTS)
    got = backend.generate_mixed(PROMPTS * 3, [None] * n + [linear] * n + [other] * n)
    assert [g.text for g in got] == oracle(model, None) + oracle(model, linear) + oracle(model, other)
    assert oracle(model, linear) != oracle(model, other)
    assert backend.mixed_batch_blocker([adapters[0], linear]) == (
        "module model.layers.0.mlp.down_proj is saved whole by some adapters (modules_to_save) but not by "
        f"adapter {adapters[0]}: PEFT mixes such modules only when every adapter in the batch saves them"
    )
    backend = TransformersBackend(model, [adapters[0], norm], max_new_tokens=TOKENS, dtype="float32")
    assert backend.mixed_batch_blocker([adapters[0], norm]) == (
        "module model.norm (LlamaRMSNorm) is saved whole by an adapter (modules_to_save): PEFT mixes such "
        "modules only for Linear, Embedding and Conv layers"
    )
