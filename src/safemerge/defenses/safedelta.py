"""Safe Delta (Lu et al., ICML 2025): keep the delta entries that fit a safety-degradation budget, and
compensate the rest on the aligned weights (docs/defenses.md, "Safe Delta").

Per linear module, with H = (2/n) Σ x xᵀ of the module's inputs in the *aligned* model on n safety
examples (as the reference code, github.com/ColinLu50/SafeDelta), damped by 1% of its mean diagonal, and
U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U, as SparseGPT):

- keeping δ_ij = W_ft,ij − W_ij costs safety ≈ δ_ij² / U_jj² (the OBS estimate, U_jj² = [H_F⁻¹]_00 with F
  the columns not yet fixed); its cost per unit of δ² is 1/U_jj², the same for a whole column;
- the entries are taken column by column, least sensitive column first (ties in row order), the 15% most
  sensitive never, and kept while the summed cost stays ≤ s · mean(1/U_jj²) · d_out / 8192 (the
  reference's budget per block of 2048 columns, normalised to Llama-2-7B's 4096-row layers);
- then, column by column (SparseGPT's OBS update), a kept entry takes W_ft, a dropped one the current
  W, and the columns after it absorb the error (w − q)/U_jj · U_j,rest, which moves the module's output
  on the safety data back towards the aligned model's.

Output: a full model (the compensated weights are dense). Decisions of ours: one column at a time (the
reference updates groups of 4 columns without compensating within a group), the 15% slice never empties
a small block, and only the fine-tuned modules are processed (elsewhere δ = 0 and the method is a no-op).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from pydantic import ConfigDict, Field

from safemerge.common.errors import InputError
from safemerge.defenses.base import DefenseResult
from safemerge.defenses.calibration import CalibrationOptions
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.forward import (
    CalibratedDefense,
    aligned_model,
    change_norm,
    finish_report,
    input_grams,
    write_full_model,
)
from safemerge.engine.pipeline import resolve_device

F64 = torch.float64
BLOCK = 2048  # columns per block (the reference's blocksize)
REFERENCE_ROWS = 4096  # the reference's budget is normalised to Llama-2-7B's 4096-row layers
PROTECTED = 0.15  # the most sensitive share of each block is never kept (reference)
DAMP = 0.01  # H += 1% of its mean diagonal (reference, as SparseGPT)
LAZY = 128  # columns whose errors are propagated beyond them in one product (SparseGPT's lazy update)


class SafeDeltaOptions(CalibrationOptions):
    """Safe Delta's options: the budget scale and the calibration data."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(
        0.1,
        ge=0.0,
        allow_inf_nan=False,
        description="safedelta: budget scale s (reference default 0.1, 0.11 in its scripts); larger keeps "
        "more of the fine-tuning delta, 0 keeps none",
    )


def hessian(gram: torch.Tensor, n: int) -> torch.Tensor:
    """H = (2/n) G, dead inputs (zero diagonal) set to 1, damped by 1% of the mean diagonal (reference)."""
    h = gram.to(F64) * (2.0 / n)
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    h += DAMP * float(diag.mean()) * torch.eye(h.shape[0], dtype=F64)
    return h


def inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """U upper triangular with H⁻¹ = Uᵀ U (InputError naming the module when H is not positive definite)."""
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError:
        raise InputError(f"safedelta: the input Hessian of {name} is not positive definite") from None


