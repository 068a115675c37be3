"""Antidote (Huang et al., 2024, github.com/git-disl/Antidote): after fine-tuning, set to zero the weights
with the largest harmful-data importance, Wanda's score |W_ij| · ‖X_j‖₂ (docs/defenses.md, "Antidote").

As the reference code: the score is taken in the *fine-tuned* model over the calibration data, ranked
within each output row (row i prunes the top `cols − ⌊cols·(1 − ratio)⌋` entries, ties broken by
position), and

- on a LoRA, the pruned weights are the LoRA factors' entries: A (r × d_in) with X the module's input,
  B (d_out × r) with X = A x (the input of `lora_B`); the output is the pruned adapter;
- on a full fine-tune (`task_model`), they are the fine-tuned weights themselves (the reference's
  full-fine-tuning mode, on q/k/v there: use `--modules` to restrict); the output is a full model.

Decisions of ours: X is read over the response tokens of the calibration examples (the reference reads
whole harmful prompt+answer sequences: give harmful answers as `calibration` to match it), and every
module of the task LoRA (or of the scan) is pruned.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from pydantic import ConfigDict, Field

from safemerge.defenses.base import DefenseResult
from safemerge.defenses.calibration import CalibrationOptions
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.forward import (
    CalibratedDefense,
    Scanned,
    change_norm,
    finetuned_model,
    finish_report,
    input_grams,
    write_full_model,
)
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import without_selection
from safemerge.engine.lora import LoraAdapter, LoraFactors, write_adapter
from safemerge.engine.merging import exact_merge, pad_rank
from safemerge.engine.pipeline import dtype_name, lora_delta_norm, output_scaling, resolve_device

F64 = torch.float64


class AntidoteOptions(CalibrationOptions):
    """Antidote's options: the pruning ratio and the calibration data."""

    model_config = ConfigDict(extra="forbid")

    ratio: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="antidote: share of each weight row set to zero, the highest |W|·‖X‖ first (the "
        "reference's dense_ratio, default 0.1)",
    )


def wanda_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ with ‖X_j‖₂² = G_jj, G = Σ x xᵀ of the layer's inputs (float64)."""
    norms = torch.sqrt(torch.clamp(torch.diagonal(gram.to(F64)), min=0.0))
    return weight.to(F64).abs() * norms.unsqueeze(0)


def prune_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where pruned: in each row the entries above the ⌊cols·(1 − ratio)⌋ lowest scores (reference:
    a stable ascending sort per row keeps the lowest, ties in column order)."""
    cols = scores.shape[1]
    keep = int(cols * (1 - ratio))
    order = torch.sort(scores, dim=1, stable=True).indices
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def prune_lora(
    a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, ratio: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks (True = pruned) of A (scores with the module's input G) and B (input A x: G_B = A G Aᵀ)."""
    a64 = a.to(F64)
    mask_a = prune_mask(wanda_scores(a64, gram), ratio)
    mask_b = prune_mask(wanda_scores(b, a64 @ gram.to(F64) @ a64.T), ratio)
    return mask_a, mask_b


class Antidote(CalibratedDefense):
    """Antidote: one-shot Wanda pruning of the harmful-data-important weights."""

    name = "antidote"
    output = "adapter"
    full_finetune = True
    options = frozenset({"seed", "max_shard_size"})
    option_model = AntidoteOptions
    # Pruning 5% already cost the organism's task ~17 validation points, so the sweep starts lower.
    sweep = MappingProxyType({"ratio": (0.01, 0.02, 0.05, 0.1)})
    calibration_kind = "harmful examples"
    changed_verb = "pruned (Antidote)"

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        scanned, encoded, opts = self.prepare(cfg, progress)
        assert isinstance(opts, AntidoteOptions)
        model = finetuned_model(scanned, resolve_device(cfg.run.device))
        grams = input_grams(model, scanned.targets, encoded)
        del model
        info: dict[str, Any] = {"ratio": opts.ratio, "calibration_examples": len(encoded)}
        if isinstance(scanned.task, LoraAdapter):
            return self.run_lora(cfg, scanned, scanned.task, grams, (tmp, out), info)
        new: dict[str, torch.Tensor] = {}
        pruned = 0
        for t in scanned.targets:
            w = t.w_ft
            mask = prune_mask(wanda_scores(w, grams[t.module]), opts.ratio)
            new[t.key] = torch.where(mask, torch.zeros_like(w), w)
            pruned += int(mask.sum())
            t.rec.merged = True
            t.rec.delta_norm_out = change_norm(new[t.key], t.w_al)
        write_full_model(cfg, scanned, new, tmp, progress)
        policy = f"Antidote (ratio={opts.ratio}): {pruned} weights of the fine-tuned model set to zero"
        report = finish_report(cfg, scanned, out, tmp, policy, info | {"pruned_entries": pruned})
        return DefenseResult(self.name, out, "model", len(new), report, out)

    def run_lora(
        self,
        cfg: DefendConfig,
        scanned: Scanned,
        task: LoraAdapter,
        grams: dict[str, torch.Tensor],
        dirs: tuple[Path, Path],
        info: dict[str, Any],
    ) -> DefenseResult:
        """The pruned task adapter (same rank; factors stored as the engine stores merged adapters)."""
        tmp, out = dirs
        ratio = float(info["ratio"])
        rank = max(task.rank(m) for m in task.lora_modules)
        out_scale, alpha = output_scaling([task.scaling(m) for m in task.lora_modules], rank)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pruned = 0
        for t in scanned.targets:
            raw = task.factors(t.rec.name)
            mask_a, mask_b = prune_lora(raw.A, raw.B, grams[t.module], ratio)
            a, b = exact_merge(raw, None, 1.0, 0.0, out_scale)  # scaling folded in; masks are per entry
            a, b = a.masked_fill(mask_a, 0.0), b.masked_fill(mask_b, 0.0)
            pruned += int(mask_a.sum()) + int(mask_b.sum())
            factors[t.rec.name] = pad_rank(a, b, rank)
            t.rec.merged = True
            t.rec.delta_norm_out = lora_delta_norm(LoraFactors(*factors[t.rec.name], out_scale))
        dtype = task.output_dtype()
        stored = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in factors.items()}
        write_adapter(tmp, task.config, stored, rank, alpha, cfg.inputs.aligned, task.read_extra())
        report = scanned.report
        for rec in report.modules:
            rec.selected = True
        report.options = without_selection(report.options) | {
            "selection_policy": f"Antidote (ratio={ratio}): {pruned} LoRA factor entries set to zero",
            **info,
            "pruned_entries": pruned,
            "output_rank": rank,
            "output_scaling": out_scale,
            "output_lora_alpha": alpha,
            "output_dtype": dtype_name(dtype),
        }
        report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", len(factors), report)


DEFENSE = Antidote()
