"""SafeMERGE and merge-all: the engine's `safemerge merge`, run as a defence.

`safemerge` merges the selected modules (round(ρ,5) < τ, or top-k / fraction) with the safety LoRA;
`merge-all` is the same merge on every module (the `fraction = 1` policy). With `order: highest` or
`order: random` (and `top_k`), `safemerge` merges the highest-ρ modules or a seeded random draw instead:
the selection controls of docs/defenses.md. The output is exactly what
`safemerge merge` writes (a PEFT adapter, plus `full_model/` with `merge_into_base`; for a full fine-tune,
`task_model`, the merged full model).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from safemerge.defenses.base import ORDER, SELECTION, Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import move_up
from safemerge.engine.pipeline import merge, merge_config_yaml

# The options of `safemerge merge` besides its inputs and selection, and the full-model output.
MERGE_OPTIONS = frozenset(
    {"weights", "allow_any_weights", "mode", "merge_method", "density", "seed", "rank", "allow_partial"}
)
FULL_MODEL_OPTIONS = frozenset({"merge_into_base", "max_shard_size"})


class SafeMerge(Defense):
    """SafeMERGE (Djuhera et al. 2025): ΔW = w_f ΔW_f + w_s ΔW_s on the selected modules."""

    name = "safemerge"
    output = "adapter"
    needs = ("safety_adapter",)
    alternatives = MappingProxyType({"safety_adapter": ("safety_model",)})
    full_finetune = True
    options = SELECTION | ORDER | MERGE_OPTIONS | FULL_MODEL_OPTIONS
    policy_label: str | None = None  # replaces the engine's selection policy in the report

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        inner = tmp / "_merge"
        report = merge(cfg.merge_config(str(inner)), progress=progress)
        move_up(inner, tmp)
        # the merge ran in a temporary directory; its config and report name the final one
        report.outputs = {k: v.replace(str(inner), str(out)) for k, v in report.outputs.items()}
        report.options["out"] = str(out)
        (tmp / "safemerge.yaml").write_text(merge_config_yaml(cfg.merge_config(str(out))))
        if self.policy_label:
            report.options["selection_policy"] = self.policy_label
        write_defense_report(report, tmp, cfg)
        merged = report.summary["merged"]
        if cfg.inputs.task_model is not None:  # a full fine-tune: `out` is the merged full model
            return DefenseResult(self.name, out, "model", merged, report, out)
        full = out / "full_model" if cfg.merge.merge_into_base else None
        return DefenseResult(self.name, out, "adapter", merged, report, full)


class MergeAll(SafeMerge):
    """The same merge on every module, without selection."""

    name = "merge-all"
    options = MERGE_OPTIONS | FULL_MODEL_OPTIONS
    default_selection = MappingProxyType({"fraction": 1.0})
    sweep = MappingProxyType({"weights": ((0.8, 0.2), (0.7, 0.3), (0.6, 0.4), (0.5, 0.5))})
    policy_label = "all modules (merge-all)"


SAFEMERGE = SafeMerge()
MERGE_ALL = MergeAll()
