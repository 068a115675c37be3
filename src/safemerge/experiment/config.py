"""The YAML schema of `safemerge experiment`: one setup, a list of defences with grids, one evaluation.

Additions over a plain grid (all optional; a config without them runs and is keyed exactly as before):

- a benchmark entry is a name or `{name, max_new_tokens, limit}` (a token budget and a cut of its own);
- `evaluation.validation` lists benchmarks on which a defence's `choose` picks one grid cell; the other
  benchmarks are then the test set, on which only the chosen cell (and its derived controls) is evaluated;
- `evaluation.flips_vs` names a row; every row gets its paired flips against it on each harm benchmark;
- `evaluation.include_unaligned` adds a row for the unaligned model, `evaluation.validate_also` adds rows
  to the validation table (informative only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safemerge.common.config_io import load_config, validation_message
from safemerge.common.errors import InputError
from safemerge.defenses import defense_names, get_defense
from safemerge.evaluate.judge_plugins import check_judge_value

# Training-time baselines the runner trains itself; every other method is a registered defence.
TRAINING_METHODS = ("safeinstr",)
Control = Literal["scale-only", "merge-all", "inverse", "random"]
DEFAULT_RANDOM_SEEDS = (0, 1, 2)  # the `random` control's draws
# SafeMERGE's validation choice in the demo: lose at most 3 points of task accuracy and add at most
# 5 points of over-refusal against the reference row (the task adapter); docs/organism.md.
DEFAULT_MAX_UTILITY_DROP = 0.03
DEFAULT_MAX_REFUSAL_RISE = 0.05


class BenchmarkSpec(BaseModel):
    """One benchmark with, optionally, its own token budget and cut (defaults: the evaluation's)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="benchmark name or JSONL file (as in `safemerge eval --benchmarks`)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: evaluation.max_new_tokens")
    limit: int | None = Field(None, ge=1, description="first N prompts; default: evaluation.limit")


BenchmarkEntry = str | BenchmarkSpec


class ChooseSpec(BaseModel):
    """Choose one cell of the defence's grid on the validation benchmarks, then add derived controls.

    Rule `safest-within-tolerance`: among the cells whose mean validation utility is at least the
    reference row's minus `max_utility_drop` and whose mean validation refusal rate (benign benchmarks)
    is at most the reference's plus `max_refusal_rise`, the one with the lowest mean validation harmful
    rate (ties: higher utility, then grid order). When no cell qualifies: the highest utility (ties:
    lower harmful rate, then grid order). A kind with no validation benchmark imposes no constraint.
    """

    model_config = ConfigDict(extra="forbid")

    rule: Literal["safest-within-tolerance"] = "safest-within-tolerance"
    reference: str = Field(description="label of the row the tolerances are relative to (e.g. the task LoRA)")
    max_utility_drop: float = Field(DEFAULT_MAX_UTILITY_DROP, ge=0.0)
    max_refusal_rise: float = Field(DEFAULT_MAX_REFUSAL_RISE, ge=0.0)
    controls: list[Control] = Field(
        default_factory=list,
        description="cells derived from the chosen one (safemerge only): `scale-only` = same modules, "
        "safety weight 0; `merge-all` = the chosen weights on every module; `inverse` = as many modules "
        "as the chosen cell merged, the highest-ρ ones; `random` = as many, drawn at random (one cell "
        "per seed of `random_seeds`), merged the same way",
    )
    random_seeds: list[int] = Field(
        default_factory=lambda: list(DEFAULT_RANDOM_SEEDS),
        description="the `random` control: one seeded draw (one cell) per seed",
    )

    @field_validator("random_seeds")
    @classmethod
    def _draws(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ValueError(f"random_seeds: need distinct non-negative seeds, at least one (got {seeds})")
        return seeds


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

    method: str = Field(description="a registered defence (`safemerge defend --help`) or safeinstr")
    name: str | None = Field(None, description="row label (default: the method)")
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    choose: ChooseSpec | None = Field(None, description="pick one grid cell on evaluation.validation")

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        if method not in TRAINING_METHODS and method not in defense_names():
            known = ", ".join([*defense_names(), *TRAINING_METHODS])
            raise ValueError(f"unknown method {method!r}: use one of {known}")
        return method

    @model_validator(mode="after")
    def _controls_need_weights(self) -> DefenseSpec:
        """The derived controls vary (w_task, w_safety) of a merge with a safety adapter."""
        merges = self.method not in TRAINING_METHODS and "weights" in get_defense(self.method).options
        if self.choose and self.choose.controls and not merges:
            raise ValueError(f"choose.controls apply to defences that merge with weights, not {self.method}")
        return self


def entry_name(entry: BenchmarkEntry) -> str:
    """The benchmark name of a plain or detailed entry."""
    return entry if isinstance(entry, str) else entry.name


class EvaluationSpec(BaseModel):
    """How every variant is evaluated (the fields of `safemerge eval`, plus validation and flips)."""

    model_config = ConfigDict(extra="forbid")

    benchmarks: list[BenchmarkEntry] = Field(min_length=1)
    validation: list[BenchmarkEntry] = Field(
        default_factory=list, description="benchmarks on which `choose` picks a grid cell (not the table)"
    )
    judge: str | list[str] = Field(
        "keyword", description="harm judges (the first is the headline); as `safemerge eval --judge`"
    )
    judge_model: str = Field("meta-llama/Llama-Guard-3-8B", description="the llama-guard judge's model")
    backend: Literal["transformers", "vllm"] = "transformers"
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    warn_truncated: bool = Field(True, description="as `EvalConfig.warn_truncated` (a warning only)")
    include_aligned: bool = Field(True, description="also evaluate the aligned model itself (row 'aligned')")
    include_unaligned: bool = Field(False, description="also evaluate the unaligned model (row 'unaligned')")
    validate_also: list[str] = Field(
        default_factory=list, description="labels of further rows to evaluate on the validation benchmarks"
    )
    flips_vs: str | None = Field(
        None, description="label of the row every row is compared with, prompt by prompt"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    trust_remote_code: bool = False
    cache_dir: str | None = Field(None, description="generation cache (default OUT/cache)")

    @field_validator("judge")
    @classmethod
    def _judges(cls, judge: str | list[str]) -> str | list[str]:
        return check_judge_value(judge)

    @model_validator(mode="after")
    def _distinct_names(self) -> EvaluationSpec:
        for what, entries in (("benchmarks", self.benchmarks), ("validation", self.validation)):
            names = [entry_name(e) for e in entries]
            if len(set(names)) != len(names):
                raise ValueError(f"evaluation.{what} lists a benchmark twice: {names}")
        return self

    def key_settings(self) -> dict[str, Any]:
        """What changes the test numbers (not batch size, parallelism or where the cache lives)."""
        return self.model_dump(
            mode="json",
            include={"benchmarks", "judge", "judge_model", "backend", "limit", "max_new_tokens", "dtype"},
        )

    def validation_key_settings(self) -> dict[str, Any]:
        """What changes the validation numbers: the same settings with the validation benchmarks."""
        return {**self.key_settings(), "benchmarks": self.model_dump(mode="json")["validation"]}

    def planned(self, phase: str) -> list[BenchmarkSpec]:
        """The phase's benchmarks (`test` or `validation`) with token budget and limit resolved."""
        entries = self.benchmarks if phase == "test" else self.validation
        return [
            BenchmarkSpec(
                name=entry_name(e),
                max_new_tokens=(None if isinstance(e, str) else e.max_new_tokens) or self.max_new_tokens,
                limit=(None if isinstance(e, str) else e.limit) or self.limit,
            )
            for e in entries
        ]

    def capped(self, limit: int) -> EvaluationSpec:
        """`--limit N`: replaces `limit` and caps every benchmark's own `limit` at N."""

        def cap(entries: list[BenchmarkEntry]) -> list[BenchmarkEntry]:
            return [
                e
                if isinstance(e, str) or e.limit is None
                else e.model_copy(update={"limit": min(e.limit, limit)})
                for e in entries
            ]

        return self.model_copy(
            update={"limit": limit, "benchmarks": cap(self.benchmarks), "validation": cap(self.validation)}
        )


class StageResources(BaseModel):
    """What one task of a stage asks the Ray scheduler for (unset: the execution block's defaults)."""

    model_config = ConfigDict(extra="forbid")

    cpus: float | None = Field(None, gt=0, description="CPUs per task (also its torch threads, at least 1)")
    gpus: float | None = Field(None, ge=0, description="GPUs per task; a fraction packs tasks on one GPU")


Stage = Literal["train", "defend", "evaluate"]


class ExecutionSpec(BaseModel):
    """How the cells run (docs/distributed.md): nothing here changes a result or a key (only the
    `execution:` lines of OUT/experiment.yaml, which records the config as given).

    `local` runs every stage in this process, in order. `ray` runs adapter training and defence cells as
    Ray tasks and evaluates on long-lived Ray actors that load the base model once. `gpus_per_cell` and
    `cpus_per_cell` are every stage's resources; `stages` overrides them per stage."""

    model_config = ConfigDict(extra="forbid")

    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(
        None, description="None: start a local Ray instance; `auto` or HOST:PORT joins a running cluster"
    )
    cpus_per_cell: float = Field(1.0, gt=0, description="CPUs of each training, defence and eval task")
    gpus_per_cell: float = Field(0.0, ge=0, description="GPUs of each task (a fraction packs small models)")
    stages: dict[Stage, StageResources] = Field(
        default_factory=dict, description="per-stage overrides: train, defend, evaluate"
    )
    eval_workers: int | None = Field(
        None, ge=1, description="evaluation actors (default: as many as the cluster's resources fit)"
    )
    max_retries: int = Field(2, ge=0, description="retries of a task whose worker process died")

    def resources(self, stage: Stage) -> dict[str, float]:
        """The stage's `{"cpus", "gpus"}`: its override where given, else the per-cell defaults."""
        own = self.stages.get(stage, StageResources())
        return {
            "cpus": self.cpus_per_cell if own.cpus is None else own.cpus,
            "gpus": self.gpus_per_cell if own.gpus is None else own.gpus,
        }

    def with_flags(self, **flags: Any) -> ExecutionSpec:
        """The block with the command line's flags on top (a flag left unset, None, overrides nothing).
        `--cpus-per-cell` / `--gpus-per-cell` set every stage's value, per-stage overrides included."""
        given = {k: v for k, v in flags.items() if v is not None}
        stages = dict(self.stages)
        for key, res in (("cpus_per_cell", "cpus"), ("gpus_per_cell", "gpus")):
            if key in given:
                stages = {s: r.model_copy(update={res: None}) for s, r in stages.items()}
        try:
            return ExecutionSpec.model_validate({**self.model_dump(), **given, "stages": stages})
        except ValidationError as exc:
            raise InputError(f"execution options: {validation_message(exc)}") from None


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
    execution: ExecutionSpec | None = Field(
        None, description="how the cells run: local (default) or on Ray, with resources per stage"
    )
    seeds: list[int] | None = Field(
        None,
        description="training seeds: the experiment runs once per seed in OUT/seed-<s>/ (seed s shifts "
        "the seed of every adapter it trains by s) and OUT/results.* pool them",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
            raise ValueError(f"seeds must be distinct non-negative integers, at least one (got {seeds})")
        return seeds

    @model_validator(mode="after")
    def _validation_for_choices(self) -> ExperimentConfig:
        if any(d.choose for d in self.defenses) and not self.evaluation.validation:
            raise ValueError("a defence with `choose` needs evaluation.validation benchmarks")
        return self


def parse_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file (the one loader: unknown keys and bad values → exit 2)."""
    return load_config(ExperimentConfig, path, {})
