"""Configuration of `safemerge defend`: one pydantic model for every post-fine-tuning defence.

The same model describes one cell of `safemerge experiment` (there `out` is filled in by the runner).
Options that do not apply to the chosen method are rejected when given with a non-default value, so a
misplaced grid key fails before any work starts (unknown keys always fail), while a full dump of a
config (`defense.yaml`) still loads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from safemerge.engine.config import DEFAULT_THRESHOLD, SELECTION_OPTIONS, MergeConfig

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


class DefendConfig(BaseModel):
    """Inputs and options of `safemerge defend` (YAML keys are these field names)."""

    model_config = ConfigDict(extra="forbid")
    EXCLUSIVE_OPTIONS: ClassVar[tuple[str, ...]] = SELECTION_OPTIONS

    method: Method = Field("safemerge", description="the defence")
    aligned: str = Field(description="aligned model the adapters were trained on (directory or hub id)")
    unaligned: str = Field(description="unaligned (pre-alignment) base model (directory or hub id)")
    task_adapter: str = Field(description="the fine-tuned task LoRA (PEFT directory or hub id)")
    safety_adapter: str | None = Field(None, description="safety LoRA (safemerge, merge-all)")
    out: str = Field(description="output directory")
    # selection (safemerge: ρ < τ, default 0.35; safelora: ρ ≤ τ, default 0.5)
    threshold: float | None = None
    top_k: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, ge=0.0, le=1.0)
    # safemerge / merge-all: the options of `safemerge merge`
    weights: tuple[float, float] = (0.8, 0.2)
    mode: Literal["exact", "peft-linear"] = "exact"
    merge_method: Literal["linear", "ties", "dare_linear", "dare_ties"] = "linear"
    density: float = Field(0.5, gt=0.0, le=1.0, description="kept fraction (TIES/DARE; RESTA's DARE)")
    seed: int = 0
    rank: int | None = Field(None, ge=1)
    merge_into_base: bool = False
    max_shard_size: str = "2GB"
    # safelora
    preserve_norm: bool = Field(False, description="rescale C·B_f so that ‖ΔW‖ is unchanged (not published)")
    # resta
    beta: float = Field(RESTA_BETA, description="scale of the safety vector W_al − W_un")
    scope: Literal["targeted", "all-linear"] = Field("all-linear", description="where RESTA adds β·V")
    dare: bool = Field(False, description="RESTA: DARE (drop + 1/density rescale) on the fine-tuning delta")
    # how to run
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    allow_pickle: bool = False
    force: bool = False
    plot: bool = True

    @field_validator("weights", mode="before")
    @classmethod
    def _parse_weights(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parts = tuple(float(x) for x in value.split(","))
            except ValueError:
                parts = ()
            if len(parts) != 2:
                raise ValueError(f"weights must be two numbers like 0.8,0.2 (got {value!r})")
            return parts
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DefendConfig:
        given = self.model_fields_set
        fields = type(self).model_fields
        # an option of another method is an error unless it holds its default (a full dump reloads)
        wrong = sorted(n for n in given - APPLIES[self.method] if getattr(self, n) != fields[n].default)
        if wrong:
            raise ValueError(f"option(s) {', '.join(wrong)} do not apply to method {self.method}")
        policies = [n for n in ("threshold", "top_k", "fraction") if getattr(self, n) is not None]
        if len(policies) > 1:
            raise ValueError(f"give only one of threshold, top_k, fraction (got {', '.join(policies)})")
        if self.method in ("safemerge", "merge-all") and not self.safety_adapter:
            raise ValueError(f"method {self.method} needs safety_adapter")
        if self.method == "resta" and self.density != fields["density"].default and not self.dare:
            raise ValueError("density applies to resta only with dare: true")
        if self.mode == "peft-linear" and self.merge_method != "linear":
            raise ValueError("mode peft-linear only applies to merge_method linear")
        return self

    @property
    def selection(self) -> dict[str, Any]:
        """The resolved selection policy as keyword arguments (method defaults filled in)."""
        for name in ("threshold", "top_k", "fraction"):
            if getattr(self, name) is not None:
                return {name: getattr(self, name)}
        if self.method == "safelora":
            return {"threshold": SAFELORA_THRESHOLD}
        if self.method == "merge-all":
            return {"fraction": 1.0}
        return {"threshold": DEFAULT_THRESHOLD}

    def merge_config(self, out: str) -> MergeConfig:
        """The `safemerge merge` config of a safemerge / merge-all cell."""
        assert self.safety_adapter is not None
        return MergeConfig(
            aligned=self.aligned,
            unaligned=self.unaligned,
            task_adapter=self.task_adapter,
            safety_adapter=self.safety_adapter,
            out=out,
            weights=self.weights,
            mode=self.mode,
            method=self.merge_method,
            density=self.density,
            seed=self.seed,
            rank=self.rank,
            merge_into_base=self.merge_into_base,
            max_shard_size=self.max_shard_size,
            device=self.device,
            allow_pickle=self.allow_pickle,
            plot=self.plot,
            **self.selection,
        )

    def settings(self) -> dict[str, Any]:
        """What was computed (no paths, no how-to-write flags): the resolved options of the method."""
        keep = APPLIES[self.method] - COMMON - {"safety_adapter", "max_shard_size"} - SELECTION
        data = self.model_dump(mode="json", include=keep)
        if self.method in ("safemerge", "safelora"):
            data.update(self.selection)
        if self.method == "resta" and not self.dare:
            data.pop("density", None)
        if "weights" in data:
            data["weights"] = list(self.weights)
        return {"method": self.method, **dict(sorted(data.items()))}
