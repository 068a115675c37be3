"""LSSF, low-rank safety subspace fusion (Zhou et al., ACL 2025, arXiv 2602.00038).

Per module, the safety vector V = W_al − W_un is cut to its principal components, V_k = U_k Σ_k V_kᵀ
(the projection U_k U_kᵀ V onto its top-k left singular vectors), with k chosen per module by the
entropy of its singular values, and fused into the fine-tuned model: W = W_al + ΔW_f + λ V_k (λ =
`scale`). The rank rule is our reading of the paper's "safety singular value entropy" (its code is not
public): p_i = σ_i / Σσ over the nonzero singular values, H = −Σ p_i ln p_i, k = ⌈exp H⌉ (the effective
rank of Roy & Vetterli, 2007), at most the number of nonzero σ.

For a task LoRA the fused update is exactly a LoRA of rank r_f + k, so the output is a PEFT adapter:
A = [(s_f/s) A_f ; (λ/s) V_kᵀ], B = [B_f , U_k Σ_k], zero-padded to the largest r_f + k (+ `full_model/`
with `merge_into_base`); only the modules the task LoRA targets get λ V_k. For a full fine-tune
(`task_model`), W_task + λ V_k on the scanned modules, written as a full model (docs/defenses.md, "LSSF").
"""

from __future__ import annotations

import math
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from safemerge.common.errors import InputError
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.safelora import Factors, write_outputs
from safemerge.defenses.steps import move_up, scan_config, unaligned_of, without_selection
from safemerge.engine.checkpoint import find_module_weight
from safemerge.engine.criterion import safety_difference
from safemerge.engine.fullft import change_norm
from safemerge.engine.lora import LoraFactors
from safemerge.engine.merging import exact_merge, pad_rank
from safemerge.engine.pipeline import (
    dtype_name,
    lora_delta_norm,
    open_checkpoint,
    output_scaling,
    resolve_device,
    run_full_scan,
    run_scan,
)
from safemerge.engine.report import ModuleRecord
from safemerge.engine.writer import write_model

F64 = torch.float64
# This project's default, like RESTA's β: the paper's fusion coefficient is not public. Sweep it.
DEFAULT_SCALE = 0.5
ZERO_V_FLAG = "zero-V: no safety component to fuse (V = 0), module left unchanged"


class LssfOptions(BaseModel):
    """`lssf`'s own option (flat YAML key, or `--option scale=1.0`)."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        DEFAULT_SCALE,
        gt=0.0,
        allow_inf_nan=False,
        description="weight λ of the low-rank safety component fused in: W = W_al + ΔW_f + λ·V_k, V_k the "
        "entropy-rank truncation of V = W_al − W_un (default 0.5, ours: the paper's is not public)",
    )


def nonzero_singular_values(sigma: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The singular values above round-off (σ > σ_max · max(shape) · ε, NumPy's matrix_rank rule)."""
    if sigma.numel() == 0 or float(sigma.max()) == 0.0:
        return sigma[:0]
    tol = float(sigma.max()) * max(shape) * torch.finfo(sigma.dtype).eps
    return sigma[sigma > tol]


def entropy_rank(sigma: torch.Tensor) -> int:
    """k = ⌈exp H(p)⌉ with p = σ / Σσ over the given (nonzero) singular values, at most their number.

    H is the Shannon entropy in nats; exp H is the effective rank (n for n equal σ, 1 for one σ; the cap
    at n also keeps n equal σ from rounding up to n + 1 through floating-point error)."""
    n = int(sigma.numel())
    if n == 0:
        return 0
    p = sigma.to(F64) / sigma.to(F64).sum()
    p = p[p > 0]
    h = float(-(p * p.log()).sum())
    return min(n, max(1, math.ceil(math.exp(h))))


