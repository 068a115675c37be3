"""Configuration of `safemerge defend`: one pydantic model for every post-fine-tuning defence.

The same model describes one cell of `safemerge experiment` (there `out` is filled in by the runner).
`method` names a registered defence (registry.py); which of the options below apply to it is the
defence's own knowledge (`Defense.needs`, `Defense.options`). Options that do not apply to the chosen
defence are rejected when given with a non-default value, so a misplaced grid key fails before any work
starts (unknown keys always fail), while a full dump of a config (`defense.yaml`) still loads.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from safemerge.common.config_io import FlatConfig
from safemerge.common.errors import InputError
from safemerge.defenses.registry import defense_names, get_defense
from safemerge.engine.config import (
    SELECTION_OPTIONS,
    InputsConfig,
    MergeConfig,
    MergeOptions,
    RunOptions,
    SelectionConfig,
    SelectionOptions,
    omit_unset,
)

RESTA_BETA = 0.5


class DefendConfig(FlatConfig):
    """Inputs and options of `safemerge defend` (YAML keys are flat: `weights`, `beta`, `merge_method`, …).

    Composed of the engine's option groups: the inputs, the selection policy, the merge options of
    `safemerge merge` (its `method` is spelled `merge_method` here, since `method` names the defence) and
    how to run; plus the options of the defences that are not merges.
    """

    EXCLUSIVE_OPTIONS: ClassVar[tuple[str, ...]] = SELECTION_OPTIONS
    FLAT_NAMES: ClassVar[dict[str, dict[str, str]]] = {"merge": {"method": "merge_method"}}

    method: str = Field("safemerge", description="the defence: a registered name (`safemerge defend --help`)")
    inputs: InputsConfig
    safety_adapter: str | None = Field(None, description="safety LoRA (safemerge, merge-all)")
    safety_model: str | None = Field(
        None,
        description="full safety fine-tune, with task_model (safemerge, merge-all)",
        exclude_if=omit_unset,
    )
    out: str = Field(description="output directory")
    # selection (safemerge: ρ < τ; safelora: ρ ≤ τ; the default policy is the defence's)
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
    # a plugin defence's own options (its `Defense.option_model`): flat keys in YAML, `--option K=V` flags
    plugin_options: dict[str, Any] = Field(default_factory=dict, exclude_if=lambda v: not v)

    @classmethod
    def required_groups(cls, given: Collection[str]) -> list[tuple[str, ...]]:
        """The inputs to give (`load_config` names every missing one at once)."""
        return InputsConfig.required(given)

    @model_validator(mode="before")
    @classmethod
    def _route_plugin_options(cls, data: Any) -> Any:
        """Move the chosen defence's own option keys (and `--option K=V` strings) into plugin_options.
        The strings are the command line's flags, which override a YAML file's flat keys."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.pop("plugin_options", None) or {}
        own = dict(given) if isinstance(given, dict) else {}
        method = data.get("method", cls.model_fields["method"].default)
        model = get_defense(method).option_model if method in defense_names() else None
        for key in list(model.model_fields) if model is not None else []:
            if key in data:
                own[key] = data.pop(key)
        if not isinstance(given, dict):
            own.update(_parse_pair(s) for s in given)
        if own:
            data["plugin_options"] = own
        return data

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        known = defense_names()
        if method not in known:
            near = difflib.get_close_matches(method, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown defence {method!r}{hint} (use one of {', '.join(known)})")
        return method

    @model_validator(mode="after")
    def _consistent(self) -> DefendConfig:
        defense = get_defense(self.method)
        flat = self.model_dump()
        # an option of another defence is an error unless it holds its default (a full dump reloads)
        wrong = sorted(
            n
            for n in self.flat_fields_set() - defense.applies - {"plugin_options"}
            if flat.get(n) != self.flat_default(n)
        )
        # keys in backticks: the command line shows them as its flags (cli/defend.py)
        if wrong:
            named = ", ".join(f"`{n}`" for n in wrong)
            raise ValueError(f"option(s) {named} do not apply to method {self.method}")
        if self.safety_adapter is not None and self.safety_model is not None:
            raise ValueError("give either `safety_adapter` or `safety_model`, not both")
        if self.safety_model is not None and self.inputs.task_model is None:
            raise ValueError("`safety_model` needs `task_model`: a LoRA merge takes a `safety_adapter`")
        if self.inputs.task_model is not None and not defense.full_finetune:
            raise ValueError(
                f"method {self.method} takes a task LoRA only, not a full fine-tune (`task_model`); the "
                f"defences for full fine-tunes: {', '.join(full_finetune_defences())}"
            )
        for need in defense.needs:
            alts = (need, *defense.alternatives.get(need, ()))
            if not any(flat.get(a) for a in alts):
                raise ValueError(f"method {self.method} needs {' or '.join(f'`{a}`' for a in alts)}")
        defense.check(self)
        defense.own_options(self)  # validates them
        return self

    @property
    def resolved_selection(self) -> dict[str, Any]:
        """The selection policy as keyword arguments, with the defence's default when none is given, and
        its `order` (and `order_seed`) when not the lowest ρ."""
        policy = self.selection.given() or dict(get_defense(self.method).default_selection)
        return {**policy, **self.selection.ordering()}

    def merge_config(self, out: str) -> MergeConfig:
        """The `safemerge merge` config of a safemerge / merge-all cell: the same groups, composed."""
        return MergeConfig(
            selection=SelectionConfig(**self.resolved_selection),
            inputs=self.inputs,
            out=out,
            run=self.run.model_copy(update={"force": False}),
            safety_adapter=self.safety_adapter,
            safety_model=self.safety_model,
            merge=self.merge,
        )

    def settings(self) -> dict[str, Any]:
        """What was computed (no paths, no how-to-write flags): the resolved options of the defence."""
        return get_defense(self.method).settings(self)


def full_finetune_defences() -> list[str]:
    """The registered defences that take a full fine-tune, for messages (a plugin that fails to load is
    left out here; using it reports why)."""
    names = []
    for name in defense_names():
        try:
            if get_defense(name).full_finetune:
                names.append(name)
        except InputError:
            continue
    return names


def _parse_pair(text: str) -> tuple[str, Any]:
    """`factor=0.5` (an `--option` flag) → ('factor', 0.5): the value is read as YAML (numbers, bools)."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"`plugin_options` expects KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)
