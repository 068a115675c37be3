"""Pure tensor code of the baseline defences (no files, no configuration).

Safe LoRA (Hsu et al. 2024): B_f ← C B_f with C = V Vᵀ / ‖V‖_F, computed as V (Vᵀ B_f) / ‖V‖_F; for a
full fine-tune ΔW_f ← C ΔW_f. RESTA (Bhardwaj et al. 2024): W = W_al + ΔW_f + β (W_al − W_un) (DARE on ΔW_f
is engine.merging.dare).
"""

from __future__ import annotations

import math

import torch

from safemerge.engine.criterion import INPUT_ROUTE, update_route

F64 = torch.float64


def safelora_project(v: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """C B = V (Vᵀ B) / ‖V‖_F in float64, without forming the d_out × d_out matrix C.

    v: d_out × d_in (Linear layout), b: d_out × r. Returns None when V = 0 (C is 0/0, undefined).
    C is *not* a projector: its eigenvalues are σ_j² / ‖V‖_F, so C B also rescales the update.
    """
    if v.shape[0] != b.shape[0]:
        raise ValueError(f"V {tuple(v.shape)} does not fit B {tuple(b.shape)}")
    v64 = v.to(F64)
    norm = float(torch.linalg.vector_norm(v64))
    if norm == 0.0:
        return None
    b64 = b.to(device=v.device, dtype=F64)
    return (v64 @ (v64.T @ b64)) / norm


def project_update(v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """C ΔW = V Vᵀ ΔW / ‖V‖_F for a dense update (full fine-tunes), in float64, associated the cheaper way.

    v, delta: d_out × d_in. V (Vᵀ ΔW) forms a d_in × d_in product, (V Vᵀ) ΔW a d_out × d_out one; the
    smaller is chosen (engine.criterion.update_route). Returns None when V = 0 (C is 0/0, undefined).
    """
    if v.shape != delta.shape:
        raise ValueError(f"V {tuple(v.shape)} does not fit ΔW {tuple(delta.shape)}")
    v64 = v.to(F64)
    norm = float(torch.linalg.vector_norm(v64))
    if norm == 0.0:
        return None
    d64 = delta.to(device=v.device, dtype=F64)
    if update_route(*v.shape) == INPUT_ROUTE:
        return (v64 @ (v64.T @ d64)) / norm
    return ((v64 @ v64.T) @ d64) / norm


def dense_projection(v: torch.Tensor) -> torch.Tensor:
    """C = V Vᵀ / ‖V‖_F formed densely in float64 (tests and documentation only)."""
    v64 = v.to(F64)
    return (v64 @ v64.T) / torch.linalg.vector_norm(v64)


def rescale(b: torch.Tensor, norm_before: float, norm_after: float) -> torch.Tensor:
    """B scaled so that an update of norm `norm_after` gets `norm_before` (no-op for a zero update)."""
    if norm_after == 0.0 or not math.isfinite(norm_before / norm_after):
        return b
    return b * (norm_before / norm_after)


def resta_weight(
    w_aligned: torch.Tensor, w_unaligned: torch.Tensor | None, delta: torch.Tensor | None, beta: float
) -> torch.Tensor:
    """W_al + ΔW_f + β (W_al − W_un) in float32 (either term may be absent), cast back to W_al's dtype."""
    w = w_aligned.to(torch.float32)
    out = w.clone()
    if delta is not None:
        out = out + delta.to(torch.float32)
    if w_unaligned is not None and beta != 0.0:
        out = out + beta * (w - w_unaligned.to(torch.float32))
    return out.to(w_aligned.dtype)


def resta_task_weight(
    w_task: torch.Tensor, w_aligned: torch.Tensor, w_unaligned: torch.Tensor, beta: float
) -> torch.Tensor:
    """W_task + β (W_al − W_un) in float32, cast back to W_task's dtype: RESTA on a full fine-tune, where
    W_al + ΔW_f is the task weight itself (so it is not recomputed from a rounded difference)."""
    out = w_task.to(torch.float32, copy=True)
    if beta != 0.0:
        out += beta * (w_aligned.to(torch.float32) - w_unaligned.to(torch.float32))
    return out.to(w_task.dtype)
