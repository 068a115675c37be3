"""`defend(DefendConfig)`: run one post-fine-tuning defence and write its output atomically.

| method     | output in `out`                                   | what changes                          |
|------------|---------------------------------------------------|---------------------------------------|
| safemerge  | PEFT adapter (+ full model with merge_into_base)  | selected modules merged with safety   |
| merge-all  | PEFT adapter                                      | every module merged with safety       |
| safelora   | PEFT adapter (+ full model with merge_into_base)  | B_f ← C B_f on selected modules       |
| resta      | full model (sharded safetensors, config, tokenizer) | W_al + ΔW_f + β V on the scope        |
| none       | the task adapter, byte for byte                   | nothing                               |

Every output also holds `safemerge_report.{json,md}`, `similarity.png` and `defense.yaml`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from safemerge.common.errors import InputError
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import TensorEdit, write_defense_report
from safemerge.defenses.tensors import dare, rescale, resta_weight, safelora_project
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.config import ScanConfig, SelectionConfig
from safemerge.engine.criterion import DECISION_DECIMALS, safety_difference
from safemerge.engine.lora import LoraAdapter, LoraFactors, write_adapter
from safemerge.engine.merging import exact_merge, module_seed, pad_rank
from safemerge.engine.pipeline import (
    Report,
    lora_delta_norm,
    merge,
    open_checkpoint,
    output_scaling,
    resolve_device,
    run_scan,
    select,
)
from safemerge.engine.writer import write_merged_model, write_model

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Checkpoint keys that are not linear layers even when 2-D (RESTA's all-linear scope skips them).
NON_LINEAR_MARKERS = ("embed", "lm_head", "wte", "wpe", "norm", "ln_")


@dataclass
class DefenseResult:
    """What one defence wrote: `kind` says whether `out` holds an adapter or a full model."""

    method: str
    out: Path
    kind: Literal["adapter", "model"]
    modified: int  # modules merged / projected, or tensors edited (RESTA)
    report: Report
    full_model: Path | None = None  # the full model, when one was written

    @property
    def model_dir(self) -> Path | None:
        return self.out if self.kind == "model" else self.full_model


def defend(cfg: DefendConfig, progress: bool = False) -> DefenseResult:
    """Run the configured defence; everything lands in `cfg.out` (temporary directory renamed at the end)."""
    out = Path(cfg.out)
    check_output_dir(out, cfg.run.force)
    runners = {
        "safemerge": _merge,
        "merge-all": _merge,
        "safelora": _safelora,
        "resta": _resta,
        "none": _none,
    }
    with atomic_output_dir(out, cfg.run.force) as tmp:
        result = runners[cfg.method](cfg, tmp, out, progress)
    return result


def _scan_config(cfg: DefendConfig, selection: dict[str, object] | None = None) -> ScanConfig:
    policy = selection if selection is not None else cfg.resolved_selection
    run = cfg.run.model_copy(update={"force": False})
    return ScanConfig(selection=SelectionConfig(**policy), inputs=cfg.inputs, run=run)


def _move_up(inner: Path, outer: Path) -> None:
    """Move every entry of `inner` into `outer` and remove `inner`."""
    for entry in inner.iterdir():
        entry.rename(outer / entry.name)
    inner.rmdir()


# --- safemerge / merge-all ------------------------------------------------------------------------
def _merge(cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
    inner = tmp / "_merge"
    report = merge(cfg.merge_config(str(inner)), progress=progress)
    _move_up(inner, tmp)
    report.outputs = {k: v.replace(str(inner), str(out)) for k, v in report.outputs.items()}
    if cfg.method == "merge-all":
        report.options["selection_policy"] = "all modules (merge-all)"
    write_defense_report(report, tmp, cfg)
    full = out / "full_model" if cfg.merge.merge_into_base else None
    return DefenseResult(cfg.method, out, "adapter", report.summary["merged"], report, full)


# --- Safe LoRA ------------------------------------------------------------------------------------
def safelora_selection(rhos: list[float], cfg: DefendConfig) -> list[bool]:
    """Safe LoRA's policies: round(ρ, 5) ≤ τ (as published), or exactly k modules, or a fraction."""
    sel = cfg.resolved_selection
    if "threshold" in sel:
        tau = float(sel["threshold"])
        return [round(r, DECISION_DECIMALS) <= tau for r in rhos]
    return select(rhos, _scan_config(cfg).selection)


