"""Training configuration (pydantic) and YAML config loading shared by `train` and `eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safemerge.errors import InputError

M = TypeVar("M", bound=BaseModel)


class TrainConfig(BaseModel):
    """Everything `safemerge train` needs; the YAML config keys are these field names."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="base model: local directory, hub id, or `smollm2` (packaged)")
    recipe: str = Field(description="gsm8k | pubmedqa | safety | safety-hub | arithmetic | path to JSONL/CSV")
    out: Path = Field(description="output directory (the PEFT adapter plus logs)")
    samples: int | None = Field(None, description="number of training examples (None: recipe default)")
    mix_safety: int = Field(0, description="SafeInstr: safety examples mixed into the task data")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    warmup_steps: int = 0
    seed: int = 42
    gradient_checkpointing: bool = False
    bf16: bool | None = Field(None, description="None: bf16 on a GPU that supports it, float32 otherwise")
    logging_steps: int = 1
    trust_remote_code: bool = False
    force: bool = False


def load_config(cls: type[M], path: Path | None, overrides: dict[str, Any]) -> M:
    """Build `cls` from an optional YAML file, then the options given on the command line (not None)."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise InputError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise InputError(f"config file {path}: expected a mapping of option names to values")
        data.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = f"config {path}" if path else "options"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"invalid {where}: {problems}") from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (paths as strings), for the output directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
