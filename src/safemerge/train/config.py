"""Training configuration (pydantic); the YAML keys of `safemerge train` are these field names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safemerge.common.packaged import is_peft_adapter_dir

ALL_LINEAR = "all-linear"  # PEFT's spelling of "every linear layer but the output layer"
# What `like` copies from an adapter (docs/train_eval.md, "Training like another adapter").
LIKE_FIELDS = ("target_modules", "lora_r", "lora_alpha")


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
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module leaf names, or `all-linear` (PEFT: every linear layer but the output layer)",
    )
    like: str | None = Field(
        None,
        description="a LoRA adapter (directory or hub id) whose target modules, r and lora_alpha to copy",
        exclude_if=lambda v: v is None,  # dumps of configs without it read as before
    )

    @field_validator("model")
    @classmethod
    def _not_an_adapter(cls, model: str) -> str:
        if is_peft_adapter_dir(model):
            raise ValueError(
                f"{model} is a PEFT adapter, not a model: pass the base model it was trained on as --model"
            )
        return model

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """`q_proj,v_proj` (the flag's form) → ['q_proj', 'v_proj']; `all-linear` (alone, as a string or a
        one-item list) stays the string PEFT expects."""
        names = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if isinstance(names, list) and ALL_LINEAR in names:
            if len(names) > 1:
                raise ValueError(f"{ALL_LINEAR} stands alone: it already means every linear layer")
            return ALL_LINEAR
        return names

    @model_validator(mode="after")
    def _like_alone(self) -> TrainConfig:
        """`like` copies the adapter's shape: giving a field it copies as well is ambiguous, refused."""
        both = [f for f in LIKE_FIELDS if f in self.model_fields_set]
        if self.like is not None and both:
            raise ValueError(
                f"like copies target_modules, lora_r and lora_alpha from {self.like}; do not give "
                f"{', '.join(both)} as well"
            )
        return self

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
