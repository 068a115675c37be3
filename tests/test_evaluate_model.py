"""`safemerge.evaluate_model`: the adapters of a PeftModel held in memory evaluated by name, with the same
generations, verdicts and metrics as `evaluate` gives on the same adapters saved to disk with PEFT's
`save_pretrained`; the model is left as it was found; bad input is an InputError."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import tiny_chat_setup
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import safemerge
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.evaluate import EvalConfig, evaluate, inmemory

BENCH = ["arithmetic", "harmbench"]
FAST = {"limit": 3, "max_new_tokens": 8}  # batch_size 16: two variants per mixed batch of 6 prompts


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_chat_setup(tmp_path_factory.mktemp("evalmodel"))


def loaded(setup: dict[str, Path]) -> PeftModel:
    """The aligned model (float32, as `evaluate` loads it on a CPU) with the task adapter as "default"
    and the safety adapter as "safety"."""
    base = AutoModelForCausalLM.from_pretrained(setup["aligned"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, setup["task"], adapter_name="default")
    model.load_adapter(setup["safety"], adapter_name="safety")
    return model


def keyed(records_file: Path, base: str) -> dict[tuple[str, str, str], tuple[str, str]]:
    """(variant, benchmark, prompt id) -> (response, verdict), the base model's row keyed "base"."""
    out = {}
    for line in records_file.read_text().splitlines():
        r = json.loads(line)
        variant = "base" if r["variant"] == base else r["variant"]
        out[(variant, r["benchmark"], r["id"])] = (r["response"], r["verdict"])
    return out


def without_adapter(metrics: dict[str, Any], base: str) -> dict[str, Any]:
    """metrics with the base row keyed "base" and no `adapter` field (a path on disk, a name in memory)."""
    return {
        ("base" if k == base else k): {f: x for f, x in v.items() if f != "adapter"}
        for k, v in metrics.items()
    }