def keep_mask(delta: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """The entries of one block kept under the budget. delta: rows × cols, d: the block's U_jj."""
    rows, cols = delta.shape
    sensitivity = (1.0 / d**2).expand(rows, cols).flatten()  # per-unit cost, one value per column
    cost = (delta**2 / d**2).flatten()
    order = torch.sort(sensitivity, stable=True).indices  # least sensitive first; ties in row order
    order = order[: order.numel() - int(PROTECTED * order.numel())]
    budget = float(sensitivity.mean()) * (scale / 2) * (rows / REFERENCE_ROWS)
    mask = torch.zeros(rows * cols, dtype=torch.bool)
    mask[order] = torch.cumsum(cost[order], 0) <= budget
    return mask.reshape(rows, cols)


def safe_delta(
    w_al: torch.Tensor, w_ft: torch.Tensor, h: torch.Tensor, scale: float, name: str = "module"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Safe Delta on one module (d_out × d_in) given its damped H: the new weight (float64) and the mask
    of kept delta entries."""
    u = inverse_cholesky(h, name)
    w = w_al.to(F64).clone()
    ft = w_ft.to(F64)
    kept = torch.zeros(w.shape, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        d = torch.diagonal(u)[i1:i2]
        mask = keep_mask(ft[:, i1:i2] - w[:, i1:i2], d, scale)
        kept[:, i1:i2] = mask
        for s1 in range(i1, i2, LAZY):
            compensate(w, ft, u, mask[:, s1 - i1 :], s1, min(s1 + LAZY, i2))
    return w, kept


def compensate(
    w: torch.Tensor, ft: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, s1: int, s2: int
) -> None:
    """Fix columns s1..s2 of `w` in place, one at a time (q = W_ft where kept, else the current W), each
    error (w − q)/U_jj propagated along U's row to the later columns: within the group at once, beyond
    it in one product (SparseGPT's lazy batch update; the same sums, fewer passes over `w`)."""
    err = torch.zeros(w.shape[0], s2 - s1, dtype=w.dtype)
    for j in range(s1, s2):
        q = torch.where(mask[:, j - s1], ft[:, j], w[:, j])
        err[:, j - s1] = (w[:, j] - q) / u[j, j]
        w[:, j + 1 : s2] -= torch.outer(err[:, j - s1], u[j, j + 1 : s2])
        w[:, j] = q
    w[:, s2:] -= err @ u[s1:s2, s2:]


class SafeDelta(CalibratedDefense):
    """Safe Delta: delta entries kept under a safety budget, the rest compensated; a full model."""

    name = "safedelta"
    output = "model"
    full_finetune = True
    options = frozenset({"seed", "max_shard_size"})
    option_model = SafeDeltaOptions
    # The reference's scripts use s = 0.11 on 7B models; on the 135M organism s ≤ 0.2 keeps ≤ 9% of the
    # delta entries and erases the task (docs/organism.md, "Which defence"), so the sweep spans the budgets
    # that keep about 20% to 75% of them.
    sweep = MappingProxyType({"scale": (0.5, 1.0, 2.0, 4.0)})
    changed_verb = "edited (Safe Delta)"

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        scanned, encoded, opts = self.prepare(cfg, progress)
        assert isinstance(opts, SafeDeltaOptions)
        model = aligned_model(scanned, resolve_device(cfg.run.device))
        grams = input_grams(model, scanned.targets, encoded)
        del model
        new: dict[str, torch.Tensor] = {}
        kept: dict[str, list[int]] = {}
        for t in scanned.targets:
            h = hessian(grams[t.module], len(encoded))
            w, mask = safe_delta(t.w_al, t.w_ft, h, opts.scale, t.rec.name)
            new[t.key] = w.to(torch.float32)
            kept[t.rec.name] = [int(mask.sum()), mask.numel()]
            t.rec.merged = True
            t.rec.delta_norm_out = change_norm(w, t.w_al)
        write_full_model(cfg, scanned, new, tmp, progress)
        total = sum(k for k, _ in kept.values()), sum(n for _, n in kept.values())
        info: dict[str, Any] = {
            "scale": opts.scale,
            "calibration_examples": len(encoded),
            "kept_delta_entries": total[0],
            "delta_entries": total[1],
            "kept_per_module": kept,
        }
        policy = f"Safe Delta (s={opts.scale}): {total[0]} of {total[1]} delta entries kept"
        report = finish_report(cfg, scanned, out, tmp, policy, info)
        return DefenseResult(self.name, out, "model", len(new), report, out)

    def report_notes(self, cfg: DefendConfig) -> list[str]:
        return [
            "Safe Delta keeps the delta entries under the safety budget and compensates the others on the",
            "aligned weights (H = XᵀX of the aligned model's inputs on the calibration data), so ‖ΔW‖ out",
            "mixes kept task updates and compensation.",
            "",
        ]


DEFENSE = SafeDelta()
