"""The YAML schema of `safemerge experiment`: one setup, a list of defences with grids, one evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safemerge.common.errors import InputError

Method = Literal["safemerge", "merge-all", "safelora", "resta", "none", "safeinstr"]


class SetupConfig(BaseModel):
    """The models and adapters: adapters are given as paths, or as training recipes for `safemerge train`."""

    model_config = ConfigDict(extra="forbid")

    aligned: str = Field(description="aligned model (directory or hub id); adapters are trained on it")
    unaligned: str = Field(description="unaligned (pre-alignment) model (directory or hub id)")
    task_adapter: str | None = Field(None, description="the fine-tuned task LoRA")
    task_train: dict[str, Any] | None = Field(
        None, description="TrainConfig fields (no model/out) for the task LoRA"
    )
    safety_adapter: str | None = Field(None, description="the safety LoRA")
    safety_train: dict[str, Any] | None = Field(None, description="TrainConfig fields for the safety LoRA")

    @model_validator(mode="after")
    def _one_source(self) -> SetupConfig:
        if (self.task_adapter is None) == (self.task_train is None):
            raise ValueError("give exactly one of setup.task_adapter and setup.task_train")
        if self.safety_adapter is not None and self.safety_train is not None:
            raise ValueError("give at most one of setup.safety_adapter and setup.safety_train")
        return self


class DefenseSpec(BaseModel):
    """One defence: fixed `options` and a `grid` (every combination of the listed values is one cell)."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    name: str | None = Field(None, description="row label (default: the method)")
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class EvaluationSpec(BaseModel):
    """How every variant is evaluated (the fields of `safemerge eval`)."""

    model_config = ConfigDict(extra="forbid")

    benchmarks: list[str] = Field(min_length=1)
    judge: Literal["keyword", "llama-guard"] = "keyword"
    judge_model: str = "meta-llama/Llama-Guard-3-8B"
    backend: Literal["transformers", "vllm"] = "transformers"
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    include_aligned: bool = Field(True, description="also evaluate the aligned model itself (row 'aligned')")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    trust_remote_code: bool = False
    cache_dir: str | None = Field(None, description="generation cache (default OUT/cache)")

    def key_settings(self) -> dict[str, Any]:
        """What changes the numbers (not batch size, parallelism or where the cache lives)."""
        return self.model_dump(
            mode="json",
            include={"benchmarks", "judge", "judge_model", "backend", "limit", "max_new_tokens", "dtype"},
        )


class ExperimentConfig(BaseModel):
    """A whole comparison: one setup, a list of defences with grids, one evaluation."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    out: str | None = Field(None, description="output directory (or --out)")
    setup: SetupConfig
    defenses: list[DefenseSpec] = Field(min_length=1)
    evaluation: EvaluationSpec
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the defences' math runs")
    expected_runtime: str | None = Field(None, description="free text, for the reader")
    reference: dict[str, Any] | None = Field(None, description="published numbers to compare with (not used)")




def validation_message(exc: ValidationError) -> str:
    """pydantic's errors as one line: `loc: message; loc: message`."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())


def parse_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"invalid experiment config {path}: {validation_message(exc)}") from None
    return cfg
