"""The options of `safemerge scan` / `safemerge merge`, as option groups that other configs reuse.

Each group is one pydantic model, declared once: the inputs (`InputsConfig`), how to run (`RunOptions`),
the selection policy (`SelectionOptions`), the merge operator (`MergeOptions`). `ScanConfig` and
`MergeConfig` compose them, and so does the defences' `DefendConfig`. A YAML file gives any subset of the
(flat) keys; command-line flags override it; the remaining keys take the defaults below (the reference
SafeMERGE setup: τ = 0.35, weights 0.8/0.2; see docs/method.md §3–4).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from safemerge.common.config_io import FlatConfig

DEFAULT_THRESHOLD = 0.35  # the reference SafeMERGE setup
DEFAULT_WEIGHTS = (0.8, 0.2)  # (w_task, w_safety) of the reference SafeMERGE setup
SELECTION_OPTIONS = ("threshold", "top_k", "fraction")  # alternatives: one policy at a time
ORDER_OPTIONS = ("order", "order_seed")  # which end a ranking policy takes modules from (the controls)
Order = Literal["lowest", "highest", "random"]
MergeMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]


def omit_unset(value: Any) -> bool:  # the `exclude_if` of optional inputs
    """Leave an optional input out of dumps when it is not given, so configs and reports of the inputs
    that existed before it read as they did."""
    return value is None or value is False


class InputsConfig(BaseModel):
    """The inputs every command reads: the aligned model, the safety subspace (the unaligned model or a
    sketch of V), and the task update (a LoRA or a full fine-tune).

    Which are required depends on the command (a LoRA scan with a sketch needs no aligned model); the
    pipeline checks that. Exactly one task input, and at most one of `unaligned` and `subspace`.
    """

    model_config = ConfigDict(extra="forbid")

    aligned: str | None = Field(
        None,
        description="aligned model the fine-tunes started from (directory or hub id)",
        exclude_if=omit_unset,
    )
    unaligned: str | None = Field(
        None, description="unaligned (pre-alignment) base model (directory or hub id)", exclude_if=omit_unset
    )
    task_adapter: str | None = Field(
        None, description="the fine-tuned task LoRA (PEFT directory or hub id)", exclude_if=omit_unset
    )
    task_model: str | None = Field(
        None, description="a full fine-tune of the aligned model (directory or hub id)", exclude_if=omit_unset
    )
    modules: str | None = Field(
        None,
        description="full fine-tunes: the linear-layer modules whose name matches this regular expression "
        "(default: attention and MLP projections)",
        exclude_if=omit_unset,
    )
    subspace: str | None = Field(
        None,
        description="a sketch of V (`safemerge subspace`) instead of the unaligned model",
        exclude_if=omit_unset,
    )
    ignore_fingerprint: bool = Field(
        False, description="use a sketch made from another aligned checkpoint", exclude_if=omit_unset
    )

    @model_validator(mode="after")
    def _one_of_each(self) -> InputsConfig:
        # every problem at once; keys in backticks, which the command line shows as its flags
        problems = []
        if (self.task_adapter is None) == (self.task_model is None):
            problems.append("give exactly one of `task_adapter` (a LoRA) and `task_model` (a full fine-tune)")
        if self.modules is not None and self.task_model is None:
            problems.append("`modules` applies to `task_model` (LoRA modules are the adapter's)")
        if self.unaligned is not None and self.subspace is not None:
            problems.append("give either `unaligned` or `subspace` (a sketch of W_aligned - W_unaligned)")
        if self.unaligned is None and self.subspace is None:
            problems.append("give `unaligned` (or `subspace`, a sketch of W_aligned - W_unaligned)")
        if self.ignore_fingerprint and self.subspace is None:
            problems.append("`ignore_fingerprint` applies only with `subspace`")
        if self.aligned is None and (self.subspace is None or self.task_model is not None):
            problems.append("give `aligned` (only a LoRA scan with a subspace sketch can do without it)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @staticmethod
    def required(given: Collection[str]) -> list[tuple[str, ...]]:
        """The inputs still to give when the keys `given` are, as alternatives (the rules above): the
        aligned model unless a LoRA is scanned against a sketch, one task input, the unaligned model or a
        sketch. `load_config` names every missing one at once."""
        needs_aligned = "subspace" not in given or "task_model" in given
        aligned = [("aligned",)] if needs_aligned else []
        return [*aligned, ("task_adapter", "task_model"), ("unaligned", "subspace")]

    def paths(self) -> dict[str, str | None]:
        """The inputs by label, for the output-directory check (`common/outdir.check_not_an_input`)."""
        return {
            "aligned model": self.aligned,
            "unaligned model": self.unaligned,
            "subspace sketch": self.subspace,
            "task adapter": self.task_adapter,
            "task model": self.task_model,
        }


class RunOptions(BaseModel):
    """How to run and write (none of it changes what is computed)."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    allow_pickle: bool = Field(False, description="allow pickle checkpoints, loaded with weights_only=True")
    force: bool = Field(False, description="replace an earlier safemerge output (never other files)")
    plot: bool = Field(True, description="write similarity.png")


