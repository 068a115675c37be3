"""The options of `safemerge scan` / `safemerge merge`, as option groups that other configs reuse.

Each group is one pydantic model, declared once: the inputs (`InputsConfig`), how to run (`RunOptions`),
the selection policy (`SelectionOptions`), the merge operator (`MergeOptions`). `ScanConfig` and
`MergeConfig` compose them, and so does the defences' `DefendConfig`. A YAML file gives any subset of the
(flat) keys; command-line flags override it; the remaining keys take the defaults below (the reference
SafeMERGE setup: τ = 0.35, weights 0.8/0.2; see docs/method.md §3–4).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safemerge.common.config_io import FlatConfig

DEFAULT_THRESHOLD = 0.35  # the reference SafeMERGE setup
DEFAULT_WEIGHTS = (0.8, 0.2)  # (w_task, w_safety) of the reference SafeMERGE setup
SELECTION_OPTIONS = ("threshold", "top_k", "fraction")  # alternatives: one policy at a time
MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]


class InputsConfig(BaseModel):
    """The aligned/unaligned pair and the task adapter every command reads."""

    model_config = ConfigDict(extra="forbid")

    aligned: str = Field(description="aligned model the adapters were trained on (directory or hub id)")
    unaligned: str = Field(description="unaligned (pre-alignment) base model (directory or hub id)")
    task_adapter: str = Field(description="the fine-tuned task LoRA (PEFT directory or hub id)")


class RunOptions(BaseModel):
    """How to run and write (none of it changes what is computed)."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    allow_pickle: bool = Field(False, description="allow pickle checkpoints, loaded with weights_only=True")
    force: bool = Field(False, description="overwrite an existing output directory")
    plot: bool = Field(True, description="write similarity.png")


class SelectionOptions(BaseModel):
    """Which modules to change: ρ below a threshold, the k lowest ρ, or the lowest-ρ fraction.

    At most one policy; none given means the command's default (SafeMERGE: ρ < 0.35)."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, description="select modules with round(ρ, 5) < threshold")
    top_k: int | None = Field(None, ge=0, description="select the k modules with the lowest ρ")
    fraction: float | None = Field(None, ge=0.0, le=1.0, description="select the lowest-ρ fraction")

    @model_validator(mode="after")
    def _one_policy(self) -> SelectionOptions:
        given = self.given()
        if len(given) > 1:
            raise ValueError(f"give only one of threshold, top_k, fraction (got {', '.join(given)})")
        return self

    def given(self) -> dict[str, Any]:
        """The policy set explicitly, as keyword arguments ({} when none is)."""
        return {n: getattr(self, n) for n in SELECTION_OPTIONS if getattr(self, n) is not None}


class SelectionConfig(SelectionOptions):
    """SafeMERGE's selection: like `SelectionOptions`, with ρ < 0.35 when no policy is given."""

    @model_validator(mode="after")
    def _default_policy(self) -> SelectionConfig:
        if not self.given():
            self.threshold = DEFAULT_THRESHOLD
        return self

    @property
    def policy(self) -> str:
        if self.top_k is not None:
            return f"top-k (k={self.top_k})"
        if self.fraction is not None:
            return f"fraction ({self.fraction})"
        return f"threshold (rho < {self.threshold})"


def parse_weights(value: Any) -> Any:
    """'0.8,0.2' → (0.8, 0.2) (the CLI form); anything else is left to pydantic."""
    if not isinstance(value, str):
        return value
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise ValueError(f"weights must be two numbers like 0.8,0.2 (got {value!r})")
    return parts


class MergeOptions(BaseModel):
    """The merge operator on selected modules (docs/method.md §4) and the optional full-model output."""

    model_config = ConfigDict(extra="forbid")

    weights: tuple[float, float] = Field(
        DEFAULT_WEIGHTS, description="(w_task, w_safety) on selected modules"
    )
    mode: Literal["exact", "peft-linear"] = "exact"
    method: MergeMethod = "linear"
    density: float = Field(0.5, gt=0.0, le=1.0, description="kept fraction for TIES / DARE")
    seed: int = Field(0, description="seed of DARE's random masks and of the randomised SVD")
    rank: int | None = Field(None, ge=1, description="output rank for TIES/DARE (default r_task + r_safety)")
    merge_into_base: bool = Field(False, description="also write the full merged model")
    max_shard_size: str = Field("2GB", description="largest output shard of the full model")

    _parse_weights = field_validator("weights", mode="before")(parse_weights)

    @model_validator(mode="after")
    def _compatible(self) -> MergeOptions:
        if self.mode == "peft-linear" and self.method != "linear":
            raise ValueError("mode peft-linear only applies to method linear")
        return self


class ScanConfig(FlatConfig):
    """Inputs and options of `safemerge scan`."""

    EXCLUSIVE_OPTIONS: ClassVar[tuple[str, ...]] = SELECTION_OPTIONS

    selection: SelectionConfig
    inputs: InputsConfig
    out: str | None = Field(None, description="directory for the report (optional for scan)")
    run: RunOptions


class MergeConfig(ScanConfig):
    """Inputs and options of `safemerge merge`."""

    out: str = Field(description="output directory (PEFT adapter, report, optionally the full model)")
    safety_adapter: str = Field(description="the safety LoRA trained on the aligned model")
    merge: MergeOptions
