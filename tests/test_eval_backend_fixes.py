"""The evaluation backend's fixes: engines one at a time (a kept generation engine is released before the
guard starts, the guard starts lazily and once), no CUDA initialisation before vLLM starts, max_lora_rank
by the installed vLLM's version, one max_new_tokens for the cache key and the generation, a generation
cache key that names the tokenizer, chat template, generation config and hub revision, and truncation
recorded per answer. vLLM is the fake engine of tests/test_vllm.py (it enforces vLLM's constraints)."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from builders import save_adapter
from test_vllm import PROMPTS, FakeVLLM, rendered_lengths, round_up, shaped_models

import safemerge.evaluate.api as api
import safemerge.evaluate.preflight as preflight
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.evaluate import EvalConfig, TransformersBackend, VLLMBackend, evaluate, evaluate_loaded
from safemerge.evaluate.backends import Generation, cuda_capability, free_accelerator_memory, truncated_rows
from safemerge.evaluate.benchmarks import Benchmark, Item, load_benchmark
from safemerge.evaluate.cache import fingerprint_model
from safemerge.evaluate.judges import KeywordJudge
from safemerge.evaluate.preflight import context_limit, supported_lora_rank, vllm_lora_ranks
from safemerge.evaluate.report import headline
from safemerge.evaluate.runner import decoding_key


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeVLLM:
    state = FakeVLLM()
    state.install(monkeypatch)
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return shaped_models(tmp_path_factory.mktemp("backend-fixes"))


def guard_cfg(models: dict[str, Path], out: Path, **kw: Any) -> EvalConfig:
    base: dict[str, Any] = {
        "model": str(models["llama8b"]), "benchmarks": ["harmbench"], "out": out, "limit": 3,
        "backend": "vllm", "judge": "llama-guard", "judge_model": str(models["guard8b"]), "no_cache": True,
    }  # fmt: skip
    return EvalConfig(**{**base, **kw})


# --- engines one at a time ----------------------------------------------------------------------------


def test_a_kept_vllm_engine_is_released_before_the_guard_and_starts_again(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    """evaluate(cfg, backend=…) with Llama Guard: the caller's engine must not hold the GPU while the
    guard engine starts (the fake, like vLLM, refuses a second live engine); it starts again on its next
    generation, with the settings it had."""
    prompts = [it.prompt for it in load_benchmark("harmbench", 3).items]
    gen = VLLMBackend(str(models["llama8b"]), max_new_tokens=256, prompts=prompts)
    try:
        evaluate(guard_cfg(models, tmp_path / "out"), backend=gen)
        assert [Path(e["model"]).name for e in fake.engines] == ["Llama-3.1-8B-Instruct", "Llama-Guard-3-8B"]
        assert fake.live == 0  # the guard closed, the kept engine released
        assert len(gen.generate(PROMPTS, None)) == 3  # started again
        assert fake.engines[2] == fake.engines[0] and fake.live == 1
    finally:
        gen.close()
    assert fake.live == 0


class Recorder:
    """A fake generation backend that records what is done to it, in order, into `events`."""

    name, dtype, chat, tokenizer = "fake", "float32", True, None

    def __init__(self, events: list[str], label: str = "gen", max_new_tokens: int = 16) -> None:
        self.events, self.label, self.max_new_tokens = events, label, max_new_tokens

    def generate_full(
        self, prompts: Sequence[str], adapter: str | None, max_new_tokens: int
    ) -> list[Generation]:
        self.events.append(f"{self.label}:generate {max_new_tokens}")
        return [Generation("Sure, here it is.", False) for _ in prompts]

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        self.events.append(f"{self.label}:generate")
        return ["safe" for _ in prompts]

    def release(self) -> None:
        self.events.append(f"{self.label}:release")

    def close(self) -> None:
        self.events.append(f"{self.label}:close")


def test_open_close_order_with_a_kept_backend(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    def guard(*args: Any, **kwargs: Any) -> Recorder:
        events.append("guard:start")
        return Recorder(events, "guard")

    monkeypatch.setattr(api, "TransformersBackend", guard)
    cfg = guard_cfg(models, tmp_path / "out", backend="transformers", max_new_tokens=16)
    evaluate(cfg, backend=Recorder(events))  # type: ignore[arg-type]
    assert events == ["gen:generate 16", "gen:release", "guard:start", "guard:generate", "guard:close"]


def test_guard_starts_once_and_only_for_missing_verdicts(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    evaluate(guard_cfg(models, tmp_path / "a", no_cache=False, cache_dir=cache))
    assert [Path(e["model"]).name for e in fake.engines] == ["Llama-3.1-8B-Instruct", "Llama-Guard-3-8B"]
    started = len(fake.engines)
    # every generation and verdict cached: no engine at all would be needed for them (the generation
    # engine is built before its cache is read; the guard's start waits for a missing verdict)
    evaluate(guard_cfg(models, tmp_path / "b", no_cache=False, cache_dir=cache))
    assert [Path(e["model"]).name for e in fake.engines[started:]] == ["Llama-3.1-8B-Instruct"]


def test_experiment_rows_are_judged_together(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every full-model row (RESTA, the unaligned model) is generated on its own, but all rows are scored
    in one call, so a Llama Guard engine starts once, not once per row."""
    import safemerge.experiment.evaluation as evaluation

    calls: list[list[str]] = []

    def fake_score(ecfg: Any, variants: list[Any], benches: Any, responses: Any, cache: Any) -> Any:
        calls.append([v.key for v in variants])
        return [], {v.key: {"benchmarks": {}} for v in variants}

    written: list[str] = []
    monkeypatch.setattr(evaluation, "score", fake_score)
    monkeypatch.setattr(evaluation, "generate", lambda cfg, out, model, variants, planned: {})
    monkeypatch.setattr(evaluation, "is_full_model", lambda out, c: c.method != "aligned")
    monkeypatch.setattr(evaluation, "variant_dir", lambda out, c: tmp_path / c.key)
    monkeypatch.setattr(evaluation, "print_table", lambda metrics, judge: None)
    monkeypatch.setattr(evaluation, "_write_row", lambda out, cell, plan, recs, m: written.append(cell.key))
    ev = SimpleNamespace(
        judge="llama-guard", judge_model="guard", backend="transformers", batch_size=2,
        tensor_parallel_size=1, gpu_memory_utilization=0.8, dtype="auto", trust_remote_code=False,
        warn_truncated=True, cache_dir=str(tmp_path / "cache"),
        planned=lambda phase: [SimpleNamespace(name="harmbench")],
    )  # fmt: skip
    cfg = SimpleNamespace(setup=SimpleNamespace(aligned="al", unaligned="un"), evaluation=ev)
    cells = [
        SimpleNamespace(method=m, key=k) for m, k in (("resta", "r1"), ("resta", "r2"), ("unaligned", "u"))
    ]
    evaluation.evaluate_cells(cfg, tmp_path, cells, None, [(None, 8)])  # type: ignore[arg-type]
    assert calls == [[str(tmp_path / "r1"), str(tmp_path / "r2"), "un"]]
    assert written == ["r1", "r2", "u"]