class SelectionOptions(BaseModel):
    """Which modules to change: ρ below a threshold, the k lowest ρ, or the lowest-ρ fraction.

    At most one policy; none given means the command's default (SafeMERGE: ρ < 0.35). The ranking
    policies (top_k, fraction) take `order: highest` (the highest ρ: the inverse control) or
    `order: random` with `order_seed` (a uniform draw of the same number: the random control) instead of
    the lowest ρ (docs/defenses.md, "Selection controls"). Left at their defaults, the two keys are
    left out of dumps, so configs and reports read as before."""

    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, description="select modules with round(ρ, 5) < threshold")
    top_k: int | None = Field(None, description="select the k modules with the lowest ρ")
    fraction: float | None = Field(None, description="select the lowest-ρ fraction")
    order: Order = Field(
        "lowest",
        description="top_k / fraction: take the lowest ρ, the highest ρ, or a seeded uniform random draw",
        exclude_if=lambda v: v == "lowest",
    )
    order_seed: int | None = Field(None, description="order random: the draw's seed", exclude_if=omit_unset)

    @field_validator("threshold")
    @classmethod
    def _threshold_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], where ρ lies (got {value:g})")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"top_k must be at least 1 (got {value}); it selects the k lowest-ρ modules")
        return value

    @field_validator("fraction")
    @classmethod
    def _fraction_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1] (got {value:g}); 1 selects every module")
        return value

    @model_validator(mode="after")
    def _one_policy(self) -> SelectionOptions:
        given = self.given()
        if len(given) > 1:
            got = ", ".join(f"`{k}`" for k in given)
            raise ValueError(f"give only one of `threshold`, `top_k`, `fraction` (got {got})")
        if self.order != "lowest" and (self.top_k is None and self.fraction is None):
            raise ValueError(
                f"`order` {self.order} ranks modules: give `top_k` or `fraction` with it (a threshold "
                "selects ρ < τ whatever the order)"
            )
        if (self.order == "random") != (self.order_seed is not None):
            raise ValueError(
                "order random needs order_seed (the draw is reproducible per seed)"
                if self.order == "random"
                else f"order_seed applies to order random only (order is {self.order})"
            )
        return self

    def given(self) -> dict[str, Any]:
        """The policy set explicitly, as keyword arguments ({} when none is)."""
        return {n: getattr(self, n) for n in SELECTION_OPTIONS if getattr(self, n) is not None}

    def ordering(self) -> dict[str, Any]:
        """`order` and `order_seed` as keyword arguments when not the default ({} for the lowest ρ)."""
        if self.order == "lowest":
            return {}
        return {"order": self.order, **({"order_seed": self.order_seed} if self.order == "random" else {})}


class SelectionConfig(SelectionOptions):
    """SafeMERGE's selection: like `SelectionOptions`, with ρ < 0.35 when no policy is given."""

    @model_validator(mode="after")
    def _default_policy(self) -> SelectionConfig:
        if not self.given():
            self.threshold = DEFAULT_THRESHOLD
        return self

    @classmethod
    def scan_only(cls) -> SelectionConfig:
        """No module selected: the scan of a defence that needs ρ alone (it chooses modules its own way,
        or none). Built without validation: `fraction` 0 is refused from users, as it selects nothing."""
        return cls.model_construct(threshold=None, top_k=None, fraction=0.0)

    @property
    def policy(self) -> str:
        order = {
            "lowest": "",
            "highest": ", highest rho first",
            "random": f", random draw seed {self.order_seed}",
        }
        if self.top_k is not None:
            return f"top-k (k={self.top_k}{order[self.order]})"
        if self.fraction is not None:
            return f"fraction ({self.fraction}{order[self.order]})"
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


