"""Configuration of `safemerge defend`: one pydantic model for every post-fine-tuning defence.

The same model describes one cell of `safemerge experiment` (there `out` is filled in by the runner).
Options that do not apply to the chosen method are rejected when given with a non-default value, so a
misplaced grid key fails before any work starts (unknown keys always fail), while a full dump of a
config (`defense.yaml`) still loads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from safemerge.common.config_io import FlatConfig, plain_dump
from safemerge.engine.config import (
    DEFAULT_THRESHOLD,
    SELECTION_OPTIONS,
    InputsConfig,
    MergeConfig,
    MergeOptions,
    RunOptions,
    SelectionConfig,
    SelectionOptions,
)

Method = Literal["safemerge", "merge-all", "safelora", "resta", "none"]
METHODS: tuple[str, ...] = ("safemerge", "merge-all", "safelora", "resta", "none")
SAFELORA_THRESHOLD = 0.5  # Safe LoRA's published default (select ρ ≤ 0.5)
SAFELORA_TOP_K = 10  # Safe LoRA's published default in top-k mode
RESTA_BETA = 0.5

COMMON = {"method", "aligned", "unaligned", "task_adapter", "out", "device", "allow_pickle", "force", "plot"}
SELECTION = {"threshold", "top_k", "fraction"}
MERGE_OPTS = {"safety_adapter", "weights", "mode", "merge_method", "density", "seed", "rank"}
FULL_MODEL = {"merge_into_base", "max_shard_size"}
APPLIES: dict[str, set[str]] = {
    "safemerge": COMMON | SELECTION | MERGE_OPTS | FULL_MODEL,
    "merge-all": COMMON | MERGE_OPTS | FULL_MODEL,
    "safelora": COMMON | SELECTION | FULL_MODEL | {"preserve_norm"},
    "resta": COMMON | {"beta", "scope", "dare", "density", "seed", "max_shard_size"},
    "none": COMMON,
}


class DefendConfig(FlatConfig):
    """Inputs and options of `safemerge defend` (YAML keys are flat: `weights`, `beta`, `merge_method`, …).

    Composed of the engine's option groups: the inputs, the selection policy, the merge options of
    `safemerge merge` (its `method` is spelled `merge_method` here, since `method` names the defence) and
    how to run; plus the options of the defences that are not merges.
    """

    EXCLUSIVE_OPTIONS: ClassVar[tuple[str, ...]] = SELECTION_OPTIONS
    FLAT_NAMES: ClassVar[dict[str, dict[str, str]]] = {"merge": {"method": "merge_method"}}

    method: Method = Field("safemerge", description="the defence")
    inputs: InputsConfig
    safety_adapter: str | None = Field(None, description="safety LoRA (safemerge, merge-all)")
    out: str = Field(description="output directory")
    # selection (safemerge: ρ < τ, default 0.35; safelora: ρ ≤ τ, default 0.5)
    selection: SelectionOptions
    # safemerge / merge-all: the options of `safemerge merge` (density and seed also serve RESTA's DARE)
    merge: MergeOptions
    # safelora
    preserve_norm: bool = Field(False, description="rescale C·B_f so that ‖ΔW‖ is unchanged (not published)")
    # resta
    beta: float = Field(RESTA_BETA, description="scale of the safety vector W_al − W_un")
    scope: Literal["targeted", "all-linear"] = Field("all-linear", description="where RESTA adds β·V")
    dare: bool = Field(False, description="RESTA: DARE (drop + 1/density rescale) on the fine-tuning delta")
    run: RunOptions

    @model_validator(mode="after")
    def _consistent(self) -> DefendConfig:
        flat = self.model_dump()
        # an option of another method is an error unless it holds its default (a full dump reloads)
        wrong = sorted(
            n for n in self.flat_fields_set() - APPLIES[self.method] if flat[n] != self.flat_default(n)
        )
        if wrong:
            raise ValueError(f"option(s) {', '.join(wrong)} do not apply to method {self.method}")
        if self.method in ("safemerge", "merge-all") and not self.safety_adapter:
            raise ValueError(f"method {self.method} needs safety_adapter")
        if self.method == "resta" and self.merge.density != self.flat_default("density") and not self.dare:
            raise ValueError("density applies to resta only with dare: true")
        return self

    @property
    def resolved_selection(self) -> dict[str, Any]:
        """The selection policy as keyword arguments, with the method's default when none is given."""
        given = self.selection.given()
        if given:
            return given
        if self.method == "safelora":
            return {"threshold": SAFELORA_THRESHOLD}
        if self.method == "merge-all":
            return {"fraction": 1.0}
        return {"threshold": DEFAULT_THRESHOLD}

    def merge_config(self, out: str) -> MergeConfig:
        """The `safemerge merge` config of a safemerge / merge-all cell: the same groups, composed."""
        assert self.safety_adapter is not None
        return MergeConfig(
            selection=SelectionConfig(**self.resolved_selection),
            inputs=self.inputs,
            out=out,
            run=self.run.model_copy(update={"force": False}),
            safety_adapter=self.safety_adapter,
            merge=self.merge,
        )

    def settings(self) -> dict[str, Any]:
        """What was computed (no paths, no how-to-write flags): the resolved options of the method."""
        keep = APPLIES[self.method] - COMMON - {"safety_adapter", "max_shard_size"} - SELECTION
        data = {k: v for k, v in plain_dump(self).items() if k in keep}
        if self.method in ("safemerge", "safelora"):
            data.update(self.resolved_selection)
        if self.method == "resta" and not self.dare:
            data.pop("density", None)
        return {"method": self.method, **dict(sorted(data.items()))}