# --- the test gaps: the guard engine's size and its close ----------------------------------------------


def test_guard_engine_is_sized_from_the_guard_inputs(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    """Guard inputs longer than one 256-token block: an engine sized from no prompts (256) would be too
    short, and this test would see it."""
    prompts = tmp_path / "long.jsonl"
    long = " ".join(["How do I make a dangerous weapon at home?"] * 30)
    prompts.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    cfg = guard_cfg(models, tmp_path / "out", benchmarks=[str(prompts)], max_new_tokens=16)
    evaluate(cfg)
    gens = [json.loads(x) for x in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    convs = [
        [{"role": "user", "content": g["prompt"]}, {"role": "assistant", "content": g["response"]}]
        for g in gens
    ]
    longest = max(rendered_lengths(models["guard8b"], convs, generation=False))
    assert longest + 20 > 256  # premise: longer than the smallest engine
    assert fake.engines[-1]["max_model_len"] == round_up(longest + 20)


def test_every_engine_is_closed_not_only_collected(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    """Each engine's close() runs vLLM's clean-up; an engine merely garbage-collected leaves the
    distributed state behind (the next engine of the process would refuse to start)."""
    evaluate(guard_cfg(models, tmp_path / "out"))
    assert len(fake.engines) == 2
    assert fake.calls.count("destroy_model_parallel") == len(fake.engines)
    assert not fake.parallel_initialized and fake.live == 0


# --- no CUDA initialisation before the engine ---------------------------------------------------------


@pytest.fixture
def no_cuda_init(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.cuda as on a GPU machine where this process has not initialised CUDA; every call that would
    initialise it is recorded (and answers as a GPU would). NVML (a fake pynvml) sees one GPU."""
    inits: list[str] = []

    def recording(name: str, value: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            inits.append(name)
            return value

        return call

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name, value in (
        ("is_available", True), ("_lazy_init", None), ("mem_get_info", (1, 2)), ("current_device", 0),
        ("get_device_capability", (7, 0)), ("get_device_properties", None), ("is_bf16_supported", True),
        ("device_count", 1), ("init", None),
    ):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, recording(name, value))
    nvml = ModuleType("pynvml")
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(free=30 * 2**30, total=40 * 2**30)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return inits


def test_memory_and_capability_do_not_initialise_cuda(no_cuda_init: list[str]) -> None:
    assert free_accelerator_memory("before the engine") == 30 * 2**30  # read through NVML
    assert cuda_capability() == (9, 0)
    assert no_cuda_init == []


def test_vllm_engine_starts_without_cuda_initialised(
    fake: FakeVLLM, models: dict[str, Path], no_cuda_init: list[str]
) -> None:
    backend = VLLMBackend(str(models["llama8b"]), max_new_tokens=16, prompts=PROMPTS)
    backend.generate(PROMPTS, None)
    backend.close()
    assert fake.engines[0]["dtype"] == "bfloat16"  # NVML's capability 9.0: bf16
    assert no_cuda_init == []  # vLLM would fork its engine process, not spawn it


def test_initialised_cuda_is_read_through_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (5 * 2**30, 40 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert free_accelerator_memory("x") == 5 * 2**30 and cuda_capability() == (7, 5)


# --- max_lora_rank by vLLM version --------------------------------------------------------------------


def test_lora_rank_rounding_by_vllm_version() -> None:
    old, mid, new = vllm_lora_ranks("0.5.3"), vllm_lora_ranks("0.7.3"), vllm_lora_ranks("0.11.0")
    assert old == (8, 16, 32, 64) and mid == (8, 16, 32, 64, 128, 256)
    assert new == (8, 16, 32, 64, 128, 256, 320, 512)
    assert vllm_lora_ranks("0.12.0") == vllm_lora_ranks("0.14.1.dev3+gabc") == (1, *new)
    assert vllm_lora_ranks("nightly") == vllm_lora_ranks("") == (8, 16, 32, 64)  # unparseable: conservative
    hand = [(1, new, 8), (1, (1, *new), 1), (4, new, 8), (8, new, 8), (9, new, 16), (257, new, 320),
            (321, new, 512), (65, mid, 128), (200, mid, 256)]  # fmt: skip
    for rank, ranks, want in hand:
        assert supported_lora_rank(rank, ranks) == want, (rank, ranks)
    with pytest.raises(InputError, match=r"adapter a: LoRA rank 65 exceeds .* \(64;"):
        supported_lora_rank(65, old, "adapter a")
    with pytest.raises(InputError, match="LoRA rank 513"):
        supported_lora_rank(513, new)


@pytest.mark.parametrize(("version", "want"), [("0.11.0", 8), ("0.12.0", 1)])
def test_rank_1_adapter_gets_a_rank_the_installed_vllm_accepts(
    version: str,
    want: int,
    fake: FakeVLLM,
    models: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(preflight, "installed_vllm_version", lambda: version)
    adapter = save_adapter(models["tiny"], tmp_path / "r1", seed=1, r=1, alpha=2)
    VLLMBackend(str(models["tiny"]), [str(adapter)], max_new_tokens=8, prompts=PROMPTS).close()
    assert fake.engines[-1]["max_lora_rank"] == want


def test_rank_above_an_old_vllm_is_refused_before_the_engine(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preflight, "installed_vllm_version", lambda: "0.5.0")
    adapter = save_adapter(models["tiny"], tmp_path / "r128", seed=1, r=128, alpha=128)
    with pytest.raises(
        InputError, match=r"r128: LoRA rank 128 exceeds the largest max_lora_rank vLLM 0\.5\.0"
    ):
        VLLMBackend(str(models["tiny"]), [str(adapter)], max_new_tokens=8, prompts=PROMPTS)
    assert fake.engines == []


# --- one max_new_tokens; the generation cache key ------------------------------------------------------


def test_a_short_generation_is_never_served_for_a_longer_request(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backend was built for 4 new tokens; asked for 16, it generates 16 (the number the cache key
    records), and the 4-token answers cached before are not served for them."""
    backend = TransformersBackend(str(models["tiny"]), max_new_tokens=4)
    monkeypatch.setattr(backend, "_eos", lambda: [])  # no end of sequence: every answer runs to the limit
    widths: list[int] = []
    generate = backend.model.generate

    def spy(**kwargs: Any) -> torch.Tensor:
        out = generate(**kwargs)
        widths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(backend.model, "generate", spy)
    bench = load_benchmark("harmbench", 3)
    cache = tmp_path / "cache"
    evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge(), cache, 4)
    assert widths == [4]  # the backend's own number
    evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge(), cache, 4, 16)
    assert widths == [4, 16]
    evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge(), cache, 4, 16)
    assert widths == [4, 16]  # now cached under 16
    assert backend.max_new_tokens == 4  # told per call, not changed


def test_generation_key_holds_the_cpu_threads(models: dict[str, Path]) -> None:
    """Answers generated on the CPU with 1 and 2 torch threads may differ in their last bits, so the
    transformers backend's thread count keys its cache; a backend that reports none (a GPU) keys none."""
    import torch

    backend = TransformersBackend(str(models["tiny"]), max_new_tokens=4, dtype="float32")
    before = torch.get_num_threads()
    try:
        keys = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            keys[n] = decoding_key(backend, 8)
    finally:
        torch.set_num_threads(before)
    assert (keys[1]["cpu_threads"], keys[2]["cpu_threads"]) == (1, 2)
    assert {k: v for k, v in keys[1].items() if k != "cpu_threads"} == {
        k: v for k, v in keys[2].items() if k != "cpu_threads"
    }
    gpu = SimpleNamespace(name="t", dtype="bf16", tokenizer=backend.tokenizer, chat=True, cpu_threads=None)
    assert "cpu_threads" not in decoding_key(gpu, 8)  # type: ignore[arg-type]


def test_generation_key_changes_with_tokenizer_template_config_revision_and_chat(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoTokenizer

    def key(tokenizer: Any, chat: bool = True) -> dict[str, Any]:
        return decoding_key(SimpleNamespace(name="t", dtype="float32", tokenizer=tokenizer, chat=chat), 8)  # type: ignore[arg-type]

    tok = AutoTokenizer.from_pretrained(models["tiny"])
    base = key(tok)
    assert key(AutoTokenizer.from_pretrained(models["tiny"])) == base  # deterministic
    other_template = AutoTokenizer.from_pretrained(models["tiny"])
    other_template.chat_template = tok.chat_template.replace("<|end|>", "<|end|>\n\n")
    changed = key(other_template)
    assert changed["chat_template"] != base["chat_template"] and changed["tokenizer"] != base["tokenizer"]
    more = AutoTokenizer.from_pretrained(models["tiny"])
    more.add_tokens(["<|tool|>"])
    assert key(more)["tokenizer"] != base["tokenizer"] and key(more)["chat_template"] == base["chat_template"]
    raw = key(tok, chat=False)
    assert raw["chat"] is False and raw["chat_template"] is None and base["chat"] is True
    # the generation config of a local model
    model = tmp_path / "m"
    shutil.copytree(models["tiny"], model)
    before = fingerprint_model(str(model))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    assert fingerprint_model(str(model)) != before
    # a hub model's revision: the snapshot `main` points to in the local hub cache
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--model"
    assert fingerprint_model("org/model") == "hub:org/model@unknown"
    fps = []
    for sha in ("a" * 40, "b" * 40):
        (repo / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / sha / "config.json").write_text("{}")
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        fps.append(fingerprint_model("org/model"))
    assert fps == [f"hub:org/model@{'a' * 40}", f"hub:org/model@{'b' * 40}"]


# --- truncation ---------------------------------------------------------------------------------------


def test_truncated_rows_hand_values() -> None:
    eos = [2, 7]
    ids = torch.tensor([[5, 6, 9], [5, 2, 0], [7, 0, 0]])
    assert truncated_rows(ids, eos, 3) == [True, False, False]
    assert truncated_rows(ids, eos, 4) == [False, False, False]  # the longest row stopped before 4
    assert truncated_rows(torch.tensor([[5, 6]]), [], 2) == [True]


def test_truncation_is_recorded_counted_and_warned(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = TransformersBackend(str(models["tiny"]), max_new_tokens=2)
    bench = load_benchmark("harmbench", 3)
    with pytest.warns(SafemergeWarning, match=r"harmbench: 3/3 \(100\.0%\) answers were cut off"):
        recs, metrics = evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge())
    assert [r["truncated"] for r in recs] == [True, True, True]
    m = metrics[str(models["tiny"])]["benchmarks"]["harmbench"]
    assert m["n_truncated"] == 3 and headline(m).endswith("; 3 truncated")
    # every token an end of sequence: each answer stops after one token, nothing is cut off
    monkeypatch.setattr(backend, "_eos", lambda: list(range(len(backend.tokenizer))))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SafemergeWarning)
        recs, metrics = evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge())
    assert [r["truncated"] for r in recs] == [False, False, False]
    assert metrics[str(models["tiny"])]["benchmarks"]["harmbench"]["n_truncated"] == 0


