"""The vLLM backend against a FAKE `vllm` module (vLLM needs a GPU and is not installed here).

The fake is installed in `sys.modules` and enforces the constraints the real engine has, so a run that
passes here does not die on a user's first GPU run:

- `LLM(...)`: `max_model_len` given and ≤ the model's `max_position_embeddings`; the KV cache for
  `max_model_len` tokens fits beside the weights in `gpu_memory_utilization` of a 40 GB card (weights =
  parameter count from config.json × dtype bytes, ~16 GB for an 8B model in bf16; KV per token =
  2 · layers · kv_heads · head_dim · dtype bytes; plus `FAKE_OVERHEAD_BYTES` for vLLM's profiling peak and
  `max_loras` LoRA slots); 1 ≤ `max_loras` ≤ `FAKE_MAX_LORAS`, `max_cpu_loras` ≥ `max_loras`,
  `max_lora_rank` one of vLLM's ranks; no second engine while one is alive or while the distributed state
  of a previous one was not destroyed.
- `LLM.generate(...)`: prompt + max_tokens ≤ max_model_len; a LoRA is loaded on first use and refused
  when it has modules_to_save, DoRA, a rank above max_lora_rank, more than one scaling (rank_pattern /
  alpha_pattern, or modules of other ranks than `r`: real vLLM silently applies lora_alpha / r to every
  module), or tensors that do not fit the model's projections. Returns fake RequestOutputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
from builders import save_adapter
from safetensors import safe_open
from safetensors.torch import save_file
from tinymodel import build_tiny_model
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.engine.lora import LoraAdapter
from safemerge.evaluate import EvalConfig, TransformersBackend, VLLMBackend, evaluate
from safemerge.evaluate.runner import decoding_key

# --- the fake engine ----------------------------------------------------------------------------------

FAKE_CARD_BYTES = 40 * 10**9  # a 40 GB card (A100 40GB)
# vLLM's profiling peak (activations of max_num_batched_tokens), CUDA graphs and non-torch memory: an
# assumption of this fake (vLLM measures it); 2 GB for an 8B model is on the low side of what it logs.
FAKE_OVERHEAD_BYTES = 2 * 10**9
FAKE_MAX_LORAS = 2  # LoRA slots per layer this card has room for beside the model
FAKE_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPE_BYTES = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4}


def projections(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of a Llama-style block (what vLLM's LoRA layers wrap)."""
    h, nh, inter = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    return {
        "q_proj": (h, nh * hd),
        "k_proj": (h, nkv * hd),
        "v_proj": (h, nkv * hd),
        "o_proj": (nh * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def n_params(cfg: dict[str, Any]) -> int:
    per_layer = sum(i * o for i, o in projections(cfg).values())
    embed = cfg["vocab_size"] * cfg["hidden_size"] * (1 if cfg.get("tie_word_embeddings") else 2)
    return embed + cfg["num_hidden_layers"] * per_layer


def kv_bytes_per_token(cfg: dict[str, Any], nbytes: int) -> int:
    nh = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    return 2 * cfg["num_hidden_layers"] * (cfg.get("num_key_value_heads") or nh) * hd * nbytes


@dataclass
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeVLLM:
    """The state behind the fake `vllm` module: engines started, LoRAs loaded, cleanup calls."""

    def __init__(self, with_distributed: bool = True, with_engine_core: bool = False) -> None:
        self.with_distributed, self.with_engine_core = with_distributed, with_engine_core
        self.engines: list[dict[str, Any]] = []  # kwargs (and model) of every engine started
        self.loras: dict[str, str] = {}  # lora name -> the path the engine loaded it from
        self.lora_configs: dict[str, dict[str, Any]] = {}
        self.generated = 0  # prompts generated
        self.live = 0  # engines not yet garbage-collected
        self.parallel_initialized = False  # vLLM's model-parallel / distributed state
        self.calls: list[str] = []  # cleanup functions called

    # -- module ----------------------------------------------------------------------------------------
    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        state = self

        class LLM:
            def __init__(self, model: str, **kw: Any) -> None:
                state.start(self, model, kw)

            def generate(
                self, inputs: Any, params: Any, lora_request: Any = None, use_tqdm: bool = True
            ) -> list[Any]:
                return state.generate(self, inputs, params, lora_request)

        class SamplingParams:
            def __init__(self, temperature: float = 1.0, max_tokens: int = 16) -> None:
                self.temperature, self.max_tokens = temperature, max_tokens

        vllm = ModuleType("vllm")
        vllm.LLM = LLM  # type: ignore[attr-defined]
        vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
        lora, request = ModuleType("vllm.lora"), ModuleType("vllm.lora.request")
        request.LoRARequest = LoRARequest  # type: ignore[attr-defined]
        lora.request = request  # type: ignore[attr-defined]
        vllm.lora = lora  # type: ignore[attr-defined]
        modules = {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request}
        if self.with_distributed:
            dist, ps = ModuleType("vllm.distributed"), ModuleType("vllm.distributed.parallel_state")

            def destroy_model_parallel() -> None:
                state.calls.append("destroy_model_parallel")
                state.parallel_initialized = False

            def destroy_distributed_environment() -> None:
                state.calls.append("destroy_distributed_environment")

            ps.destroy_model_parallel = destroy_model_parallel  # type: ignore[attr-defined]
            ps.destroy_distributed_environment = destroy_distributed_environment  # type: ignore[attr-defined]
            dist.parallel_state = ps  # type: ignore[attr-defined]
            vllm.distributed = dist  # type: ignore[attr-defined]
            modules |= {"vllm.distributed": dist, "vllm.distributed.parallel_state": ps}
        for name, mod in modules.items():
            monkeypatch.setitem(sys.modules, name, mod)

    # -- engine ----------------------------------------------------------------------------------------
    def _died(self) -> None:
        self.live -= 1

    def start(self, engine: Any, model: str, kw: dict[str, Any]) -> None:
        if self.live:
            raise RuntimeError("CUDA out of memory: a previous vLLM engine still holds the GPU")
        if self.with_distributed and self.parallel_initialized:
            raise AssertionError("tensor model parallel group is already initialized")
        cfg = json.loads((Path(model) / "config.json").read_text())
        mml = kw.get("max_model_len")
        if mml is None:
            raise ValueError(f"max_model_len not given: vLLM would use {cfg['max_position_embeddings']}")
        if mml > cfg["max_position_embeddings"]:
            raise ValueError(
                f"max_model_len {mml} > max_position_embeddings {cfg['max_position_embeddings']}"
            )
        dtype = kw.get("dtype", "auto")
        if dtype == "auto":
            dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
            dtype = "bfloat16" if dtype == "float32" else dtype
        nbytes = DTYPE_BYTES[dtype]
        lora_bytes = 0
        if kw.get("enable_lora"):
            max_loras = kw.get("max_loras", 1)
            if not 1 <= max_loras <= FAKE_MAX_LORAS:
                raise ValueError(f"max_loras {max_loras}: this card has room for 1..{FAKE_MAX_LORAS} slots")
            if kw.get("max_cpu_loras") is not None and kw["max_cpu_loras"] < max_loras:
                raise ValueError("max_cpu_loras must be >= max_loras")
            if kw.get("max_lora_rank", 16) not in FAKE_LORA_RANKS:
                raise ValueError(f"max_lora_rank {kw.get('max_lora_rank')} not in {FAKE_LORA_RANKS}")
            per_slot = sum(i + o for i, o in projections(cfg).values()) * kw.get("max_lora_rank", 16)
            lora_bytes = max_loras * per_slot * cfg["num_hidden_layers"] * nbytes
        weights = n_params(cfg) * nbytes
        budget = FAKE_CARD_BYTES * kw.get("gpu_memory_utilization", 0.9)
        budget -= weights + FAKE_OVERHEAD_BYTES + lora_bytes
        per_token = kv_bytes_per_token(cfg, nbytes)
        if mml * per_token > budget:
            raise ValueError(
                f"The model's max seq len ({mml}) is larger than the maximum number of tokens that can "
                f"be stored in KV cache ({int(budget // per_token)})."
            )
        self.live += 1
        self.parallel_initialized = True
        weakref.finalize(engine, self._died)
        engine.kw, engine.cfg, engine.model = kw, cfg, model
        core = SimpleNamespace(shutdown=lambda: self.calls.append("engine_core.shutdown"))
        engine.llm_engine = SimpleNamespace(
            model_config=SimpleNamespace(dtype=getattr(torch, {"half": "float16"}.get(dtype, dtype))),
            model_executor=object(),
            **({"engine_core": core} if self.with_engine_core else {}),
        )
        self.engines.append({"model": model, **kw})
        logging.getLogger("vllm.fake").info("fake engine started")

    def generate(self, engine: Any, inputs: Any, params: Any, lora_request: Any) -> list[Any]:
        mml = engine.kw["max_model_len"]
        for x in inputs:
            n = len(x["prompt_token_ids"])
            if n + params.max_tokens > mml:
                raise ValueError(f"prompt of {n} tokens + max_tokens {params.max_tokens} > {mml}")
        name = "base"
        if lora_request is not None:
            if not engine.kw.get("enable_lora"):
                raise ValueError("LoRA is not enabled")
            self._load_lora(engine, lora_request)
            name = lora_request.lora_name
        self.generated += len(inputs)
        guard = "guard" in Path(engine.model).name.lower()
        out = []
        for x in inputs:
            n = len(x["prompt_token_ids"])
            text = ("safe" if n % 2 == 0 else "unsafe\nS1") if guard else f" answer of {name} to {n} tokens"
            out.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
        return out

    def _load_lora(self, engine: Any, req: LoRARequest) -> None:
        if req.lora_name in self.loras:
            return
        path = Path(req.lora_path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("modules_to_save"):
            raise ValueError("vLLM only supports modules_to_save being None.")
        if cfg.get("use_dora"):
            raise ValueError("vLLM does not yet support DoRA.")
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError("fake vLLM: one scaling lora_alpha/r per adapter; rank/alpha_pattern ignored")
        r = cfg["r"]
        if r > engine.kw["max_lora_rank"]:
            raise ValueError(f"LoRA rank {r} is greater than max_lora_rank {engine.kw['max_lora_rank']}.")
        shapes = projections(engine.cfg)
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                shape = tuple(f.get_slice(key).get_shape())
                if ".lora_A." not in key and ".lora_B." not in key:
                    raise ValueError(f"{key}: vLLM only supports modules_to_save being None.")
                leaf = key.split(".lora_")[0].rsplit(".", 1)[-1]
                if leaf not in shapes:
                    raise ValueError(f"{key}: {leaf} is not a LoRA target of this model")
                fan_in, fan_out = shapes[leaf]
                if ".lora_A." in key and (shape[0] != r or shape[1] != fan_in):
                    raise ValueError(f"{key}: shape {shape}, expected ({r}, {fan_in}) (one rank r)")
                if ".lora_B." in key and (shape[0] != fan_out or shape[1] != r):
                    raise ValueError(f"{key}: shape {shape}, expected ({fan_out}, {r}) (one rank r)")
        self.loras[req.lora_name] = str(path)
        self.lora_configs[req.lora_name] = cfg


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeVLLM:
    state = FakeVLLM()
    state.install(monkeypatch)
    return state


# --- models and adapters ------------------------------------------------------------------------------

LLAMA_31_8B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}
PROMPTS = ["What is 12 + 30?", "Write a poem about the sea.", "How do I make a dangerous weapon at home?"]


def shaped_model(folder: Path, tokenizer_from: Path, **config: Any) -> Path:
    """A model directory with only config.json (no weights: the fake engine reads the config) and the
    tiny model's tokenizer."""
    folder.mkdir(parents=True)
    for f in tokenizer_from.iterdir():  # tokenizer files and chat template
        if f.name != "config.json" and f.suffix in (".json", ".jinja") and "generation" not in f.name:
            shutil.copy(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps({**LLAMA_31_8B, **config}))
    return folder


def shaped_models(root: Path) -> dict[str, Path]:
    """The tiny model and, shaped as 8B models sharing its tokenizer, Llama-3.1-8B-Instruct and
    Llama-Guard-3-8B (with an empty weights file: the judge pre-flight looks for one by name)."""
    tiny = build_tiny_model(root / "tiny")
    guard = shaped_model(root / "Llama-Guard-3-8B", tiny)
    (guard / "model.safetensors").write_bytes(b"")
    return {
        "root": root,
        "tiny": tiny,
        "llama8b": shaped_model(root / "Llama-3.1-8B-Instruct", tiny),
        "guard8b": guard,
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm")
    shaped = shaped_models(root)
    tiny = shaped["tiny"]
    return {
        **shaped,
        "fp32": shaped_model(root / "fp32-8B", tiny, torch_dtype="float32"),
        "other": build_tiny_model(root / "other", hidden=48),
    }


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: Any) -> Path:
    """A PEFT adapter directory written by hand (for models without weights)."""
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **config}
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def lora_8b(
    r: int = 8, v_out: int = 1024, module: str = "self_attn.v_proj", layer: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.lora_A.weight": 0.01 * torch.randn(r, 4096, generator=g),
        "model.layers.0.self_attn.q_proj.lora_B.weight": 0.01 * torch.randn(4096, r, generator=g),
        f"model.layers.{layer}.{module}.lora_A.weight": 0.01 * torch.randn(r, 4096, generator=g),
        f"model.layers.{layer}.{module}.lora_B.weight": 0.01 * torch.randn(v_out, r, generator=g),
    }


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def rendered_lengths(model: Path, conversations: list[list[dict[str, str]]], generation: bool) -> list[int]:
    """Token counts of chat-rendered conversations, computed here independently of the backend."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=generation) for c in conversations
    ]
    return [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def round_up(n: int, k: int = 256) -> int:
    return math.ceil(n / k) * k


# --- 1. max_model_len ---------------------------------------------------------------------------------


def test_engines_get_max_model_len_from_their_prompts(fake: FakeVLLM, models: dict[str, Path]) -> None:
    """Llama-3.1-8B's 131,072-token default does not fit a 40 GB card at 0.85: the generation engine is
    sized from the rendered prompts + max_new_tokens, the Llama Guard engine from the guard prompts + 20."""
    out = models["root"] / "eval-mml"
    cfg = EvalConfig(
        model=str(models["llama8b"]), benchmarks=["harmbench"], out=out, limit=4, backend="vllm",
        gpu_memory_utilization=0.85, judge="llama-guard", judge_model=str(models["guard8b"]), no_cache=True,
    )  # fmt: skip
    metrics = evaluate(cfg)
    assert [Path(e["model"]).name for e in fake.engines] == ["Llama-3.1-8B-Instruct", "Llama-Guard-3-8B"]
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": g["prompt"]}] for g in gens]
    longest = max(rendered_lengths(models["llama8b"], prompts, generation=True))
    assert fake.engines[0]["max_model_len"] == round_up(longest + 256)
    convs = [
        [{"role": "user", "content": g["prompt"]}, {"role": "assistant", "content": g["response"]}]
        for g in gens
    ]
    longest_guard = max(rendered_lengths(models["guard8b"], convs, generation=False))
    assert fake.engines[1]["max_model_len"] == round_up(longest_guard + 20)
    assert metrics[str(models["llama8b"])]["benchmarks"]["harmbench"]["n"] == 4
    assert fake.live == 0  # both engines closed


def test_max_model_len_option(fake: FakeVLLM, models: dict[str, Path], tmp_path: Path) -> None:
    base = ["eval", "--model", str(models["llama8b"]), "--backend", "vllm", "--benchmarks", "harmbench",
            "--limit", "2", "--no-cache"]  # fmt: skip
    res = CliRunner().invoke(app, [*base, "--max-model-len", "2048", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert fake.engines[-1]["max_model_len"] == 2048
    assert "max_model_len: 2048" in (tmp_path / "a" / "eval_config.yaml").read_text()
    n_engines = len(fake.engines)
    for value, words in (("200000", "131072"), ("64", "too short")):
        res = CliRunner().invoke(app, [*base, "--max-model-len", value, "--out", str(tmp_path / value)])
        assert res.exit_code == 2, res.output
        assert words in " ".join(res.output.split())
    assert len(fake.engines) == n_engines  # refused before any engine started


def test_prompt_longer_than_the_context_is_refused_before_the_engine(
    fake: FakeVLLM, models: dict[str, Path]
) -> None:
    long = " ".join(["weapon"] * 300)
    with pytest.raises(InputError, match="context length 256"):
        VLLMBackend(str(models["tiny"]), max_new_tokens=16, prompts=[long])
    assert fake.engines == []
    backend = VLLMBackend(str(models["tiny"]), max_new_tokens=16, prompts=PROMPTS)
    try:
        assert len(backend.generate(PROMPTS, None)) == 3
        with pytest.raises(InputError, match="max_model_len"):  # a prompt it was not sized for
            backend.generate([long], None)
    finally:
        backend.close()


# --- 2. one engine at a time, memory freed between stages ---------------------------------------------


def test_close_frees_the_engine_for_the_next(fake: FakeVLLM, models: dict[str, Path]) -> None:
    first = VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS)
    with pytest.raises(RuntimeError, match="still holds"):  # the fake refuses a second live engine
        VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS)
    first.close()
    assert fake.live == 0 and "destroy_model_parallel" in fake.calls
    assert "destroy_distributed_environment" in fake.calls
    second = VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS)
    second.close()
    second.close()  # twice is harmless


@pytest.mark.parametrize("variant", ["no-distributed", "engine-core"])
def test_close_skips_absent_cleanup_and_shuts_down_v1_core(
    variant: str, monkeypatch: pytest.MonkeyPatch, models: dict[str, Path]
) -> None:
    state = FakeVLLM(with_distributed=variant != "no-distributed", with_engine_core=variant == "engine-core")
    state.install(monkeypatch)
    backend = VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS)
    backend.close()
    assert state.live == 0
    assert ("engine_core.shutdown" in state.calls) == (variant == "engine-core")
    VLLMBackend(str(models["tiny"]), max_new_tokens=8, prompts=PROMPTS).close()


def test_free_accelerator_memory_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from safemerge.evaluate.backends import free_accelerator_memory

    caplog.set_level(logging.DEBUG, logger="safemerge.evaluate.backends")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert free_accelerator_memory("after training") is None
    assert "after training" in caplog.text and "no CUDA device" in caplog.text
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # this process holds CUDA memory
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (10 * 2**30, 40 * 2**30))
    assert free_accelerator_memory("before the judge") == 10 * 2**30
    assert emptied and "before the judge: 10.0 of 40.0 GiB" in caplog.text


def test_engine_start_logs_free_memory_and_its_size(
    fake: FakeVLLM, models: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU as far as the backend can tell
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # ... and CUDA initialised here
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * 2**30, 40 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    VLLMBackend(str(models["llama8b"]), max_new_tokens=64, prompts=PROMPTS).close()
    messages = [r.getMessage() for r in caplog.records]
    before = next(i for i, m in enumerate(messages) if m.startswith("before the vLLM engine"))
    assert "30.0 of 40.0 GiB" in messages[before]
    assert before < messages.index("fake engine started")
    sizing = next(m for m in messages if "max_model_len" in m)
    assert "max_model_len 256" in sizing and "bfloat16" in sizing and "131072" in sizing
    assert any(m.startswith("after closing the vLLM engine") for m in messages[before + 1 :])


# --- 3. adapters vLLM would get silently wrong are normalised -----------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"q_proj": 32}},
        {"use_rslora": True, "rank_pattern": {"q_proj": 2}},
    ],
    ids=["patterns", "rslora"],
)
def test_per_module_scalings_are_folded_into_a_copy(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path, kwargs: dict[str, Any]
) -> None:
    adapter = save_adapter(models["tiny"], tmp_path / "pattern", seed=1, r=4, alpha=8, **kwargs)
    before = digest(adapter)
    backend = VLLMBackend(str(models["tiny"]), [str(adapter)], max_new_tokens=8, prompts=PROMPTS)
    try:
        backend.generate(PROMPTS, str(adapter))
        loaded = Path(fake.loras["adapter0"])
        assert loaded != adapter.resolve() and not loaded.is_relative_to(adapter.resolve())
        cfg = fake.lora_configs["adapter0"]
        assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and not cfg["use_rslora"]
        original, copy = LoraAdapter.load(adapter), LoraAdapter.load(loaded)
        assert original.lora_modules == copy.lora_modules
        assert {copy.rank(m) for m in copy.lora_modules} == {cfg["r"]}
        scalings = {original.scaling(m) for m in original.lora_modules}
        assert len(scalings) > 1 or kwargs.get("use_rslora")  # the case vLLM gets wrong
        for m in original.lora_modules:
            torch.testing.assert_close(
                copy.factors(m).delta(), original.factors(m).delta(), rtol=1e-6, atol=1e-7
            )
    finally:
        backend.close()
    assert not loaded.exists()  # the copy is removed with the engine
    assert digest(adapter) == before  # the input is never modified


def test_plain_adapter_is_passed_as_it_is(fake: FakeVLLM, models: dict[str, Path], tmp_path: Path) -> None:
    adapter = save_adapter(models["tiny"], tmp_path / "plain", seed=1, r=4, alpha=8)
    backend = VLLMBackend(str(models["tiny"]), [str(adapter)], max_new_tokens=8, prompts=PROMPTS)
    try:
        backend.generate(PROMPTS[:1], str(adapter))
        assert Path(fake.loras["adapter0"]) == adapter.resolve()
    finally:
        backend.close()


# --- 4. pre-flight: every adapter checked before any engine starts ------------------------------------


def _refused(fake: FakeVLLM, models: dict[str, Path], adapter: Path, tmp_path: Path) -> str:
    cfg = EvalConfig(
        model=str(models["llama8b"]), adapters=[str(adapter)], benchmarks=["harmbench"], limit=2,
        out=tmp_path / "out", backend="vllm", no_cache=True,
    )  # fmt: skip
    with pytest.raises(InputError) as info:
        evaluate(cfg)
    assert fake.engines == []  # refused before any engine started
    message = str(info.value)
    assert str(adapter) in message
    return message


def test_modules_to_save_is_refused_with_a_way_out(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    tensors = lora_8b() | {"lm_head.weight": torch.zeros(4, 4)}
    adapter = write_adapter(tmp_path / "mts", tensors, modules_to_save=["lm_head"])
    message = _refused(fake, models, adapter, tmp_path)
    assert (
        "modules_to_save" in message
        and "--merge-into-base" in message
        and "--backend transformers" in message
    )
    res = CliRunner().invoke(
        app, ["eval", "--model", str(models["llama8b"]), "--adapter", str(adapter), "--backend", "vllm",
              "--benchmarks", "harmbench", "--limit", "2", "--no-cache", "--out", str(tmp_path / "cli")],
    )  # fmt: skip
    assert res.exit_code == 2 and "modules_to_save" in res.output
    assert fake.engines == []
    # the tensors without the config field (e.g. trained biases) are refused the same way
    quiet = write_adapter(
        tmp_path / "bias", lora_8b() | {"model.layers.0.self_attn.q_proj.bias": torch.zeros(4096)}
    )
    assert "--merge-into-base" in _refused(fake, models, quiet, tmp_path)


def test_modules_to_save_in_the_config_alone_is_refused(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM's PEFT helper refuses any adapter whose config lists modules_to_save, tensors or not: an
    adapter with clean LoRA tensors whose config alone names them is refused before the engine."""
    adapter = write_adapter(tmp_path / "config-only", lora_8b(), modules_to_save=["lm_head"])
    message = _refused(fake, models, adapter, tmp_path)
    assert "modules_to_save ['lm_head']" in message and "--merge-into-base" in message


@pytest.mark.parametrize(
    ("tensors", "words"),
    [
        (lora_8b(v_out=4096), "model.layers.0.self_attn.v_proj.lora_B.weight"),  # v_proj is 4096 -> 1024
        (lora_8b(module="mlp.fc1"), "model.layers.0.mlp.fc1.lora_A.weight"),
        (lora_8b(layer=40), "layer 40"),
    ],
    ids=["shape", "unknown-module", "layer"],
)
def test_adapter_that_does_not_fit_is_refused(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path, tensors: dict[str, torch.Tensor], words: str
) -> None:
    adapter = write_adapter(tmp_path / "bad", tensors)
    assert words in _refused(fake, models, adapter, tmp_path)


def test_adapter_of_another_model_and_rank_above_vllm_max(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    other = save_adapter(models["other"], tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="lora_A"):
        VLLMBackend(str(models["tiny"]), [str(other)], prompts=PROMPTS)
    big = save_adapter(models["tiny"], tmp_path / "big", seed=1, r=1024, alpha=16)
    with pytest.raises(InputError, match="rank 1024"):
        VLLMBackend(str(models["tiny"]), [str(big)], prompts=PROMPTS)
    with pytest.raises(InputError, match=r"adapter_config\.json"):
        VLLMBackend(str(models["tiny"]), [str(tmp_path)], prompts=PROMPTS)
    assert fake.engines == []


def test_fitting_8b_adapter_runs(fake: FakeVLLM, models: dict[str, Path], tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ok", lora_8b())
    cfg = EvalConfig(
        model=str(models["llama8b"]), adapters=[str(adapter)], benchmarks=["harmbench"], limit=2,
        out=tmp_path / "out", backend="vllm", no_cache=True,
    )  # fmt: skip
    metrics = evaluate(cfg)
    assert metrics[str(adapter)]["benchmarks"]["harmbench"]["n"] == 2
    assert fake.loras["adapter0"] == str(adapter.resolve())


# --- 5. the resolved dtype keys the cache -------------------------------------------------------------


def test_dtype_is_resolved_passed_and_keys_the_cache(
    fake: FakeVLLM, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safemerge.evaluate.backends as backends

    def dtype_of(model: str, dtype: str) -> str:
        b = VLLMBackend(str(models[model]), max_new_tokens=8, dtype=dtype, prompts=PROMPTS)
        b.close()
        assert fake.engines[-1]["dtype"] == b.dtype  # the engine is told the dtype the key records
        return str(b.dtype)

    assert dtype_of("llama8b", "float16") == "float16"
    assert dtype_of("llama8b", "auto") == "bfloat16"  # the config's torch_dtype
    monkeypatch.setattr(backends, "cuda_capability", lambda: (8, 0))
    assert dtype_of("fp32", "auto") == "bfloat16"  # vLLM: float32 configs run in bf16 on Ampere+
    monkeypatch.setattr(backends, "cuda_capability", lambda: (7, 5))
    assert dtype_of("fp32", "auto") == "float16"  # ... and in fp16 where bf16 is not supported
    assert dtype_of("llama8b", "auto") == "float16"

    keys = []
    for dtype in ("float16", "bfloat16"):
        b = VLLMBackend(str(models["llama8b"]), max_new_tokens=8, dtype=dtype, prompts=PROMPTS)
        keys.append(decoding_key(b, 8))
        b.close()
    assert keys[0]["dtype"] == "float16" and keys[1]["dtype"] == "bfloat16" and keys[0] != keys[1]


def test_fp16_and_bf16_runs_do_not_share_generations(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    def run(dtype: str, out: str) -> int:
        before = fake.generated
        evaluate(EvalConfig(
            model=str(models["llama8b"]), benchmarks=["harmbench"], limit=3, out=tmp_path / out,
            backend="vllm", dtype=dtype, cache_dir=tmp_path / "cache",
        ))  # fmt: skip
        return fake.generated - before

    assert run("float16", "a") == 3
    assert run("bfloat16", "b") == 3  # not served from the fp16 answers
    assert run("bfloat16", "c") == 0


def test_transformers_backend_keys_its_dtype(models: dict[str, Path]) -> None:
    keys = {
        decoding_key(TransformersBackend(str(models["tiny"]), dtype=d), 8)["dtype"]
        for d in ("float32", "bfloat16")
    }
    assert keys == {"float32", "bfloat16"}


# --- 6. one LoRA slot on the GPU, every adapter in CPU memory -----------------------------------------


def test_one_gpu_lora_slot_and_every_adapter_in_cpu_memory(
    fake: FakeVLLM, models: dict[str, Path], tmp_path: Path
) -> None:
    adapters = [str(save_adapter(models["tiny"], tmp_path / f"a{i}", seed=i, r=4)) for i in range(3)]
    backend = VLLMBackend(str(models["tiny"]), adapters, max_new_tokens=8, prompts=PROMPTS)
    try:
        kw = fake.engines[-1]
        assert kw["enable_lora"] and kw["max_loras"] == 1 and kw["max_cpu_loras"] == 3
        assert kw["max_lora_rank"] == 8  # rank 4 rounded up to a rank vLLM supports
        answers = {a: backend.generate(PROMPTS[:1], a)[0] for a in adapters}
        assert len(set(answers.values())) == 3 and set(fake.loras) == {"adapter0", "adapter1", "adapter2"}
    finally:
        backend.close()
