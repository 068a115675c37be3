"""RESTA (Bhardwaj et al., ACL 2024): W = W_al + ΔW_f + β (W_al − W_un), ΔW_f optionally after DARE.

Scope `all-linear` (default) adds β·V to every 2-D linear `*.weight` (embeddings, LM head and norms
excluded by name); `targeted` only to the modules the task LoRA targets (for a full fine-tune, the
scanned modules; there W_al + ΔW_f is the task weight, and tensors outside the scope stay the task's).
DARE is the engine's `merging.dare`, seeded per module. Output: a full model (sharded safetensors,
config, tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from safemerge.common.errors import InputError
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import TensorEdit, write_defense_report
from safemerge.defenses.steps import move_up, scan_config, unaligned_of, without_selection
from safemerge.defenses.tensors import resta_task_weight, resta_weight
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.criterion import safety_difference
from safemerge.engine.merging import dare, module_seed
from safemerge.engine.pipeline import open_checkpoint, run_full_scan, run_scan
from safemerge.engine.report import ModuleRecord, Report
from safemerge.engine.writer import write_model

# Checkpoint keys that are not linear layers even when 2-D (RESTA's all-linear scope skips them).
NON_LINEAR_MARKERS = ("embed", "lm_head", "wte", "wpe", "norm", "ln_")


def record_edit(
    name: str,
    rec: ModuleRecord | None,
    base: torch.Tensor,
    w_un: torch.Tensor | None,
    delta: torch.Tensor | None,
    new: torch.Tensor,
    beta: float,
) -> TensorEdit:
    """The edit of one tensor for the report; a LoRA module's record is marked merged (w_task 1, w_s β)."""
    edit = tensor_edit(name, rec, base, w_un, delta, new, beta)
    if rec is not None:
        rec.merged, rec.w_task, rec.w_safety = True, 1.0, beta
        rec.delta_norm_out = edit.change_norm
    return edit


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


def check_safety_keys(keys: set[str], aligned: Checkpoint, unaligned: Checkpoint) -> None:
    """Every tensor that gets β·V must exist with the same shape in both checkpoints."""
    for key in sorted(keys):
        if key not in unaligned:
            raise InputError(f"RESTA: {key} is in the aligned checkpoint but not in the unaligned one")
        if unaligned.shape(key) != aligned.shape(key):
            raise InputError(
                f"RESTA: {key} has shape {aligned.shape(key)} (aligned) vs {unaligned.shape(key)} (unaligned)"
            )


class Resta(Defense):
    """Task update plus β times the safety vector, written as a full model."""

    name = "resta"
    output = "model"
    options = frozenset({"beta", "scope", "dare", "density", "seed", "max_shard_size"})
    sweep = MappingProxyType({"beta": (0.1, 0.25, 0.5, 0.75, 1.0)})  # the paper's β = 0.5 in the middle
    changed_verb = "edited"
    full_finetune = True

    def check(self, cfg: DefendConfig) -> None:
        if cfg.merge.density != cfg.flat_default("density") and not cfg.dare:
            raise ValueError("`density` applies to resta only with `dare`")

    def settings(self, cfg: DefendConfig) -> dict[str, Any]:
        data = super().settings(cfg)
        if not cfg.dare:
            data.pop("density", None)
        return data

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        if cfg.inputs.task_model is not None:
            return self.run_full(cfg, tmp, out, progress)
        unaligned_name = unaligned_of(cfg)  # before the scan: RESTA adds V itself, a sketch cannot do
        report, task, aligned = run_scan(scan_config(cfg, {"fraction": 1.0}), "defend", progress)
        assert aligned is not None  # InputsConfig: with unaligned, aligned is given
        unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
        lora_keys = {find_module_weight(aligned, r.name): r for r in report.modules}
        safety_keys = set(lora_keys)
        if cfg.scope != "targeted":
            safety_keys |= set(linear_weight_keys(aligned))
        check_safety_keys(safety_keys, aligned, unaligned)
        extra = task.extra_for_base(aligned.keys())  # modules_to_save: the task model's copies
        edits: list[TensorEdit] = []

        def edit(name: str, t: torch.Tensor) -> torch.Tensor:
            if name in extra:
                t = extra[name].to(t.dtype)
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
            edits.append(record_edit(name, rec, t, w_un, delta, new, cfg.beta))
            return new

        inner = tmp / "_model"
        write_model(aligned, edit, inner, cfg.merge.max_shard_size, progress)
        move_up(inner, tmp)
        return self.finish(cfg, tmp, out, report, edits)

    def run_full(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        """RESTA on a full fine-tune: W = W_task + β V (= W_al + ΔW_f + β V); with DARE, the scanned modules
        get W_al + DARE(ΔW_f) + β V. Tensors outside the scope are the task model's."""
        unaligned_name = unaligned_of(cfg)
        report, task, aligned = run_full_scan(scan_config(cfg, {"fraction": 1.0}), "defend", progress)
        unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
        module_keys = {r.name + ".weight": r for r in report.modules}
        safety_keys = set(module_keys)
        if cfg.scope != "targeted":
            safety_keys |= set(linear_weight_keys(aligned))
        check_safety_keys(safety_keys, aligned, unaligned)
        edits: list[TensorEdit] = []

        def edit(name: str, t: torch.Tensor) -> torch.Tensor:
            if name not in safety_keys:
                return t
            rec = module_keys.get(name)
            w_al, w_un = aligned.get(name), unaligned.get(name)
            delta = t.to(torch.float32) - w_al.to(torch.float32)
            if cfg.dare and rec is not None:
                flip = task.transposed  # masks drawn on the d_out × d_in update, as for LoRAs
                seed = module_seed(cfg.merge.seed, rec.name)
                dropped = dare(delta.T if flip else delta, cfg.merge.density, seed)
                delta = dropped.T if flip else dropped
                new = resta_weight(w_al, w_un, delta, cfg.beta).to(t.dtype)
            else:
                new = resta_task_weight(t, w_al, w_un, cfg.beta)
            edits.append(record_edit(name, rec, w_al, w_un, delta, new, cfg.beta))
            return new

        inner = tmp / "_model"
        write_model(task.checkpoint, edit, inner, cfg.merge.max_shard_size, progress)
        move_up(inner, tmp)
        return self.finish(cfg, tmp, out, report, edits)

    def finish(
        self, cfg: DefendConfig, tmp: Path, out: Path, report: Report, edits: list[TensorEdit]
    ) -> DefenseResult:
        """The report of a RESTA run (every scanned module counts as selected) and the result."""
        for rec in report.modules:
            rec.selected = True
        report.options = without_selection(report.options) | {
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
        return DefenseResult(self.name, out, "model", len(edits), report, out)


def tensor_edit(
    name: str,
    rec: ModuleRecord | None,
    w_al: torch.Tensor,
    w_un: torch.Tensor | None,
    delta: torch.Tensor | None,
    new: torch.Tensor,
    beta: float,
) -> TensorEdit:
    """The report line of one edited tensor: ‖ΔW_f‖ (after DARE), ‖β V‖ and ‖W_out − W_al‖."""
    change = float(torch.linalg.vector_norm(new.to(torch.float64) - w_al.to(torch.float64)))
    task_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) if delta is not None else 0.0
    safety_norm = 0.0
    if w_un is not None:
        v = safety_difference(w_al, w_un)
        safety_norm = abs(beta) * float(torch.linalg.vector_norm(v, dtype=torch.float64))
    return TensorEdit(name, rec.name if rec else None, task_norm, safety_norm, change)


DEFENSE = Resta()