WEIGHTS_TOLERANCE = 1e-9  # |w_task + w_safety - 1| allowed, for decimal inputs such as 0.7,0.3


class MergeOptions(BaseModel):
    """The merge operator on selected modules (docs/method.md §4) and the optional full-model output.

    `weights` are a convex combination (each in [0, 1], summing to 1) unless `allow_any_weights`: then
    any finite pair, e.g. the scale-only control (0.8, 0) or task arithmetic's negation (w < 0)."""

    model_config = ConfigDict(extra="forbid")

    # declared before `weights`, whose check reads it
    allow_any_weights: bool = Field(
        False,
        description="accept weights outside [0, 1] or not summing to 1 (the scale-only control 0.8,0; "
        "negative weights subtract an update)",
        exclude_if=omit_unset,
    )
    weights: tuple[float, float] = Field(
        DEFAULT_WEIGHTS, description="(w_task, w_safety) on selected modules"
    )
    mode: Literal["exact", "peft-linear"] = "exact"
    method: MergeMethod = "linear"
    density: float = Field(0.5, gt=0.0, le=1.0, description="kept fraction for TIES / DARE")
    seed: int = Field(0, description="seed of DARE's random masks and of the randomised SVD")
    rank: int | None = Field(None, ge=1, description="output rank for TIES/DARE (default r_task + r_safety)")
    allow_partial: bool = Field(
        False,
        description="merge even when some selected modules have no safety counterpart (they stay as "
        "fine-tuned; docs/engine.md, Partial merges)",
        exclude_if=omit_unset,
    )
    merge_into_base: bool = Field(False, description="also write the full merged model")
    max_shard_size: str = Field("2GB", description="largest output shard of the full model")

    _parse_weights = field_validator("weights", mode="before")(parse_weights)

    @field_validator("weights")
    @classmethod
    def _convex(cls, value: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        shown = ",".join(f"{w:g}" for w in value)
        if not all(math.isfinite(w) for w in value):
            raise ValueError(f"weights must be finite numbers (got {shown})")
        if info.data.get("allow_any_weights"):
            return value
        if not all(0.0 <= w <= 1.0 for w in value) or abs(sum(value) - 1.0) > WEIGHTS_TOLERANCE:
            raise ValueError(
                f"weights must each lie in [0, 1] and sum to 1 (got {shown}); for another pair, such as the "
                "scale-only control 0.8,0 or a negative weight, add --allow-any-weights "
                "(allow_any_weights: true)"
            )
        return value

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

    @classmethod
    def required_groups(cls, given: Collection[str]) -> list[tuple[str, ...]]:
        return InputsConfig.required(given)


class MergeConfig(ScanConfig):
    """Inputs and options of `safemerge merge`."""

    out: str = Field(description="output directory (PEFT adapter or full model, report)")
    safety_adapter: str | None = Field(
        None, description="the safety LoRA trained on the aligned model", exclude_if=omit_unset
    )
    safety_model: str | None = Field(
        None, description="a full safety fine-tune of the aligned model", exclude_if=omit_unset
    )
    merge: MergeOptions

    @classmethod
    def required_groups(cls, given: Collection[str]) -> list[tuple[str, ...]]:
        return [*InputsConfig.required(given), ("safety_adapter", "safety_model")]

    @model_validator(mode="before")
    @classmethod
    def _merge_method_key(cls, data: Any) -> Any:
        """`merge_method:` (the key `safemerge defend` and the flag `--merge-method` use) as `method:`."""
        if not isinstance(data, dict) or "merge_method" not in data:
            return data
        data = dict(data)
        value = data.pop("merge_method")
        if data.get("method") not in (None, value):
            raise ValueError(f"`merge_method` {value} and `method` {data['method']} disagree; give one")
        data["method"] = value
        return data

    @model_validator(mode="after")
    def _one_safety(self) -> MergeConfig:
        if (self.safety_adapter is None) == (self.safety_model is None):
            raise ValueError(
                "give exactly one of `safety_adapter` (a LoRA) and `safety_model` (a full fine-tune)"
            )
        if self.safety_model is not None and self.inputs.task_model is None:
            raise ValueError("`safety_model` needs `task_model`: a LoRA merge takes a `safety_adapter`")
        return self
