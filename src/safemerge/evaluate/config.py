"""Evaluation configuration (pydantic); YAML keys are the field names."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from safemerge.common.packaged import is_peft_adapter_dir
from safemerge.evaluate.judge_plugins import DEFAULT_GUARD, check_judge_value

__all__ = ["DEFAULT_GUARD", "EvalConfig"]


class EvalConfig(BaseModel):
    """Everything `safemerge eval` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: local dir, hub id, or `smollm2` (packaged)")
    adapters: list[str] = Field(default_factory=list, description="PEFT adapter directories")
    benchmarks: list[str] = Field(description="benchmark names or JSONL files with a `prompt` field")
    out: Path
    judge: str | list[str] = Field(
        "keyword",
        description="harm judges, the first the headline: registered names (comma-separated or a list), "
        "a model judge as NAME=MODEL to choose its model",
    )
    judge_model: str = Field(DEFAULT_GUARD, description="the llama-guard judge's model")
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
    warn_truncated: bool = Field(
        True,
        description="warn where more than 5% of a benchmark's answers hit max_new_tokens (off where short "
        "answers are meant: the organism reads only the opening of harm answers)",
    )
    trust_remote_code: bool = False
    force: bool = False

    @field_validator("judge")
    @classmethod
    def _judges(cls, judge: str | list[str]) -> str | list[str]:
        return check_judge_value(judge)

    @field_validator("model")
    @classmethod
    def _not_an_adapter(cls, model: str) -> str:
        if is_peft_adapter_dir(model):
            raise ValueError(
                f"{model} is a PEFT adapter, not a model: pass the base model as --model and the adapter as "
                f"--adapter {model}"
            )
        return model
