"""Safe LoRA (Hsu et al., NeurIPS 2024): B_f ← C B_f on the selected modules, C = V Vᵀ / ‖V‖_F.

Selection: round(ρ, 5) ≤ τ (as published, default τ = 0.5), exactly the k lowest ρ, or a fraction.
`zero-V` modules (C = 0/0 is undefined there, so projecting them is impossible) are never selected by
the threshold (the published cosine is NaN there, and NaN ≤ τ is false) and are ranked last by the
ranking policies (the published code never projects them either and fills k from the other modules). All ρ
are computed first from the unmodified task adapter, then the selection, then the projection, and
nothing is mutated while deciding. (The published top-k code also decided from unmodified weights —
every cosine came from a deep copy of the task model — but it wrote projected B's into the model during
its first, cosine-collecting pass and relied on the second pass to overwrite every B; docs/defenses.md.)
Output: a PEFT adapter of the task adapter's rank (+ `full_model/` with `merge_into_base`); for a full
fine-tune (`task_model`), ΔW_f ← C ΔW_f on the selected modules, written as a full model.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from safemerge.common.errors import InputError
from safemerge.defenses.base import SELECTION, Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import move_up, scan_config, unaligned_of, without_selection
from safemerge.defenses.tensors import project_update, rescale, safelora_project
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.config import SelectionConfig
from safemerge.engine.criterion import DECISION_DECIMALS, safety_difference
from safemerge.engine.fullft import change_norm
from safemerge.engine.lora import LoraAdapter, LoraFactors, write_adapter
from safemerge.engine.merging import exact_merge, pad_rank
from safemerge.engine.pipeline import (
    dtype_name,
    lora_delta_norm,
    open_checkpoint,
    output_scaling,
    ranked_last,
    resolve_device,
    run_full_scan,
    run_scan,
    select,
)
from safemerge.engine.report import ModuleRecord
from safemerge.engine.writer import write_merged_model, write_model

SAFELORA_THRESHOLD = 0.5  # Safe LoRA's published default (select ρ ≤ 0.5)
SAFELORA_TOP_K = 10  # Safe LoRA's published default in top-k mode
SAFELORA_NAME = "safelora"

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def safelora_selection(rhos: list[float], cfg: DefendConfig, last: Collection[int] = ()) -> list[bool]:
    """Safe LoRA's selection under the defence config's policy (`select_by_policy`)."""
    return select_by_policy(rhos, cfg.resolved_selection, last)


def select_by_policy(rhos: list[float], policy: Mapping[str, Any], last: Collection[int] = ()) -> list[bool]:
    """Safe LoRA's policies: round(ρ, 5) ≤ τ (as published), or exactly k modules, or a fraction. The
    indices in `last` (the `zero-V` modules) are never selected by the threshold (as published: their
    cosine is NaN) and are placed after all others by the ranking policies."""
    if "threshold" in policy:
        tau = float(policy["threshold"])
        # a zero-V module's cosine is NaN in the published code, and NaN <= τ is false: never selected
        return [i not in last and round(r, DECISION_DECIMALS) <= tau for i, r in enumerate(rhos)]
    return select(rhos, SelectionConfig(**policy), last)


ZERO_V_NOT_SELECTED = "zero-V: not selected (projection undefined)"


def flag_unselected_zero_v(records: Sequence[ModuleRecord], chosen: Sequence[bool]) -> None:
    """Flag the `zero-V` modules the selection left out, saying why (docs/defenses.md, Safe LoRA)."""
    for i in ranked_last(list(records)):
        if not chosen[i]:
            records[i].flags.append(ZERO_V_NOT_SELECTED)


def policy_label(policy: Mapping[str, Any]) -> str:
    """The selection policy as the report states it."""
    if "threshold" in policy:
        return f"threshold (rho <= {policy['threshold']})"
    if "top_k" in policy:
        return f"top-k (k={policy['top_k']})"
    return f"fraction ({policy['fraction']})"


class SafeLora(Defense):
    """Safe LoRA's projection of the selected modules' B onto the alignment directions."""

    name = SAFELORA_NAME
    output = "adapter"
    options = SELECTION | frozenset({"merge_into_base", "max_shard_size", "preserve_norm"})
    default_selection = MappingProxyType({"threshold": SAFELORA_THRESHOLD})
    sweep = MappingProxyType({"threshold": (0.2, 0.3, 0.4, 0.5, 0.6)})  # ρ ≤ τ: from few modules to most
    changed_verb = "projected (B ← C·B)"
    full_finetune = True

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        if cfg.inputs.task_model is not None:
            return run_full(cfg, tmp, out, progress)
        # One read-only pass computes every ρ first; then selection; then projection.
        unaligned_name = unaligned_of(cfg)  # before the scan: Safe LoRA needs V itself, not a sketch
        report, task, aligned = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        assert aligned is not None  # InputsConfig: with unaligned, aligned is given
        unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
        device = resolve_device(cfg.run.device)
        chosen = safelora_selection([r.rho for r in report.modules], cfg, ranked_last(report.modules))
        flag_unselected_zero_v(report.modules, chosen)
        rank = max(task.rank(m) for m in task.lora_modules)
        out_scale, alpha = output_scaling([task.scaling(m) for m in task.lora_modules], rank)
        factors: Factors = {}
        for rec, pick in zip(report.modules, chosen, strict=True):
            rec.selected = pick
            a, b = exact_merge(task.factors(rec.name), None, 1.0, 0.0, out_scale)
            if pick:
                v = safety_difference(
                    aligned.get(find_module_weight(aligned, rec.name)).to(device),
                    unaligned.get(find_module_weight(unaligned, rec.name)).to(device),
                )
                projected = safelora_project(v.T if task.fan_in_fan_out else v, b.to(device))
                if projected is None:
                    rec.flags.append("zero-V: projection undefined, module left unchanged")
                else:
                    b = projected.cpu()
                    if cfg.preserve_norm:
                        b = rescale(b, rec.delta_norm_in, lora_delta_norm(LoraFactors(a, b, out_scale)))
                    rec.merged = True
            a, b = pad_rank(a, b, rank)
            factors[rec.name] = (a, b)
            rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, out_scale))
        report.options = safelora_options(report.options, cfg) | {
            "output_rank": rank,
            "output_scaling": out_scale,
            "output_lora_alpha": alpha,
            "output_dtype": dtype_name(task.output_dtype()),
        }
        full = write_outputs(cfg, tmp, out, task, aligned, factors, (rank, alpha, out_scale), progress)
        report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
        if full:
            report.outputs["full_model"] = str(full)
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", report.summary["merged"], report, full)

    def report_notes(self, cfg: DefendConfig) -> list[str]:
        return [
            "Safe LoRA's C = V Vᵀ/‖V‖_F is not a projector (eigenvalues σ_j²/‖V‖_F), so B ← C B also",
            "rescales the update: compare ‖ΔW‖ in and out below"
            + (" (here rescaled back: preserve_norm)." if cfg.preserve_norm else "."),
            "",
        ]


def safelora_options(options: dict[str, Any], cfg: DefendConfig) -> dict[str, Any]:
    """The scan's options with Safe LoRA's selection policy and `preserve_norm`."""
    return policy_options(options, cfg.resolved_selection, cfg.preserve_norm)


def policy_options(options: dict[str, Any], policy: Mapping[str, Any], preserve_norm: bool) -> dict[str, Any]:
    """The scan's options with a Safe LoRA selection policy and `preserve_norm` (the report's record)."""
    return {
        **without_selection(options),
        **policy,
        "selection_policy": policy_label(policy),
        "preserve_norm": preserve_norm,
    }


def run_full(cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
    """Safe LoRA on a full fine-tune: ΔW_f ← C ΔW_f on the selected modules (W = W_al + C ΔW_f), every other
    tensor the task model's. All ρ first, then the selection, then the projection, as for LoRAs."""
    if cfg.merge.merge_into_base:
        raise InputError(
            "`merge_into_base` does not apply to `task_model`: the output is already a full model"
        )
    unaligned_name = unaligned_of(cfg)
    report, task, aligned = run_full_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
    unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
    device = resolve_device(cfg.run.device)
    chosen = safelora_selection([r.rho for r in report.modules], cfg, ranked_last(report.modules))
    flag_unselected_zero_v(report.modules, chosen)
    records = {}
    for rec, pick in zip(report.modules, chosen, strict=True):
        rec.selected = pick
        rec.delta_norm_out = rec.delta_norm_in
        if pick:
            records[rec.name + ".weight"] = rec

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        rec = records.get(name)
        if rec is None:
            return t
        w_al = aligned.get(name).to(device)
        v = safety_difference(w_al, unaligned.get(name).to(device))
        delta = t.to(device=device, dtype=torch.float64) - w_al.to(torch.float64)
        flip = task.transposed  # Conv1D: stored ΔWᵀ, and C acts on the output side
        projected = project_update(v.T if flip else v, delta.T if flip else delta)
        if projected is None:
            rec.flags.append("zero-V: projection undefined, module left unchanged")
            return t
        if cfg.preserve_norm:
            projected = rescale(projected, rec.delta_norm_in, float(torch.linalg.vector_norm(projected)))
        new = (w_al.to(torch.float64) + (projected.T if flip else projected)).to(t.dtype).cpu()
        rec.merged = True
        rec.delta_norm_out = change_norm(new, aligned.get(name))
        return new

    inner = tmp / "_model"
    write_model(task.checkpoint, edit, inner, cfg.merge.max_shard_size, progress)
    move_up(inner, tmp)
    report.options = safelora_options(report.options, cfg)
    report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    write_defense_report(report, tmp, cfg)
    return DefenseResult(SAFELORA_NAME, out, "model", report.summary["merged"], report, out)


def write_outputs(
    cfg: DefendConfig,
    tmp: Path,
    out: Path,
    task: LoraAdapter,
    aligned: Checkpoint,
    factors: Factors,
    shape: tuple[int, float, float],
    progress: bool,
) -> Path | None:
    """Write the adapter (rank, lora_alpha, scaling = `shape`) and, with merge_into_base, the full model."""
    rank, alpha, out_scale = shape
    dtype = task.output_dtype()  # float32 for a half-precision task adapter (docs/engine.md)
    stored = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in factors.items()}
    # Safe LoRA reads the unaligned model, so InputsConfig has required the aligned one: it is the base.
    write_adapter(tmp, task.config, stored, rank, alpha, cfg.inputs.aligned, task.read_extra())
    if not cfg.merge.merge_into_base:
        return None
    deltas = {m: (a.to(torch.float32), b.to(torch.float32), out_scale) for m, (a, b) in stored.items()}
    write_merged_model(
        aligned, deltas, task.fan_in_fan_out, tmp / "full_model", cfg.merge.max_shard_size, progress
    )
    return out / "full_model"


DEFENSE = SafeLora()
