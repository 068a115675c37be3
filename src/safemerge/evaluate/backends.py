"""Generation backends. A backend loads one base model (and all adapters) once and answers one batch
of prompts at a time for a given adapter (None: the base model). Batching, caching and progress are
the runner's job, so every backend behaves the same under resume.

Every backend reports the dtype it really generates in (`dtype`, never "auto"): it keys the generation
cache. `generate_full` also says, per answer, whether it was cut off at the token limit (`Generation`).
Engines are started one at a time: `close()` frees the accelerator memory a backend holds for good,
`release()` frees it until the next generation (the model is then loaded again), and
`free_accelerator_memory` logs what is free before each engine starts.

Nothing here initialises CUDA in this process before an engine exists (free memory and the compute
capability are read through NVML): vLLM starts its engine process by fork while CUDA is not initialised,
and by spawn otherwise, which re-runs a user's script without an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from safemerge.common.errors import InputError
from safemerge.common.packaged import resolve_model
from safemerge.engine.lora import lora_tensor_shapes
from safemerge.evaluate.preflight import (
    VLLM_LORA_RANKS,
    choose_max_model_len,
    context_limit,
    kv_bytes_per_token,
    model_config,
    prepare_adapters,
    resolve_vllm_dtype,
    supported_lora_rank,
    vllm_lora_ranks,
)
from safemerge.evaluate.stacked_lora import BASE_ROW, stacked_lora, stacked_lora_blocker

__all__ = [
    "VLLM_LORA_RANKS",
    "Backend",
    "Generation",
    "TransformersBackend",
    "VLLMBackend",
    "free_accelerator_memory",
]

log = logging.getLogger(__name__)
GIB = 2**30
# Rows per mixed-adapter pass on a CPU: wider passes are compute-bound there and cost in proportion to
# their rows, so stacking variants gains nothing (measured, docs/benchmarks.md)
CPU_MIXED_ROWS = 64


@dataclass(frozen=True)
class Generation:
    """One answer: its text and whether generation stopped at the token limit instead of at an end of
    sequence (`truncated`; None where the backend cannot tell)."""

    text: str
    truncated: bool | None = None


class Backend(Protocol):
    name: str
    dtype: str  # the dtype it generates in, resolved (keys the generation cache)

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]: ...

    def close(self) -> None: ...


def _nvml_query(read: str) -> Any:
    """Read `memory` ((free, total) bytes) or `capability` ((major, minor)) of the first visible GPU
    through NVML, which never initialises CUDA in this process; None without pynvml (nvidia-ml-py, a vLLM
    dependency), an NVML driver or a visible GPU. CUDA_VISIBLE_DEVICES is honoured (index or UUID)."""
    try:
        import pynvml  # lazy: optional, present wherever vLLM is
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = "0" if visible is None else visible.split(",")[0].strip()
    if not first or first.startswith("-"):
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: no GPU to report
        return None
    try:
        if first.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        else:
            handle = pynvml.nvmlDeviceGetHandleByUUID(first)
        if read == "memory":
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return int(info.free), int(info.total)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception as exc:  # an NVML error is no reason to stop an evaluation
        log.debug("NVML could not read the GPU's %s: %s", read, exc)
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def free_accelerator_memory(stage: str) -> int | None:
    """Collect garbage, empty the CUDA cache and log the free GPU memory, naming `stage` (e.g. "after
    training", "before the vLLM engine for M"). Returns the free bytes of the current device; None when
    no GPU memory can be read (it then only logs, at DEBUG level, that there is nothing to free). Call it
    between stages that each hold a model on the GPU (training, generation, the judge): a vLLM engine
    refuses to start, and the transformers backend runs out of memory, while a previous stage's tensors
    are cached.

    Where this process has not initialised CUDA it holds no CUDA memory, and the free memory is read
    through NVML instead of torch.cuda, so that CUDA stays uninitialised (vLLM then forks its engine
    process instead of spawning it: module docstring)."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
    else:
        memory = _nvml_query("memory")
        if memory is None:
            log.debug("%s: no CUDA device in use (CUDA not initialised here, none seen by NVML)", stage)
            return None
        free, total = memory
    log.info("%s: %.1f of %.1f GiB GPU memory free", stage, free / GIB, total / GIB)
    return int(free)


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (args[0].contiguous(), *args[1:])


def contiguous_head_input(model: Any) -> Any:
    """Make the LM head's input contiguous before its matrix product.

    During generation transformers hands the head the last position only, `hidden[:, -1:, :]`: a
    [batch, 1, hidden] view whose batch stride is the whole sequence. With a frozen weight (every base
    model under a PEFT adapter) torch's matmul then fails to fold it into one matrix product and runs a
    batched product against the weight expanded per sequence (pytorch/pytorch#186148): at batch 200 and
    SmolLM2's 49,152-token vocabulary that copies 11 GB and took 10 s per prefill instead of 0.02 s
    (measured, docs/benchmarks.md). A copy of [batch, 1, hidden] costs nothing in comparison. Returns
    the hook's handle (None without an output embedding), to remove it from a model the caller owns."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        return head.register_forward_pre_hook(_contiguous_input)
    return None


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
    path = Path(adapter) / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(
            f"adapter {adapter}: no adapter_model.safetensors (pickle .bin adapters are not loaded)"
        )
    modules = dict(model.named_modules())
    problems = []
    for _, stem, which, shape in lora_tensor_shapes(path):
        mod = modules.get(stem)
        if mod is None or not hasattr(mod, "in_features"):
            problems.append(f"{stem}: no such linear module in the base model")
        elif which == "A" and shape[1] != mod.in_features:
            problems.append(f"{stem}: lora_A has {shape[1]} inputs, the base module {mod.in_features}")
        elif which == "B" and shape[0] != mod.out_features:
            problems.append(f"{stem}: lora_B has {shape[0]} outputs, the base module {mod.out_features}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(
            f"adapter {adapter} does not fit the base model (trained on another model?): "
            + "; ".join(problems[:3])
            + more
        )


def default_device() -> str:
    """Where the transformers backend runs: the GPU when torch sees one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def transformers_dtype(dtype: str, device: str | None = None) -> str:
    """The dtype the transformers backend generates in on `device` (default: `default_device()`): `auto`
    is bfloat16 on a GPU that supports it, else float32."""
    if dtype != "auto":
        return dtype
    device = device or default_device()
    cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return "bfloat16" if cuda_bf16 else "float32"


class TransformersBackend:
    """Batched greedy generation with left padding and the KV cache; adapters share one base model."""

    name = "transformers"
    # How a mixed-adapter batch runs: "stacked" (one LoRA product per layer, `stacked_lora`; PEFT's
    # own path wherever `stacked_lora_blocker` objects) or "peft" (PEFT's `adapter_names=`, a loop over
    # the batch's adapters in every layer). benchmarks/bench_batched_eval.py times both.
    mixed_impl = "stacked"

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
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: slow to import

        self.device = device or default_device()
        self.dtype = transformers_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.chat = chat
        path = resolve_model(model)
        free_accelerator_memory(f"before loading {model} (transformers)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            base = AutoModelForCausalLM.from_pretrained(
                path, dtype=getattr(torch, self.dtype), trust_remote_code=trust_remote_code
            )
        except OSError as exc:
            raise InputError(f"cannot load model {model!r}: {exc}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        contiguous_head_input(base)
        self.names: dict[str, str] = {}
        self._released = False
        self.model = self._attach(base, list(adapters)).to(self.device).eval()

    @property
    def cpu_threads(self) -> int | None:
        """Torch's CPU threads where this backend generates on the CPU (None elsewhere): they key the
        generation cache (`decoding_key`)."""
        return torch.get_num_threads() if str(self.device).startswith("cpu") else None

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
        from peft import PeftModel  # lazy: peft adds ~2.4 s to every command's start

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
        return [g.text for g in self.generate_batch(texts, max_new_tokens)]

    def generate_batch(
        self,
        texts: Sequence[str],
        max_new_tokens: int | None = None,
        adapter_names: Sequence[str] | None = None,
    ) -> list[Generation]:
        """Greedy continuations of already formatted texts (one batch), each with whether it was cut off
        at `max_new_tokens` (default: the backend's). `adapter_names` (one per text, PEFT's names or
        `BASE_ROW`) runs each row with its own adapter: a mixed-adapter batch (`_mixed`)."""
        from transformers import GenerationConfig  # lazy: slow to import

        self._reacquire()
        limit = max_new_tokens or self.max_new_tokens
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(
            self.device
        )
        eos = self._eos()
        config = GenerationConfig(
            max_new_tokens=limit,
            do_sample=False,
            use_cache=True,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        with torch.inference_mode(), self._mixed(adapter_names) as mixed:
            out = self.model.generate(**enc, generation_config=config, **mixed)
        new = out[:, enc["input_ids"].shape[1] :]
        texts_out = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = truncated_rows(new, eos, limit)
        return [Generation(t.strip(), c) for t, c in zip(texts_out, cut, strict=True)]

    @contextlib.contextmanager
    def _mixed(self, adapter_names: Sequence[str] | None) -> Iterator[dict[str, Any]]:
        """The extra `generate` arguments for a batch whose rows run `adapter_names` (None: the active
        adapter for every row): none within the stacked-LoRA path (`stacked_lora`, one LoRA product per
        layer), which `mixed_impl = "peft"` or a `stacked_lora_blocker` turns off, else PEFT's own
        `adapter_names=`."""
        if adapter_names is None:
            yield {}
            return
        names = list(adapter_names)
        why = "mixed_impl is peft" if self.mixed_impl == "peft" else stacked_lora_blocker(self.model, names)
        if why is not None:
            log.debug("mixed batch through PEFT's adapter_names: %s", why)
            yield {"adapter_names": names}
            return
        with stacked_lora(self.model, names):
            yield {}

    def generate_full(
        self, prompts: Sequence[str], adapter: str | None, max_new_tokens: int | None = None
    ) -> list[Generation]:
        """Greedy answers of the base model (adapter None) or one loaded adapter, with `max_new_tokens`
        (default: the backend's) and whether each was cut off there."""
        texts = chat_texts(self.tokenizer, prompts) if self.chat else list(prompts)
        if adapter is None:
            if self.names:
                with self.model.disable_adapter():
                    return self.generate_batch(texts, max_new_tokens)
            return self.generate_batch(texts, max_new_tokens)
        if adapter not in self.names:
            raise InputError(f"adapter {adapter} was not loaded by this backend")
        self.model.set_adapter(self.names[adapter])
        return self.generate_batch(texts, max_new_tokens)

    def mixed_batch_blocker(self, adapters: Sequence[str | None]) -> str | None:
        """Why rows of these adapters (None: the base model) cannot share one batch, or None when they
        can. PEFT's mixed-adapter batches (`adapter_names=`) need LoRA adapters on one unmerged base,
        without DoRA (PEFT raises for DoRA and merged layers); modules_to_save and trainable tokens are
        mixed by PEFT too. Every adapter of this backend sits on its one base model by construction."""
        for a in dict.fromkeys(x for x in adapters if x is not None):
            if a not in self.names:
                return f"adapter {a} was not loaded by this backend"
            cfg = read_adapter_config(a)
            kind = str(cfg.get("peft_type", "LORA")).upper()
            if kind != "LORA":
                return f"adapter {a} is a {kind} adapter (PEFT mixes LoRA adapters only)"
            if cfg.get("use_dora"):
                return f"adapter {a} uses DoRA (PEFT's mixed-adapter batches do not support DoRA)"
        if any(getattr(m, "merged", False) for m in self.model.modules() if hasattr(m, "merged_adapters")):
            return "an adapter is merged into the base weights (PEFT mixes unmerged adapters only)"
        return self._saved_module_blocker([a for a in dict.fromkeys(adapters) if a is not None])

    def _saved_module_blocker(self, adapters: Sequence[str]) -> str | None:
        """A module an adapter saves whole (modules_to_save) that PEFT cannot split by rows: it mixes such
        modules only where they are Linear, Embedding or Conv1d/2d/3d (a TypeError at the first forward
        else) and only where every adapter in the batch has its own copy (a KeyError else)."""
        from peft.utils.other import ModulesToSaveWrapper  # lazy: peft adds seconds to every start

        mixable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        for name, module in self.model.named_modules():
            if not isinstance(module, ModulesToSaveWrapper):
                continue
            where = f"module {name.removeprefix('base_model.model.')}"
            if not isinstance(module.original_module, mixable):
                kind = type(module.original_module).__name__
                return (
                    f"{where} ({kind}) is saved whole by an adapter (modules_to_save): PEFT mixes such "
                    "modules only for Linear, Embedding and Conv layers"
                )
            lacking = [a for a in adapters if self.names[a] not in module.modules_to_save]
            if lacking:
                return (
                    f"{where} is saved whole by some adapters (modules_to_save) but not by adapter "
                    f"{lacking[0]}: PEFT mixes such modules only when every adapter in the batch saves them"
                )
        return None

    def mixed_rows(self, batch_size: int) -> int:
        """Rows per mixed-adapter pass: `batch_size`, at most `CPU_MIXED_ROWS` on a CPU."""
        return min(batch_size, CPU_MIXED_ROWS) if str(self.device).startswith("cpu") else batch_size

    def generate_mixed(
        self, prompts: Sequence[str], adapters: Sequence[str | None], max_new_tokens: int | None = None
    ) -> list[Generation]:
        """Greedy answers of one batch whose row i runs `adapters[i]` (None: the base model), through
        PEFT's mixed-adapter batch: the base weights once per step, each adapter's LoRA product on its own
        rows. Check `mixed_batch_blocker` first."""
        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        if not self.names:  # no PeftModel: every row is the base model's
            if any(a is not None for a in adapters):
                raise InputError(f"adapter {next(a for a in adapters if a)} was not loaded by this backend")
            return self.generate_full(prompts, None, max_new_tokens)
        for a in adapters:
            if a is not None and a not in self.names:
                raise InputError(f"adapter {a} was not loaded by this backend")
        texts = chat_texts(self.tokenizer, prompts) if self.chat else list(prompts)
        names = [BASE_ROW if a is None else self.names[a] for a in adapters]
        return self.generate_batch(texts, max_new_tokens, adapter_names=names)

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        """Greedy answers of the base model (adapter None) or one loaded adapter."""
        return [g.text for g in self.generate_full(prompts, adapter)]

    def release(self) -> None:
        """Free the accelerator memory the model holds (moved to the CPU) until the next generation, so
        another engine (the judge's) can start; a no-op on the CPU."""
        if getattr(self, "model", None) is None or not str(self.device).startswith("cuda"):
            return
        self.model = self.model.to("cpu")
        self._released = True
        free_accelerator_memory("after releasing the transformers backend")

    def _reacquire(self) -> None:
        if self.model is None:
            raise RuntimeError("the transformers backend was closed")
        if getattr(self, "_released", False):
            free_accelerator_memory("before loading the transformers backend again")
            self.model = self.model.to(self.device)
            self._released = False

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        free_accelerator_memory("after closing the transformers backend")


def truncated_rows(new_ids: torch.Tensor, eos_ids: Sequence[int], max_new_tokens: int) -> list[bool]:
    """Per row of generated token ids (the batch padded to its longest row): True when the row has no end
    of sequence and reached `max_new_tokens`, i.e. generation was cut off rather than finished. A row
    that finished early holds an end-of-sequence id (the padding after it is written only after one)."""
    if new_ids.shape[1] < max_new_tokens:
        return [False] * new_ids.shape[0]
    ended = torch.isin(new_ids, torch.tensor(list(eos_ids), dtype=new_ids.dtype, device=new_ids.device))
    return [not bool(row.any()) for row in ended]


# --- vLLM --------------------------------------------------------------------------------------------


def vllm_engine_kwargs(
    model: str,
    adapters: Sequence[str] = (),
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    *,
    max_model_len: int | None = None,
    lora_ranks: Sequence[int] | None = None,
    supported_ranks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Arguments of `vllm.LLM`: the context length and dtype the backend resolved, and with adapters LoRA
    with one GPU slot (one adapter is active per call: `max_loras` 1) and every adapter kept in CPU memory
    (`max_cpu_loras`), `max_lora_rank` the smallest of the installed vLLM's accepted ranks
    (`supported_ranks`, default `vllm_lora_ranks()`) that holds the largest adapter rank (`lora_ranks`,
    else read from the adapters' configs)."""
    kw: dict[str, Any] = {
        "model": model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "seed": 0,
    }
    if max_model_len is not None:
        kw["max_model_len"] = max_model_len
    if adapters:
        ranks = list(lora_ranks) if lora_ranks is not None else [adapter_rank(a) for a in adapters]
        kw.update(
            enable_lora=True,
            max_loras=1,
            max_cpu_loras=len(adapters),
            max_lora_rank=supported_lora_rank(max(ranks), supported_ranks),
        )
    return kw


def vllm_sampling_kwargs(max_new_tokens: int) -> dict[str, Any]:
    """Greedy decoding, as in the transformers backend."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens}


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of rendered texts without extra special tokens (the template already has them)."""
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def lora_request_args(
    adapters: Sequence[str], paths: Sequence[str] | None = None
) -> dict[str, tuple[str, int, str]]:
    """adapter as given -> (name, integer id from 1, absolute directory the engine loads: `paths`, else the
    adapter itself) for `vllm.lora.request.LoRARequest`."""
    dirs = paths if paths is not None else adapters
    return {
        a: (f"adapter{i}", i + 1, str(Path(d).resolve()))
        for i, (a, d) in enumerate(zip(adapters, dirs, strict=True))
    }


def parse_vllm_outputs(outputs: Sequence[Any]) -> list[Generation]:
    """The first completion of each `RequestOutput`: its text, stripped, and whether vLLM stopped it at
    the token limit (`finish_reason` "length"; "stop" is an end of sequence or stop string; None where
    the output has no finish_reason)."""
    out = []
    for o in outputs:
        first = o.outputs[0]
        reason = getattr(first, "finish_reason", None)
        out.append(Generation(str(first.text).strip(), None if reason is None else reason == "length"))
    return out


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The model's Hugging Face tokenizer (the one vLLM uses), loaded before any engine starts."""
    from transformers import AutoTokenizer  # lazy: slow to import

    try:
        return AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {model!r}: {exc}") from None


def cuda_capability() -> tuple[int, int] | None:
    """The GPU's compute capability: from torch where this process has initialised CUDA, else through
    NVML (which leaves CUDA uninitialised, so vLLM can fork its engine); None when neither sees a GPU."""
    if torch.cuda.is_initialized():
        major, minor = torch.cuda.get_device_capability()
        return int(major), int(minor)
    capability = _nvml_query("capability")
    return None if capability is None else (int(capability[0]), int(capability[1]))


def _engine_dtype(llm: Any) -> str | None:
    """The dtype a started engine reports (llm.llm_engine.model_config.dtype), if it reports one."""
    dtype = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _shutdown_vllm_engine(llm: Any) -> None:
    """Stop what a vLLM engine runs besides itself, each step only where this vLLM version has it: V1's
    engine-core process (`llm.llm_engine.engine_core.shutdown()`), V0's model executor (`del
    llm.llm_engine.model_executor`, as vLLM's maintainers advise for freeing its GPU memory)."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as exc:  # a failed shutdown must not hide the run's result or its error
            log.warning("vLLM engine core shutdown failed: %s", exc)
    if engine is not None and hasattr(engine, "model_executor"):
        with contextlib.suppress(AttributeError):
            del engine.model_executor


def _release_vllm_state() -> None:
    """vLLM's documented clean-up after `del llm` (github.com/vllm-project/vllm issues 6544, 18806):
    `cleanup_dist_env_and_memory()` where this vLLM has it, else `destroy_model_parallel()`,
    `destroy_distributed_environment()` and `torch.distributed.destroy_process_group()`; each call is
    skipped when absent."""
    try:
        from vllm.distributed import parallel_state  # lazy: vLLM is an optional GPU dependency
    except ImportError:
        parallel_state = None
    cleanup = getattr(parallel_state, "cleanup_dist_env_and_memory", None)
    steps = (
        [cleanup]
        if callable(cleanup)
        else [
            getattr(parallel_state, name, None)
            for name in ("destroy_model_parallel", "destroy_distributed_environment")
        ]
    )
    for step in steps:
        if callable(step):
            try:
                step()
            except Exception as exc:  # clean-up is best effort: the next engine's start reports the rest
                log.warning("vLLM clean-up %s failed: %s", getattr(step, "__name__", step), exc)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        with contextlib.suppress(AssertionError, RuntimeError):
            torch.distributed.destroy_process_group()


class VLLMBackend:
    """vLLM engine with every adapter registered (multi-LoRA) and tensor parallelism. Optional extra.

    Before the engine starts (src/safemerge/evaluate/preflight.py): every adapter is checked (exit code 2
    naming the adapter and tensor) and, where vLLM would apply the wrong scaling, normalised into a
    temporary copy; `max_model_len` is the given one, or the longest rendered prompt of `prompts` + the new
    tokens rounded up to 256; "auto" dtype is resolved as vLLM resolves it and passed explicitly. `close()`
    shuts the engine down and frees its GPU memory, so the next engine can start; `release()` does the
    same until the next generation, which starts the engine again with the same settings.
    """

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
        *,
        max_model_len: int | None = None,
        prompts: Sequence[str] | None = None,
        tokenizer: Any = None,
    ) -> None:
        try:
            import vllm  # lazy: vLLM is an optional GPU dependency
        except ImportError:
            raise InputError("--backend vllm needs vLLM: pip install 'safemerge[vllm]' (GPU only)") from None
        self.model, self.chat, self.max_new_tokens = model, chat, max_new_tokens
        self.llm: Any = None
        self._closed = False
        self._workdir = Path(tempfile.mkdtemp(prefix="safemerge-vllm-"))
        try:
            cfg = model_config(model)
            ranks = vllm_lora_ranks()
            prepared = prepare_adapters(adapters, model, cfg, self._workdir, ranks)
            self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, trust_remote_code)
            self.max_model_len = self._context_length(cfg, prompts, max_model_len)
            self.dtype = resolve_vllm_dtype(dtype, cfg, cuda_capability())
            kwargs = vllm_engine_kwargs(
                resolve_model(model),
                [p.source for p in prepared],
                tensor_parallel_size,
                gpu_memory_utilization,
                self.dtype,
                trust_remote_code,
                max_model_len=self.max_model_len,
                lora_ranks=[p.rank for p in prepared],
                supported_ranks=ranks,
            )
            self._log_start(cfg, prepared, max_model_len, kwargs)
            self._kwargs = kwargs
            self._start()
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        self.dtype = _engine_dtype(self.llm) or self.dtype
        self._sampling = vllm.SamplingParams
        self.loras = lora_request_args([p.source for p in prepared], [p.path for p in prepared])

    def _start(self) -> None:
        from vllm import LLM  # lazy: vLLM is an optional GPU dependency

        free_accelerator_memory(f"before the vLLM engine for {self.model}")
        self.llm = LLM(**self._kwargs)

    def _texts(self, prompts: Sequence[str]) -> list[str]:
        return chat_texts(self.tokenizer, prompts) if self.chat else list(prompts)

    def _context_length(self, cfg: dict[str, Any], prompts: Sequence[str] | None, given: int | None) -> int:
        if given is None and prompts is None:
            raise InputError(
                f"vLLM engine for {self.model}: give max_model_len, or the prompts to size it from"
            )
        lengths = [len(ids) for ids in token_ids(self.tokenizer, self._texts(prompts or []))]
        longest = max(lengths, default=0)
        return choose_max_model_len(
            longest, self.max_new_tokens, context_limit(cfg, self.tokenizer), given, f"model {self.model}"
        )

    def _log_start(
        self, cfg: dict[str, Any], prepared: Sequence[Any], given: int | None, kwargs: dict[str, Any]
    ) -> None:
        per_token = kv_bytes_per_token(cfg, self.dtype)
        kv = f", KV cache {per_token * self.max_model_len / GIB:.2f} GiB per sequence" if per_token else ""
        source = "given" if given is not None else f"longest prompt + {self.max_new_tokens} new tokens"
        log.info(
            "vLLM engine for %s: max_model_len %d (%s; the model's context: %s)%s, dtype %s",
            self.model, self.max_model_len, source, context_limit(cfg, self.tokenizer), kv, self.dtype,
        )  # fmt: skip
        for p in prepared:
            if p.normalised:
                log.info("adapter %s: per-module scalings folded into a copy for vLLM (%s)", p.source, p.path)
        if prepared:
            log.info(
                "LoRA: %d adapter(s), max_loras 1, max_cpu_loras %d, max_lora_rank %d",
                len(prepared), kwargs["max_cpu_loras"], kwargs["max_lora_rank"],
            )  # fmt: skip

    def generate_full(
        self, prompts: Sequence[str], adapter: str | None, max_new_tokens: int | None = None
    ) -> list[Generation]:
        """Greedy answers with `max_new_tokens` (default: the one the engine was sized for; a larger one
        must still fit max_model_len), each with whether vLLM cut it off there. Starts the engine again
        after `release()`."""
        from vllm.lora.request import LoRARequest  # lazy: vLLM is an optional GPU dependency

        if self.llm is None:
            if self._closed:
                raise RuntimeError(f"the vLLM engine for {self.model} was closed")
            self._start()  # released: started again with the same settings
        limit = max_new_tokens or self.max_new_tokens
        lora = None
        if adapter is not None:
            if adapter not in self.loras:
                raise InputError(f"adapter {adapter} was not registered with the vLLM engine")
            lora = LoRARequest(*self.loras[adapter])
        # token ids, not strings: the rendered texts already carry BOS, vLLM would add a second one
        ids = token_ids(self.tokenizer, self._texts(prompts))
        longest = max((len(x) for x in ids), default=0)
        if longest + limit > self.max_model_len:
            raise InputError(
                f"a prompt of {longest} tokens + {limit} new tokens does not fit max_model_len "
                f"{self.max_model_len} of the vLLM engine for {self.model} (vLLM would refuse it or cut its "
                "answer): size the engine from these prompts, or give a larger --max-model-len"
            )
        inputs: Any = [{"prompt_token_ids": x} for x in ids]
        params = self._sampling(**vllm_sampling_kwargs(limit))
        return parse_vllm_outputs(self.llm.generate(inputs, params, lora_request=lora, use_tqdm=False))

    def generate(self, prompts: Sequence[str], adapter: str | None) -> list[str]:
        return [g.text for g in self.generate_full(prompts, adapter)]

    def release(self) -> None:
        """Shut the engine down and free its GPU memory, keeping its settings (and the normalised adapter
        copies): the next generation starts it again. For another engine (the judge's) to start."""
        self._stop()
        free_accelerator_memory(f"after releasing the vLLM engine for {self.model}")

    def _stop(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            _shutdown_vllm_engine(llm)
            del llm  # the last reference: the engine and its GPU memory go with it
            gc.collect()
            _release_vllm_state()

    def close(self) -> None:
        """Shut the engine down, drop it, run vLLM's clean-up, remove the normalised adapter copies and
        free the GPU memory (safe to call twice)."""
        self._closed = True
        self._stop()
        shutil.rmtree(self._workdir, ignore_errors=True)
        free_accelerator_memory(f"after closing the vLLM engine for {self.model}")
