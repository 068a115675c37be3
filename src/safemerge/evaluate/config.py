"""Evaluation configuration (pydantic); YAML keys are the field names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safemerge.common.packaged import is_peft_adapter_dir
from safemerge.evaluate.judge_plugins import DEFAULT_GUARD, check_judge_value

__all__ = ["DEFAULT_GUARD", "EvalConfig"]


class EvalConfig(BaseModel):
    """Everything `safemerge eval` needs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: local dir, hub id, or `smollm2` (packaged)")
    adapters: list[str] = Field(
        default_factory=list,
        description="PEFT adapter directories; `NAME=PATH` (or a mapping NAME: PATH) names the variant",
    )
    adapter_names: list[str | None] = Field(
        default_factory=list,
        description="the variants' names, one per adapter (None: named by its path); from `NAME=PATH`",
    )
    reference: str | None = Field(
        None,
        description="the variant every other is compared with, per benchmark (difference with a 95% "
        "interval, paired flips, McNemar p): an adapter's name or path, or the model for the base",
    )
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

    @model_validator(mode="before")
    @classmethod
    def _split_names(cls, data: Any) -> Any:
        """`NAME=PATH` entries (or a mapping) into `adapters` (paths) and `adapter_names`."""
        if not isinstance(data, dict) or "adapters" not in data or data.get("adapter_names"):
            return data
        paths, names = split_adapter_names(data["adapters"])
        return {**data, "adapters": paths, "adapter_names": names}

    @model_validator(mode="after")
    def _names_and_reference(self) -> EvalConfig:
        check_variant_names(self)
        return self

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


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def split_adapter_names(value: Any) -> tuple[Any, list[str | None]]:
    """(paths, names) of `--adapter` values: `NAME=PATH` names a variant (NAME: letters, digits, `_.+-`,
    no `/`), a plain path or an existing path containing `=` is named by its path; a mapping is NAME:
    PATH. Anything else is returned as it is, for the field's own validation to refuse."""
    if isinstance(value, dict):
        return [str(v) for v in value.values()], [str(k) for k in value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return value, []
    paths: list[str] = []
    names: list[str | None] = []
    for v in value:
        name, sep, path = v.partition("=")
        if sep and _NAME.fullmatch(name) and path and not Path(v).exists():
            paths.append(path)
            names.append(name)
        else:
            paths.append(v)
            names.append(None)
    return paths, names if any(n is not None for n in names) else []


def variant_keys(cfg: EvalConfig) -> list[str]:
    """The keys of the variants `cfg` evaluates, in order: the model (unless excluded), then each adapter
    by its name or, unnamed, its path (metrics.json, generations.jsonl and the summary use them)."""
    names = cfg.adapter_names or [None] * len(cfg.adapters)
    base = [cfg.model] if cfg.include_base else []
    return base + [n or a for n, a in zip(names, cfg.adapters, strict=True)]


def check_variant_names(cfg: EvalConfig) -> None:
    """One name per adapter, no two variants with one key, and a reference that is one of them."""
    if cfg.adapter_names and len(cfg.adapter_names) != len(cfg.adapters):
        raise ValueError(
            f"adapter_names has {len(cfg.adapter_names)} entries for {len(cfg.adapters)} adapters: give "
            "one per adapter (or write them as --adapter NAME=PATH)"
        )
    keys = variant_keys(cfg)
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(
            f"two variants are named {', '.join(twice)}: give each --adapter its own NAME=PATH (and none "
            "the model's name)"
        )
    if cfg.reference is not None and cfg.reference not in keys:
        raise ValueError(
            f"--reference {cfg.reference!r} is none of the evaluated variants: {', '.join(keys)}"
        )
