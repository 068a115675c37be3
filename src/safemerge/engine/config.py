"""Pydantic models that mirror the YAML config of `safemerge scan` / `safemerge merge`.

A YAML file gives any subset of the fields; command-line flags override it; the remaining fields take
the defaults below (the reference SafeMERGE setup: τ = 0.35, weights 0.8/0.2).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_THRESHOLD = 0.35  # the reference SafeMERGE setup
SELECTION_OPTIONS = ("threshold", "top_k", "fraction")  # alternatives: one policy at a time


class SelectionConfig(BaseModel):
    """Which modules to merge: ρ < threshold, the k lowest ρ, or the lowest-ρ fraction."""

    model_config = ConfigDict(extra="forbid")
    EXCLUSIVE_OPTIONS: ClassVar[tuple[str, ...]] = SELECTION_OPTIONS

    threshold: float | None = Field(None, description="select modules with round(ρ, 5) < threshold")
    top_k: int | None = Field(None, ge=0, description="select the k modules with the lowest ρ")
    fraction: float | None = Field(None, ge=0.0, le=1.0, description="select the lowest-ρ fraction")

    @model_validator(mode="after")
    def _one_policy(self) -> SelectionConfig:
        given = [n for n in ("threshold", "top_k", "fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of threshold, top_k, fraction (got {', '.join(given)})")
        if not given:
            self.threshold = DEFAULT_THRESHOLD
        return self

    @property
    def policy(self) -> str:
        if self.top_k is not None:
            return f"top-k (k={self.top_k})"
        if self.fraction is not None:
            return f"fraction ({self.fraction})"
        return f"threshold (rho < {self.threshold})"


class ScanConfig(SelectionConfig):
    """Inputs and options of `safemerge scan`."""

    aligned: str = Field(description="aligned model the adapters were trained on (directory or hub id)")
    unaligned: str = Field(description="unaligned (pre-alignment) base model (directory or hub id)")
    task_adapter: str = Field(description="the fine-tuned task LoRA (PEFT directory or hub id)")
    out: str | None = Field(None, description="directory for the report (optional for scan)")
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    allow_pickle: bool = Field(False, description="allow pickle checkpoints, loaded with weights_only=True")
    force: bool = Field(False, description="overwrite an existing output directory")
    plot: bool = Field(True, description="write similarity.png")


class MergeConfig(ScanConfig):
    """Inputs and options of `safemerge merge`."""

    safety_adapter: str = Field(description="the safety LoRA trained on the aligned model")
    out: str = Field(description="output directory (PEFT adapter, report, optionally the full model)")
    weights: tuple[float, float] = Field((0.8, 0.2), description="(w_task, w_safety) on selected modules")
    mode: Literal["exact", "peft-linear"] = "exact"
    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(0.5, gt=0.0, le=1.0, description="kept fraction for TIES / DARE")
    seed: int = Field(0, description="seed of DARE's random masks and of the randomised SVD")
    rank: int | None = Field(None, ge=1, description="output rank for TIES/DARE (default r_task + r_safety)")
    merge_into_base: bool = Field(False, description="also write the full merged model")
    max_shard_size: str = Field("2GB", description="largest output shard of the full model")

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parts = [float(x) for x in value.split(",")]
            except ValueError as exc:
                raise ValueError(f"weights must be two numbers like 0.8,0.2 (got {value!r})") from exc
            if len(parts) != 2:
                raise ValueError(f"weights must be two numbers like 0.8,0.2 (got {value!r})")
            return tuple(parts)
        return value

    @model_validator(mode="after")
    def _compatible(self) -> MergeConfig:
        if self.mode == "peft-linear" and self.method != "linear":
            raise ValueError("mode peft-linear only applies to method linear")
        return self
