"""The organism's recipe: every size, step count, learning rate and seed, in one hashable object.

Each build stage is cached under a key that hashes its own part of the recipe plus the keys of the
stages it depends on, so changing the task LoRA's steps reuses the aligned model, and so on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from safemerge.common.precision import check_precision

# Bump when the build code changes what a stage produces, and with each new default recipe (the docs
# name organisms by it); every stage key hashes it, so a bump rebuilds every stage.
RECIPE_VERSION = "5"


class StepRecipe(BaseModel):
    """What every training stage shares: AdamW steps over batches of chat examples.

    `precision`: "bfloat16" runs each step's forward and backward under bfloat16 autocast (weights,
    gradients and optimizer state stay float32; the stage is saved in float32); "float32" runs
    everything in float32; "auto" is resolved once per run, before any stage is keyed, to the faster of
    the two on this machine (`safemerge.common.precision`). On CPUs with AVX512-BF16 or AMX a bfloat16
    step is ~2x a float32 one (docs/organism.md, "Speed"); on CPUs without them bfloat16 is emulated and
    many times slower (docs/organism.md, "Precision").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int
    batch_size: int = 8
    learning_rate: float
    warmup_steps: int
    schedule: Literal["constant", "linear"]
    max_length: int = 128
    precision: Literal["auto", "bfloat16", "float32"] = "auto"
    seed: int = 0


class AlignedRecipe(StepRecipe):
    """A: full fine-tune of attention + MLP weights of U on refusals + U's own benign answers."""

    n_harmful: int = 480
    n_benign: int = 480
    steps: int = 180  # 1.5 epochs of the 960 examples
    learning_rate: float = 5e-5
    warmup_steps: int = 5
    schedule: Literal["constant", "linear"] = "constant"
    benign_max_new_tokens: int = 16  # U's benign answers are truncated here (the opening is what counts)


class LoraRecipe(StepRecipe):
    """A LoRA trained on A: r = 8 on the four attention projections, linear decay after warm-up. The
    paper's setting is q_proj / v_proj; on this 135M model q/k/v/o learns the task better at the same
    cost (validation arithmetic 40% vs 35%; docs/organism.md, "How recipe 5 was chosen")."""

    samples: int
    learning_rate: float = 6e-4
    warmup_steps: int = 3
    schedule: Literal["constant", "linear"] = "linear"
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


class FullTaskRecipe(StepRecipe):
    """T_full: a full fine-tune of A's attention + MLP projections on T's arithmetic data (`task`'s
    samples and seed), for `safemerge organism build --full-ft`. The learning rate and step count were
    chosen on the organism's validation arithmetic set only (docs/organism.md, "Full fine-tune")."""

    steps: int = 64
    learning_rate: float = 1e-5  # validation arithmetic 20/50 vs 17/50 at 3e-5 (docs/organism.md)
    warmup_steps: int = 5
    schedule: Literal["constant", "linear"] = "linear"


