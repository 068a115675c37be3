"""Interpolation towards the aligned model: ΔW' = α ΔW_f, the "merge before and after" baseline.

Farn et al., "Safeguard Fine-Tuned LLMs Through Pre- and Post-Tuning Model Merging" (arXiv 2412.19512)
merge the weights of the aligned model and of its fine-tune, W = (1 − α) W_al + α W_ft = W_al + α ΔW_f.
For a task LoRA (ΔW_f = s B A) that is exact as B ← α B on every module (A and the scaling unchanged):
a PEFT adapter of the task adapter's rank (+ `full_model/` with `merge_into_base`). For a full fine-tune
(`task_model`) every floating-point tensor becomes W_al + α (W_task − W_al), computed in float64 and
stored in the task model's dtype, so tensors the fine-tune left alone are the aligned model's bit for bit.
No selection, no safety model: ρ is reported only (docs/defenses.md, "interpolate").
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import cast

import torch
from pydantic import BaseModel, ConfigDict, Field

from safemerge.common.errors import InputError
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.safelora import Factors, write_outputs
from safemerge.defenses.steps import move_up, scan_config, without_selection
from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.fullft import change_norm
from safemerge.engine.lora import LoraFactors
from safemerge.engine.merging import exact_merge, pad_rank
from safemerge.engine.pipeline import (
    dtype_name,
    lora_delta_norm,
    output_scaling,
    run_full_scan,
    run_scan,
    warn_in_report,
)
from safemerge.engine.writer import write_model

# The midpoint: equal weights for the models before and after fine-tuning (plain weight averaging). This
# project's default, not a value taken from the paper or tuned: sweep `alpha` with a grid.
DEFAULT_ALPHA = 0.5


class InterpolateOptions(BaseModel):
    """`interpolate`'s own option (flat YAML key, or `--option alpha=0.3`)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        DEFAULT_ALPHA,
        ge=0.0,
        le=1.0,
        description="weight of the fine-tuned update: W = W_al + alpha·ΔW_f (0: the aligned model, 1: the "
        "fine-tune unchanged); default 0.5, the plain average of the models before and after fine-tuning",
    )


def alpha_of(cfg: DefendConfig) -> float:
    return InterpolateOptions.model_validate(cfg.plugin_options).alpha


def interpolated(w_aligned: torch.Tensor, w_task: torch.Tensor, alpha: float) -> torch.Tensor:
    """W_al + α (W_task − W_al) in float64, cast to W_task's dtype (non-float tensors: W_task unchanged)."""
    if not w_task.is_floating_point():
        return w_task
    w_al = w_aligned.to(torch.float64)
    return (w_al + alpha * (w_task.to(torch.float64) - w_al)).to(w_task.dtype)


class Interpolate(Defense):
    """Scale the fine-tuning update by α on every module (LoRA: B ← α B)."""

    name = "interpolate"
    output = "adapter"
    options = frozenset({"merge_into_base", "max_shard_size"})
    changed_verb = "scaled (B ← α·B)"
    full_finetune = True
    option_model = InterpolateOptions
    sweep = MappingProxyType({"alpha": (0.2, 0.4, 0.6, 0.8)})  # α = 1 is T itself, α = 0 is A

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        if cfg.inputs.task_model is not None:
            return self.run_full(cfg, tmp, out, progress)
        alpha = alpha_of(cfg)
        report, task, aligned = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        if cfg.merge.merge_into_base and aligned is None:  # a scan from a sketch needs no aligned model
            raise InputError("`merge_into_base` needs the aligned model (`aligned`) to merge into")
        rank = max(task.rank(m) for m in task.lora_modules)
        out_scale, lora_alpha = output_scaling([task.scaling(m) for m in task.lora_modules], rank)
        factors: Factors = {}
        for rec in report.modules:
            a, b = exact_merge(task.factors(rec.name), None, 1.0, 0.0, out_scale)
            a, b = pad_rank(a, b * alpha, rank)
            factors[rec.name] = (a, b)
            rec.selected = rec.merged = True
            rec.w_task = alpha
            rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, out_scale))
        if task.extra_keys:
            warn_in_report(
                report,
                "interpolate scales the LoRA updates only; the non-LoRA tensors (modules_to_save) "
                f"{', '.join(task.extra_keys)} are copied unchanged",
            )
        report.options = without_selection(report.options) | {
            "selection_policy": f"interpolate (every module, ΔW ← {alpha}·ΔW)",
            "alpha": alpha,
            "output_rank": rank,
            "output_scaling": out_scale,
            "output_lora_alpha": lora_alpha,
            "output_dtype": dtype_name(task.output_dtype()),
        }
        # the aligned checkpoint is read only with merge_into_base (checked above)
        shape = (rank, lora_alpha, out_scale)
        full = write_outputs(cfg, tmp, out, task, cast(Checkpoint, aligned), factors, shape, progress)
        report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
        if full:
            report.outputs["full_model"] = str(full)
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", len(report.modules), report, full)

    def run_full(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        """W_al + α (W_task − W_al) on every floating-point tensor of a full fine-tune."""
        if cfg.merge.merge_into_base:
            raise InputError(
                "`merge_into_base` does not apply to `task_model`: the output is already a full model"
            )
        alpha = alpha_of(cfg)
        report, task, aligned = run_full_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        records = {rec.name + ".weight": rec for rec in report.modules}
        changed = 0

        def edit(name: str, t: torch.Tensor) -> torch.Tensor:
            nonlocal changed
            w_al = aligned.get(name)
            new = interpolated(w_al, t, alpha)
            changed += int(not torch.equal(new, t))
            rec = records.get(name)
            if rec is not None:
                rec.selected = rec.merged = True
                rec.w_task = alpha
                rec.delta_norm_out = change_norm(new, w_al)
            return new

        inner = tmp / "_model"
        write_model(task.checkpoint, edit, inner, cfg.merge.max_shard_size, progress)
        move_up(inner, tmp)
        report.options = without_selection(report.options) | {
            "selection_policy": f"interpolate (every tensor, W_al + {alpha}·(W_task − W_al))",
            "alpha": alpha,
            "edited_tensors": changed,
        }
        report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "model", changed, report, out)


DEFENSE = Interpolate()