def _safelora(cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
    # One read-only pass computes every ρ first (the published code projected during this pass in
    # top-k mode, so later decisions saw already-projected weights); then selection; then projection.
    report, task, aligned = run_scan(_scan_config(cfg, {"fraction": 0.0}), "defend", progress)
    unaligned, _ = open_checkpoint(cfg.inputs.unaligned, "unaligned", cfg.run.allow_pickle)
    device = resolve_device(cfg.run.device)
    chosen = safelora_selection([r.rho for r in report.modules], cfg)
    rank = max(r.rank_task for r in report.modules)
    out_scale, alpha = output_scaling([task.scaling(m) for m in task.lora_modules], rank)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for rec, pick in zip(report.modules, chosen, strict=True):
        rec.selected = pick
        tf = task.factors(rec.name)
        a, b = exact_merge(tf, None, 1.0, 0.0, out_scale)
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
    policy = cfg.resolved_selection
    report.options = {
        **{k: v for k, v in report.options.items() if k not in ("threshold", "top_k", "fraction")},
        **policy,
        "selection_policy": _safelora_policy(policy),
        "preserve_norm": cfg.preserve_norm,
        "output_rank": rank,
        "output_scaling": out_scale,
        "output_lora_alpha": alpha,
    }
    full = _write_adapter_outputs(cfg, tmp, out, task, aligned, factors, rank, alpha, out_scale, progress)
    report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
    if full:
        report.outputs["full_model"] = str(full)
    write_defense_report(report, tmp, cfg)
    return DefenseResult("safelora", out, "adapter", report.summary["merged"], report, full)


def _safelora_policy(policy: dict[str, object]) -> str:
    if "threshold" in policy:
        return f"threshold (rho <= {policy['threshold']})"
    if "top_k" in policy:
        return f"top-k (k={policy['top_k']})"
    return f"fraction ({policy['fraction']})"


def _write_adapter_outputs(
    cfg: DefendConfig,
    tmp: Path,
    out: Path,
    task: object,
    aligned: Checkpoint,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    out_scale: float,
    progress: bool,
) -> Path | None:
    assert isinstance(task, LoraAdapter)
    dtype = task.storage_dtype()
    stored = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in factors.items()}
    write_adapter(tmp, task.config, stored, rank, alpha, cfg.inputs.aligned, task.read_extra())
    if not cfg.merge.merge_into_base:
        return None
    deltas = {m: (a.to(torch.float32), b.to(torch.float32), out_scale) for m, (a, b) in stored.items()}
    write_merged_model(
        aligned, deltas, task.fan_in_fan_out, tmp / "full_model", cfg.merge.max_shard_size, progress
    )
    return out / "full_model"


# --- RESTA ----------------------------------------------------------------------------------------
def linear_weight_keys(ckpt: Checkpoint) -> list[str]:
    """2-D `*.weight` tensors that are linear layers (embeddings, LM head and norms excluded by name)."""
    keys = []
    for k in ckpt.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        if not k.endswith(".weight") or len(ckpt.shape(k)) != 2:
            continue
        leaf_parts = k.lower().split(".")
        if any(marker in part for part in leaf_parts for marker in NON_LINEAR_MARKERS):
            continue
        keys.append(k)
    return keys


def _resta(cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
    report, task, aligned = run_scan(_scan_config(cfg, {"fraction": 1.0}), "defend", progress)
    unaligned, _ = open_checkpoint(cfg.inputs.unaligned, "unaligned", cfg.run.allow_pickle)
    lora_keys = {find_module_weight(aligned, r.name): r for r in report.modules}
    safety_keys = (
        set(lora_keys) if cfg.scope == "targeted" else set(linear_weight_keys(aligned)) | set(lora_keys)
    )
    for key in sorted(safety_keys):
        if key not in unaligned:
            raise InputError(f"RESTA: {key} is in the aligned checkpoint but not in the unaligned one")
        if unaligned.shape(key) != aligned.shape(key):
            raise InputError(
                f"RESTA: {key} has shape {aligned.shape(key)} (aligned) vs {unaligned.shape(key)} (unaligned)"
            )
    edits: list[TensorEdit] = []

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        rec = lora_keys.get(name)
        delta = None
        if rec is not None:
            delta = task.factors(rec.name).delta(torch.float32)
            if cfg.dare:
                delta = dare(delta, cfg.merge.density, module_seed(cfg.merge.seed, rec.name))
            if task.fan_in_fan_out:
                delta = delta.T
        w_un = unaligned.get(name) if name in safety_keys else None
        if delta is None and w_un is None:
            return t
        new = resta_weight(t, w_un, delta, cfg.beta)
        change = float(torch.linalg.vector_norm(new.to(torch.float64) - t.to(torch.float64)))
        task_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) if delta is not None else 0.0
        safety_norm = 0.0
        if w_un is not None:
            v = safety_difference(t, w_un)
            safety_norm = abs(cfg.beta) * float(torch.linalg.vector_norm(v, dtype=torch.float64))
        edits.append(TensorEdit(name, rec.name if rec else None, task_norm, safety_norm, change))
        if rec is not None:
            rec.merged, rec.w_task, rec.w_safety = True, 1.0, cfg.beta
            rec.delta_norm_out = change
        return new

    inner = tmp / "_model"
    write_model(aligned, edit, inner, cfg.merge.max_shard_size, progress)
    _move_up(inner, tmp)
    for rec in report.modules:
        rec.selected = True
    report.options = {
        k: v for k, v in report.options.items() if k not in ("threshold", "top_k", "fraction")
    } | {
        "selection_policy": f"RESTA on {'targeted' if cfg.scope == 'targeted' else 'all linear'} weights",
        "beta": cfg.beta,
        "scope": cfg.scope,
        "dare": cfg.dare,
        "density": cfg.merge.density if cfg.dare else None,
        "seed": cfg.merge.seed,
        "edited_tensors": len(edits),
    }
    report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    write_defense_report(report, tmp, cfg, sorted(edits, key=lambda e: e.key))
    return DefenseResult("resta", out, "model", len(edits), report, out)


# --- none -----------------------------------------------------------------------------------------
def _none(cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
    report, task, _ = run_scan(_scan_config(cfg, {"fraction": 0.0}), "defend", progress)
    for name in ADAPTER_FILES:
        shutil.copyfile(task.directory / name, tmp / name)
    for rec in report.modules:
        rec.delta_norm_out = rec.delta_norm_in
    report.options = {
        k: v for k, v in report.options.items() if k not in ("threshold", "top_k", "fraction")
    } | {"selection_policy": "none (task adapter passed through)"}
    report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
    write_defense_report(report, tmp, cfg)
    return DefenseResult("none", out, "adapter", 0, report)