class OrganismRecipe(BaseModel):
    """The whole organism: U, A, T (task), S (safety) and T_SafeInstr (task + mixed-in safety data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_val_strongreject: int = 40
    n_benign_val: int = 40
    aligned: AlignedRecipe = AlignedRecipe()
    task: LoraRecipe = LoraRecipe(samples=1200, steps=150, learning_rate=1e-3)  # one epoch
    safety: LoraRecipe = LoraRecipe(samples=160, steps=20)
    safeinstr_mix: int = 120  # SafeInstr: safety examples mixed into T's data, ~1 in 10 (same steps as T)
    # T_full (built only with --full-ft). Left out of the recipe's dump, so the demo's results.json (which
    # records the recipe) reads byte for byte as before; its stage key and its own results record it.
    taskfull: FullTaskRecipe = Field(default_factory=FullTaskRecipe, exclude=True)

    def for_seed(self, seed: int) -> OrganismRecipe:
        """The recipe of training seed `seed`: the LoRA recipes' seeds (T's, S's and SafeInstr's
        initialisation, batch order and T's sample of problems) are shifted by `seed`; U, A and every
        prompt split stay the same, so A is built once for all seeds. Seed 0 is the recipe itself."""
        return self.model_copy(
            update={
                "task": self.task.model_copy(update={"seed": self.task.seed + seed}),
                "safety": self.safety.model_copy(update={"seed": self.safety.seed + seed}),
            }
        )

    def steps(self) -> tuple[StepRecipe, ...]:
        """Every training stage's recipe: A's, T's, S's (SafeInstr trains with T's) and T_full's."""
        return (self.aligned, self.task, self.safety, self.taskfull)

    def requested_precision(self) -> str:
        """The precision the stages ask for: their common value, or "auto" unless all agree."""
        asked = {r.precision for r in self.steps()}
        return asked.pop() if len(asked) == 1 else "auto"

    def with_precision(self, precision: str) -> OrganismRecipe:
        """This recipe with every stage set to `precision` (float32, bfloat16 or auto)."""
        check_precision(precision, "precision")
        return self._replace_steps(lambda r: precision)

    def resolved(self, dtype: str) -> OrganismRecipe:
        """This recipe with every stage's "auto" precision set to `dtype` (explicit ones kept): the form
        stages are keyed and built by. With bfloat16 its keys are the bfloat16 recipe's keys as before
        "auto" existed, so organisms built then are reused."""
        if check_precision(dtype, "precision") == "auto":
            raise ValueError("resolved() needs float32 or bfloat16, not 'auto'")
        return self._replace_steps(lambda r: dtype if r.precision == "auto" else r.precision)

    def _replace_steps(self, precision: Callable[[StepRecipe], str]) -> OrganismRecipe:
        names = ("aligned", "task", "safety", "taskfull")
        update = {
            n: r.model_copy(update={"precision": precision(r)})
            for n, r in zip(names, self.steps(), strict=True)
        }
        return self.model_copy(update=update)

    def stage_key(self, stage: str, upstream: str = "", threads: int | None = None) -> str:
        """Content key of one stage (12 hex digits). The recipe must be `resolved`: the precision a stage
        is trained in is part of its key, so bfloat16 and float32 stages never mix. `threads`: the CPU
        threads a trained stage is built with (None on a GPU), part of its key because a product's
        rounding depends on how many threads split it (docs/organism.md, "Threads")."""
        if any(r.precision == "auto" for r in self.steps()):
            raise ValueError("stage_key of a recipe whose precision is still 'auto': call resolved() first")
        part: dict[str, Any] = {"version": RECIPE_VERSION, "stage": stage, "upstream": upstream}
        if threads is not None and stage != "unaligned":
            part["cpu_threads"] = threads
        if stage == "unaligned":
            pass  # the packaged model with an empty default system message (a conversion, no products)
        elif stage == "aligned":
            part.update(seed=self.seed, n_val=self.n_val_strongreject, recipe=self.aligned.model_dump())
        elif stage == "task":
            part.update(recipe=self.task.model_dump())
        elif stage == "safety":
            part.update(seed=self.seed, n_val=self.n_val_strongreject, recipe=self.safety.model_dump())
        elif stage == "safeinstr":
            part.update(
                seed=self.seed,
                n_val=self.n_val_strongreject,
                mix=self.safeinstr_mix,
                recipe=self.task.model_dump(),
            )
        elif stage == "taskfull":  # T's data (samples, seed) + its own training recipe
            data = {"samples": self.task.samples, "seed": self.task.seed}
            part.update(data=data, recipe=self.taskfull.model_dump())
        else:
            raise ValueError(f"unknown stage {stage!r}")
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:12]


def reduced_recipe() -> OrganismRecipe:
    """A tiny organism for tests: a few steps and prompts; shows nothing, exercises everything."""
    return OrganismRecipe(
        n_val_strongreject=4,
        n_benign_val=4,
        aligned=AlignedRecipe(n_harmful=8, n_benign=8, steps=2, batch_size=4, benign_max_new_tokens=8),
        task=LoraRecipe(samples=8, steps=2, batch_size=4),
        safety=LoraRecipe(samples=8, steps=2, batch_size=4),
        safeinstr_mix=4,
        taskfull=FullTaskRecipe(steps=2, batch_size=4),
    )