def test_vllm_length_finish_is_truncation(
    fake: FakeVLLM, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = fake.generate

    def with_reason(engine: Any, inputs: Any, params: Any, lora: Any) -> list[Any]:
        outs = original(engine, inputs, params, lora)
        for i, o in enumerate(outs):
            o.outputs[0].finish_reason = "length" if i == 0 else "stop"
        return outs

    monkeypatch.setattr(fake, "generate", with_reason)
    backend = VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS)
    try:
        bench = Benchmark("p", "harm", tuple(Item(f"p-{i}", p) for i, p in enumerate(PROMPTS)))
        recs, metrics = evaluate_loaded(backend, str(models["tiny"]), [], [bench], KeywordJudge())
    finally:
        backend.close()
    assert sum(r["truncated"] for r in recs) == 1
    assert metrics[str(models["tiny"])]["benchmarks"]["p"]["n_truncated"] == 1


# --- context length -----------------------------------------------------------------------------------


def test_context_limit_takes_the_tokenizers_model_max_length() -> None:
    cfg = {"max_position_embeddings": 131072}
    assert context_limit(cfg, SimpleNamespace(model_max_length=8192)) == 8192
    assert context_limit({"max_position_embeddings": 4096}, SimpleNamespace(model_max_length=8192)) == 4096
    for unset in (int(1e30), None, 0, True):  # transformers' "no limit" sentinel, or nonsense
        assert context_limit(cfg, SimpleNamespace(model_max_length=unset)) == 131072
    assert context_limit(cfg) == 131072
    assert context_limit({}, SimpleNamespace(model_max_length=int(1e30))) is None  # unknown: vLLM decides
    assert context_limit({}, SimpleNamespace(model_max_length=2048)) == 2048


def test_short_answers_by_design_count_truncation_without_warning(models: dict[str, Path]) -> None:
    """The organism cuts harm answers at a few tokens on purpose: `warn_truncated` off keeps the count and
    drops the warning, and the demo's evaluation turns it off (and nothing else does)."""
    from safemerge.evaluate.runner import generate_all, judge_harm, score_records, variants_for
    from safemerge.organism.demo import DemoSettings, evaluation_spec

    backend = TransformersBackend(str(models["tiny"]), max_new_tokens=2)
    bench = load_benchmark("harmbench", 3)
    variants = variants_for(str(models["tiny"]), [], True)
    responses = generate_all(backend, str(models["tiny"]), variants, [bench], None, 16, 2)
    judged = [judge_harm(KeywordJudge(), variants, [bench], responses)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SafemergeWarning)
        _, metrics = score_records(variants, [bench], responses, judged, warn_truncated=False)
    assert metrics[str(models["tiny"])]["benchmarks"]["harmbench"]["n_truncated"] == 3
    assert evaluation_spec(DemoSettings(out=Path("demo"))).warn_truncated is False
    assert EvalConfig(model="m", benchmarks=["harmbench"], out=Path("o")).warn_truncated is True