def test_in_memory_equals_saved_adapters(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Oracle: the adapters saved with `save_pretrained` and evaluated from disk by `evaluate` (its own
    model load, adapters named adapter0.. on it) give the same greedy answers, verdicts and metrics
    (with the reference comparison) as the same adapters evaluated by name in memory; the merged
    adapter that `add_safemerge_adapter` added is one of them."""
    model = loaded(setup)
    tokenizer = AutoTokenizer.from_pretrained(setup["aligned"])
    safemerge.add_safemerge_adapter(model, str(setup["unaligned"]), allow_partial=True)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)  # "default" in saved/, the others in saved/<name>/
    mixed: list[list[str | None]] = []
    original = inmemory.LoadedModelBackend.generate_mixed

    def spy(self: Any, prompts: Any, adapters: Any, n: Any = None) -> Any:
        mixed.append(list(adapters))
        return original(self, prompts, adapters, n)

    monkeypatch.setattr(inmemory.LoadedModelBackend, "generate_mixed", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafemergeWarning)
        memory = safemerge.evaluate_model(
            model, tokenizer, benchmarks=BENCH, reference="default", out=tmp_path / "mem", **FAST, quiet=True
        )
        disk = evaluate(
            EvalConfig(
                model=str(setup["aligned"]),
                benchmarks=BENCH,
                out=tmp_path / "disk",
                no_cache=True,
                adapters={
                    "default": str(saved),
                    "safety": str(saved / "safety"),
                    "safemerged": str(saved / "safemerged"),
                },
                reference="default",
                **FAST,
            )
        )
    assert list(memory) == ["base", "default", "safety", "safemerged"]
    assert {a for rows in mixed for a in rows} == {None, "default", "safety", "safemerged"}  # by PEFT name
    mem_records = keyed(tmp_path / "mem" / "generations.jsonl", "base")
    disk_records = keyed(tmp_path / "disk" / "generations.jsonl", str(setup["aligned"]))
    assert mem_records == disk_records
    assert without_adapter(memory, "base") == without_adapter(disk, str(setup["aligned"]))
    assert json.loads((tmp_path / "mem" / "metrics.json").read_text()) == memory
    assert not (tmp_path / "mem" / "eval_config.yaml").exists()  # nothing to rerun from
    # the oracle is not vacuous: the base model and the two trained adapters answer differently
    answers = {v: tuple(r for (k, _, _), (r, _) in sorted(mem_records.items()) if k == v) for v in memory}
    assert len({answers["base"], answers["default"], answers["safety"]}) == 3
    assert memory["safemerged"]["vs_reference"]["reference"] == "default"


def test_plain_model_and_named_variants(setup: dict[str, Path], tmp_path: Path) -> None:
    """A transformers model (no PeftModel) is the one variant "base", with the answers of a PeftModel's
    base row (its adapters disabled); a mapping names the variants; no generation is cached on disk."""
    tokenizer = AutoTokenizer.from_pretrained(setup["aligned"])
    plain = AutoModelForCausalLM.from_pretrained(setup["aligned"], dtype=torch.float32)
    cache = tmp_path / "cache"
    kw: dict[str, Any] = {"benchmarks": ["arithmetic"], "quiet": True, "cache_dir": cache, **FAST}
    only = safemerge.evaluate_model(plain, tokenizer, out=tmp_path / "plain", **kw)
    peft = safemerge.evaluate_model(loaded(setup), tokenizer, {"task": "default"}, out=tmp_path / "p", **kw)
    assert list(only) == ["base"] and list(peft) == ["base", "task"]
    assert keyed(tmp_path / "plain" / "generations.jsonl", "base") == {
        k: v for k, v in keyed(tmp_path / "p" / "generations.jsonl", "base").items() if k[0] == "base"
    }
    assert not cache.exists() or not any(cache.rglob("*.jsonl"))


def test_model_left_as_found(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluated in eval mode; afterwards the train mode, every requires_grad, the active adapter and the
    caller's tokenizer are as before, also when the evaluation fails after generating."""
    model = loaded(setup)
    tokenizer = AutoTokenizer.from_pretrained(setup["aligned"])
    model.set_adapter("safety")  # makes "safety" trainable, as PEFT does
    model.requires_grad_(False)  # a pattern set_adapter does not make: one trainable tensor of "default"
    next(p for n, p in model.named_parameters() if "lora_A.default" in n).requires_grad_(True)
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(grads.values()) and not all(grads.values())
    seen: list[bool] = []
    model.get_base_model().register_forward_pre_hook(lambda m, a: seen.append(m.training))
    side = tokenizer.padding_side
    # one adapter alone: generated one variant at a time, through PEFT's set_adapter
    kw: dict[str, Any] = {"benchmarks": ["arithmetic"], "quiet": True, "include_base": False, **FAST}
    safemerge.evaluate_model(model, tokenizer, ["default"], **kw)
    assert seen and not any(seen)  # every forward in eval mode

    def judging_fails(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("judging failed")

    for run in ("after a run", "after a failure"):
        assert model.active_adapter == "safety", run
        assert all(m.training for m in model.modules()), run
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads, run
        assert tokenizer.padding_side == side, run
        monkeypatch.setattr(inmemory, "score", judging_fails)
        seen.clear()
        with pytest.raises(RuntimeError, match="judging failed"):
            safemerge.evaluate_model(model, tokenizer, ["default"], **kw)
        assert seen  # it failed after generating


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ({"adapters": ["safty"]}, r"no adapter 'safty' \(did you mean 'safety'\?\); its adapters: "
                                      r"default, safety"),
        ({"adapters": ["nothing-like-it"]}, r"no adapter 'nothing-like-it'; its adapters: default, safety"),
        ({"plain": True, "adapters": ["default"]}, r"PEFT adapters, but the model is a LlamaForCausalLM"),
        ({"template": None}, "the tokenizer has no chat template"),
        ({"reference": "defualt"}, r"reference 'defualt' is none .*did you mean 'default'"),
        ({"adapters": {"base": "default"}}, "two variants are named base"),
        ({"adapters": [], "include_base": False}, "nothing to evaluate"),
        ({"merged": True}, r"merged into the base weights .*unmerge_adapter"),
        ({"judge": "keywrod"}, "invalid options: .*keywrod"),
        ({"benchmarks": "arithmetic"}, "give a list of names"),
        ({"adapters": "default"}, "give a list of adapter names"),
        ({"plain": True, "hf_adapter": True}, r"adapters loaded through transformers \(model.load_adapter\)"),
    ],
)  # fmt: skip
def test_bad_input_is_input_error(setup: dict[str, Path], case: dict[str, Any], match: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(setup["aligned"])
    if "template" in case:
        tokenizer.chat_template = case.pop("template")
    if case.pop("plain", False):
        model: Any = AutoModelForCausalLM.from_pretrained(setup["aligned"], dtype=torch.float32)
    else:
        model = loaded(setup)
    if case.pop("hf_adapter", False):
        model.load_adapter(str(setup["task"]))
    if case.pop("merged", False):
        model.merge_adapter()
    kw: dict[str, Any] = {"benchmarks": ["arithmetic"], "quiet": True, **FAST, **case}
    with pytest.raises(InputError, match=match):
        safemerge.evaluate_model(model, tokenizer, **kw)


def test_model_judge_cached_generations_not(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model judge (the tiny model standing in for Llama Guard) runs after the model is released and
    restored: its outputs are cached under cache_dir/judge, the generations nowhere on disk."""
    calls: list[str] = []
    for name in ("release", "restore"):
        original = getattr(inmemory.LoadedModelBackend, name)

        def spy(self: Any, _name: str = name, _original: Any = original) -> None:
            calls.append(_name)
            _original(self)

        monkeypatch.setattr(inmemory.LoadedModelBackend, name, spy)
    cache = tmp_path / "cache"
    metrics = safemerge.evaluate_model(
        loaded(setup), AutoTokenizer.from_pretrained(setup["aligned"]), ["default"], benchmarks=["harmbench"],
        judge="llama-guard", judge_model=str(setup["aligned"]), cache_dir=cache, quiet=True, **FAST,
    )  # fmt: skip
    assert metrics["default"]["benchmarks"]["harmbench"]["judge"] == f"llama-guard ({setup['aligned']})"
    assert calls == ["release", "restore"]
    assert list((cache / "judge").glob("*.jsonl"))
    assert [p for p in cache.rglob("*.jsonl") if p.parent != cache / "judge"] == []


def test_exported_lazily_at_the_package_top() -> None:
    import subprocess
    import sys

    code = (
        "import sys, safemerge; assert 'safemerge.evaluate.inmemory' not in sys.modules; "
        "assert 'evaluate_model' in safemerge.__all__ and 'evaluate_model' in dir(safemerge); "
        "from safemerge.evaluate.inmemory import evaluate_model; "
        "assert safemerge.evaluate_model is evaluate_model; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
