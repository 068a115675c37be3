"""Generation backends. A backend loads one base model (and all adapters) once and answers one batch
of prompts at a time for a given adapter (None: the base model). Batching, caching and progress are
the runner's job, so every backend behaves the same under resume.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from safemerge.common.errors import InputError
from safemerge.common.packaged import resolve_model

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Backend(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]: ...

    def close(self) -> None: ...


def chat_texts(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Prompts as single-turn chats rendered with the tokenizer's chat template (generation prompt on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the model's tokenizer has no chat template; evaluation applies the chat template")
    return [
        str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
        )
        for p in prompts
    ]


def adapter_rank(adapter: str) -> int:
    """The largest LoRA rank in an adapter's config (r and rank_pattern)."""
    cfg = read_adapter_config(adapter)
    ranks = [int(cfg.get("r", 8))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def read_adapter_config(adapter: str) -> dict[str, Any]:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise InputError(f"adapter {adapter}: adapter_config.json is not a JSON object")
    return data


def check_adapter_fits(model: Any, adapter: str) -> None:
    """Every LoRA tensor must sit on a module of the base model with matching shapes (checked by name)."""
    from safetensors import safe_open

    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(
            f"adapter {adapter}: no adapter_model.safetensors (pickle .bin adapters are not loaded)"
        )
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            stem = key.removeprefix("base_model.model.").split(".lora_")[0]
            mod = modules.get(stem)
            shape = tuple(f.get_slice(key).get_shape())
            if mod is None or not hasattr(mod, "in_features"):
                problems.append(f"{stem}: no such linear module in the base model")
            elif ".lora_A." in key and shape[1] != mod.in_features:
                problems.append(f"{stem}: lora_A has {shape[1]} inputs, the base module {mod.in_features}")
            elif ".lora_B." in key and shape[0] != mod.out_features:
                problems.append(f"{stem}: lora_B has {shape[0]} outputs, the base module {mod.out_features}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(
            f"adapter {adapter} does not fit the base model (trained on another model?): "
            + "; ".join(problems[:3])
            + more
        )


class TransformersBackend:
    """Batched greedy generation with left padding and the KV cache; adapters share one base model."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        adapters: Sequence[str] = (),
        max_new_tokens: int = 256,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        chat: bool = True,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            cuda_bf16 = self.device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if cuda_bf16 else "float32"
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        path = resolve_model(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise InputError(f"cannot load model {model!r}: {exc}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.names: dict[str, str] = {}
        self.model = self._attach(base, list(adapters)).to(self.device).eval()

    def _attach(self, base: Any, adapters: list[str]) -> Any:
        """Load every adapter onto the one base model (PEFT multi-adapter), named adapter0, adapter1, ..."""
        for a in adapters:
            read_adapter_config(a)
            check_adapter_fits(base, a)
        model = base
        for a in adapters:
            model = self._load_adapter(model, a)
        return model

    def _load_adapter(self, model: Any, adapter: str) -> Any:
        from peft import PeftModel

        name = f"adapter{len(self.names)}"
        try:
            if isinstance(model, PeftModel):
                model.load_adapter(adapter, adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, adapter, adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"adapter {adapter} does not load onto model: {exc}") from None
        self.names[adapter] = name
        return model

    def add_adapter(self, adapter: str) -> None:
        """Attach one more adapter to the already loaded base model (no reload)."""
        if adapter in self.names:
            return
        read_adapter_config(adapter)
        base = self.model.get_base_model() if self.names else self.model
        check_adapter_fits(base, adapter)
        self.model = self._load_adapter(self.model, adapter).to(self.device).eval()

    def _eos(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def generate_texts(self, texts: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of already formatted texts (one batch)."""
        import torch
        from transformers import GenerationConfig

        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        config = GenerationConfig(
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self._eos(),
        )
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=config)
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        """Greedy answers of the base model (adapter None) or one loaded adapter."""
        texts = chat_texts(self.tokenizer, prompts) if self.chat else list(prompts)
        if adapter is None:
            if self.names:
                with self.model.disable_adapter():
                    return self.generate_texts(texts)
            return self.generate_texts(texts)
        if adapter not in self.names:
            raise InputError(f"adapter {adapter} was not loaded by this backend")
        self.model.set_adapter(self.names[adapter])
        return self.generate_texts(texts)

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- vLLM --------------------------------------------------------------------------------------------


def vllm_engine_kwargs(
    model: str,
    adapters: Sequence[str],
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Arguments of `vllm.LLM`: LoRA enabled with room for every adapter at once."""
    kw: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "seed": 0,
    }
    if adapters:
        rank = max(adapter_rank(a) for a in adapters)
        supported = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not supported:
            raise InputError(f"LoRA rank {rank} exceeds vLLM's maximum {VLLM_LORA_RANKS[-1]}")
        kw.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=supported[0])
    return kw


def vllm_sampling_kwargs(max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding, as in the transformers backend."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens}


def lora_request_args(adapters: Sequence[str]) -> dict[str, tuple[str, int, str]]:
    """adapter path -> (name, integer id starting at 1, absolute path) for `vllm.lora.request.LoRARequest`."""
    return {a: (f"adapter{i}", i + 1, str(Path(a).resolve())) for i, a in enumerate(adapters)}


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts without extra special tokens (the template already has them)."""
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def parse_vllm_outputs(outputs: Sequence[Any]) -> list[str]:
    """The first completion text of each `RequestOutput`, stripped."""
    return [str(o.outputs[0].text).strip() for o in outputs]


class VLLMBackend:
    """vLLM engine with every adapter registered (multi-LoRA) and tensor parallelism. Optional extra."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        adapters: Sequence[str] = (),
        max_new_tokens: int = 256,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        chat: bool = True,
    ) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise InputError("--backend vllm needs vLLM: pip install 'safemerge[vllm]' (GPU only)") from None
        path = resolve_model(model)
        for a in adapters:
            read_adapter_config(a)
        self.llm = LLM(
            **vllm_engine_kwargs(
                path, adapters, tensor_parallel_size, gpu_memory_utilization, dtype, trust_remote_code
            )
        )
        self.params = SamplingParams(**vllm_sampling_kwargs(max_new_tokens))
        self.loras = lora_request_args(adapters)
        self.tokenizer = self.llm.get_tokenizer()
        self.chat = chat

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        from vllm.lora.request import LoRARequest

        texts = chat_texts(self.tokenizer, prompts) if self.chat else list(prompts)
        lora = None
        if adapter is not None:
            if adapter not in self.loras:
                raise InputError(f"adapter {adapter} was not registered with the vLLM engine")
            lora = LoRARequest(*self.loras[adapter])
        # token ids, not strings: the rendered texts already carry BOS, vLLM would add a second one
        inputs: Any = [{"prompt_token_ids": ids} for ids in token_ids(self.tokenizer, texts)]
        return parse_vllm_outputs(self.llm.generate(inputs, self.params, lora_request=lora, use_tqdm=False))

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
