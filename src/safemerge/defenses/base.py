"""The interface of a post-fine-tuning defence, and what running one returns.

A defence is a `Defense` object registered under its name in the entry-point group `safemerge.defenses`
(see registry.py and docs/extending.md). Everything the rest of safemerge needs to know about a defence —
what it writes, which inputs and options of `DefendConfig` it uses, its default selection policy, how the
report words its changes — is an attribute of that object, so adding a defence edits no list elsewhere.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from safemerge.common.config_io import plain_dump
from safemerge.engine.config import DEFAULT_THRESHOLD, ORDER_OPTIONS, SELECTION_OPTIONS
from safemerge.engine.report import Report

if TYPE_CHECKING:
    from safemerge.defenses.config import DefendConfig

Output = Literal["adapter", "model"]

# Options of every defence: the defence, its inputs, the output and how to run (DefendConfig's flat keys).
COMMON_OPTIONS = frozenset(
    {"method", "aligned", "unaligned", "task_adapter", "out", "device", "allow_pickle", "force", "plot"}
    | {"task_model", "modules", "subspace", "ignore_fingerprint"}
)
SELECTION = frozenset(SELECTION_OPTIONS)
# The order a ranking policy takes modules in (lowest ρ, highest, or a seeded random draw): a defence that
# lists these in `options` offers the selection controls (docs/defenses.md, "Selection controls").
ORDER = frozenset(ORDER_OPTIONS)
# Options that say how to write, or permit a value, not what is computed: left out of a defence's
# `settings` (so an experiment cell's key does not depend on them).
WRITE_OPTIONS = frozenset({"max_shard_size", "allow_any_weights"})


@dataclass
class DefenseResult:
    """What one defence wrote: `kind` says whether `out` holds an adapter or a full model."""

    method: str
    out: Path
    kind: Output
    modified: int  # modules merged / projected, or tensors edited (RESTA)
    report: Report
    full_model: Path | None = None  # the full model, when one was written

    @property
    def model_dir(self) -> Path | None:
        return self.out if self.kind == "model" else self.full_model


class Defense(ABC):
    """A post-fine-tuning defence: `safemerge defend --method NAME`, a `method:` of an experiment.

    Subclasses set the class attributes and implement `run`; the registered object is an instance.
    `DefendConfig` rejects an option of another defence given with a non-default value, so `needs` and
    `options` must list every `DefendConfig` key the defence reads besides `COMMON_OPTIONS`.
    """

    name: str  # the --method value; equals the entry point's name
    output: Output  # what `out` holds: a PEFT adapter or a full model
    needs: tuple[str, ...] = ()  # inputs that must be given, e.g. ("safety_adapter",)
    # inputs that may stand in for one of `needs`, e.g. {"safety_adapter": ("safety_model",)}
    alternatives: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    # whether it takes a full fine-tune (`task_model`) as well as a task LoRA (docs/defenses.md)
    full_finetune: bool = False
    options: frozenset[str] = frozenset()  # the other DefendConfig keys it reads
    # the selection policy when none is given (used when `options` include the selection options)
    default_selection: Mapping[str, Any] = MappingProxyType({"threshold": DEFAULT_THRESHOLD})
    changed_verb: str = "changed"  # the report's "N of M LoRA modules <verb>"
    # A plugin's own options (flat YAML keys / `--option KEY=VALUE`), validated by this model; the
    # validated values are `cfg.plugin_options` (read them with `self.own_options(cfg)`).
    option_model: type[BaseModel] | None = None
    # The defence's main knob(s) and the values `safemerge organism compare` sweeps on validation before
    # choosing one setting at matched utility (docs/organism.md, "Which defence"); empty: not compared.
    sweep: Mapping[str, tuple[Any, ...]] = MappingProxyType({})

    @abstractmethod
    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        """Compute the defence and write everything into `tmp`, which becomes `out` on success.

        Paths recorded in reports and in the result name `out` (the final directory), not `tmp`.
        """

    @property
    def applies(self) -> frozenset[str]:
        """Every DefendConfig key this defence reads."""
        return COMMON_OPTIONS | frozenset(self.needs) | self.options | self._alternative_inputs

    @property
    def _alternative_inputs(self) -> frozenset[str]:
        return frozenset(name for alts in self.alternatives.values() for name in alts)

    @property
    def selects(self) -> bool:
        """Whether the user chooses the modules (threshold / top_k / fraction apply)."""
        return bool(SELECTION & self.options)

    def check(self, cfg: DefendConfig) -> None:
        """Consistency checks beyond which options apply; raise ValueError naming the option in backticks
        (`factor`: the command line shows it as its flag, `--option factor`)."""
        return None  # none by default

    def own_options(self, cfg: DefendConfig) -> BaseModel | None:
        """The defence's own options (`option_model`) validated from `cfg.plugin_options`; a bad one is a
        ValueError naming it in backticks (the command line shows it as `--option KEY`)."""
        if self.option_model is None:
            if cfg.plugin_options:
                given = ", ".join(f"`{k}`" for k in sorted(cfg.plugin_options))
                raise ValueError(f"method {self.name} takes no options of its own (got {given})")
            return None
        try:
            return self.option_model.model_validate(cfg.plugin_options)
        except ValidationError as exc:
            raise ValueError("; ".join(self._option_error(e) for e in exc.errors())) from None

    def _option_error(self, error: Any) -> str:
        """One pydantic error of the own options, worded for the user: an unknown key with the closest
        known one (difflib, as for YAML keys) and the list of options, else the key and the problem."""
        assert self.option_model is not None
        key = ".".join(map(str, error["loc"]))
        if error["type"] != "extra_forbidden":
            return f"`{key}`: {error['msg']}"
        known = list(self.option_model.model_fields)
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        return f"`{key}` is not an option of method {self.name}{hint} (its options: {', '.join(known)})"

    def settings(self, cfg: DefendConfig) -> dict[str, Any]:
        """What was computed (no paths, no how-to-write flags), for reports and experiment cells."""
        keep = self.options - SELECTION - ORDER - WRITE_OPTIONS - frozenset(self.needs)
        keep -= self._alternative_inputs
        data = {k: v for k, v in plain_dump(cfg).items() if k in keep}
        if self.selects:
            data.update(cfg.resolved_selection)
        own = self.own_options(cfg)
        if own is not None:
            data.update(own.model_dump(mode="json"))
        return {"method": cfg.method, **dict(sorted(data.items()))}

    def report_notes(self, cfg: DefendConfig) -> list[str]:
        """Lines the Markdown report shows under the summary (default: none)."""
        return []
