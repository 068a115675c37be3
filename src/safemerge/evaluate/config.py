"""Evaluation configuration (pydantic); YAML keys are the field names."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from safemerge.common.packaged import is_peft_adapter_dir

DEFAULT_GUARD = "meta-llama/Llama-Guard-3-8B"


class EvalConfig(BaseModel):
    """Everything `safemerge eval` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: local dir, hub id, or `smollm2` (packaged)")
    adapters: list[str] = Field(default_factory=list, description="PEFT adapter directories")
    benchmarks: list[str] = Field(description="benchmark names or JSONL files with a `prompt` field")
    out: Path
    judge: Literal["keyword", "llama-guard"] = "keyword"
    judge_model: str = DEFAULT_GUARD
    backend: Literal["transformers", "vllm"] = "transformers"
    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    include_base: bool = True
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = Field(
        None,
        gt=0,
        description="vLLM: context length of the generation engine (None: the longest rendered prompt + "
        "max_new_tokens, rounded up to a multiple of 256); the Llama Guard engine always sizes its own",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path | None = Field(None, description="generation cache (None: $SAFEMERGE_CACHE/generations)")
    no_cache: bool = False
    trust_remote_code: bool = False
    force: bool = False

    @field_validator("model")
    @classmethod
    def _not_an_adapter(cls, model: str) -> str:
        if is_peft_adapter_dir(model):
            raise ValueError(
                f"{model} is a PEFT adapter, not a model: pass the base model as --model and the adapter as "
                f"--adapter {model}"
            )
        return model