def safety_component(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """V's principal part V_k = (U_k Σ_k)(V_kᵀ) in float64, as the factors (d_out × k, k × d_in), and k."""
    u, s, vh = torch.linalg.svd(v.to(F64), full_matrices=False)
    k = entropy_rank(nonzero_singular_values(s, tuple(v.shape)))
    return u[:, :k] * s[:k], vh[:k], k


class Lssf(Defense):
    """Fuse the entropy-rank principal part of the safety vector into the fine-tuned model."""

    name = "lssf"
    output = "adapter"
    options = frozenset({"merge_into_base", "max_shard_size"})
    changed_verb = "fused with λ·V_k"
    full_finetune = True
    option_model = LssfOptions
    sweep = MappingProxyType({"scale": (0.1, 0.25, 0.5, 1.0)})  # RESTA's β sweep, the same kind of knob

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        if cfg.inputs.task_model is not None:
            return self.run_full(cfg, tmp, out, progress)
        scale = LssfOptions.model_validate(cfg.plugin_options).scale
        unaligned_name = unaligned_of(cfg)  # before the scan: LSSF needs V itself, not a sketch
        report, task, aligned = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        assert aligned is not None  # InputsConfig: with unaligned, aligned is given
        unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
        device = resolve_device(cfg.run.device)
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for rec in report.modules:
            v = safety_difference(
                aligned.get(find_module_weight(aligned, rec.name)).to(device),
                unaligned.get(find_module_weight(unaligned, rec.name)).to(device),
            )
            b_s, a_s, k = safety_component(v.T if task.fan_in_fan_out else v)
            parts[rec.name] = (b_s.cpu(), a_s.cpu())
            mark(rec, k, scale)
        rank = max(task.rank(m) + parts[m][0].shape[1] for m in task.lora_modules)
        out_scale, alpha = output_scaling([task.scaling(m) for m in task.lora_modules], rank)
        factors: Factors = {}
        for rec in report.modules:
            a, b = exact_merge(task.factors(rec.name), None, 1.0, 0.0, out_scale)
            b_s, a_s = parts[rec.name]
            a, b = pad_rank(torch.cat([a, a_s * (scale / out_scale)]), torch.cat([b, b_s], dim=1), rank)
            factors[rec.name] = (a, b)
            rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, out_scale))
        report.options = lssf_options(report.options, scale, report.modules) | {
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

    def run_full(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        """W_task + λ V_k on every scanned module of a full fine-tune; every other tensor the task's."""
        if cfg.merge.merge_into_base:
            raise InputError(
                "`merge_into_base` does not apply to `task_model`: the output is already a full model"
            )
        scale = LssfOptions.model_validate(cfg.plugin_options).scale
        unaligned_name = unaligned_of(cfg)
        report, task, aligned = run_full_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        unaligned, _ = open_checkpoint(unaligned_name, "unaligned", cfg.run.allow_pickle)
        device = resolve_device(cfg.run.device)
        records = {rec.name + ".weight": rec for rec in report.modules}

        def edit(name: str, t: torch.Tensor) -> torch.Tensor:
            rec = records.get(name)
            if rec is None:
                return t
            w_al = aligned.get(name).to(device)
            b_s, a_s, k = safety_component(safety_difference(w_al, unaligned.get(name).to(device)))
            mark(rec, k, scale)
            new = t if k == 0 else (t.to(device, F64) + scale * (b_s @ a_s)).to(t.dtype).cpu()
            rec.delta_norm_out = change_norm(new, aligned.get(name))
            return new

        inner = tmp / "_model"
        write_model(task.checkpoint, edit, inner, cfg.merge.max_shard_size, progress)
        move_up(inner, tmp)
        report.options = lssf_options(report.options, scale, report.modules)
        report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "model", report.summary["merged"], report, out)

    def report_notes(self, cfg: DefendConfig) -> list[str]:
        return [
            "LSSF adds λ·V_k per module, V_k the rank-k truncation of V = W_al − W_un, k = ⌈exp H⌉ of",
            "its singular values (`rank_safety` per module and `safety_ranks` in the JSON report).",
            "",
        ]


def mark(rec: ModuleRecord, k: int, scale: float) -> None:
    """Record a module's entropy rank k and whether anything was fused (not for V = 0)."""
    rec.selected = True
    rec.rank_safety = k
    if k == 0:
        rec.flags.append(ZERO_V_FLAG)
        return
    rec.merged, rec.w_task, rec.w_safety = True, 1.0, scale


def lssf_options(options: dict[str, Any], scale: float, records: list[ModuleRecord]) -> dict[str, Any]:
    """The report's options: the scan's, with LSSF's policy, scale and the entropy rank per module."""
    return without_selection(options) | {
        "selection_policy": "LSSF (every module, entropy-rank safety component)",
        "scale": scale,
        "safety_ranks": {r.name: r.rank_safety for r in records},
    }


DEFENSE = Lssf()
