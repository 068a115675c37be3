"""Merge operators on one module's LoRA factors or dense update (docs/method.md §4). Pure tensor code.

Every operator returns factors (A', B') for an output adapter whose scaling is `out_scale`, i.e. the
merged update is ΔW' = out_scale · B' A'. Coefficients are applied in float64 and the result is cast to
the requested dtype; a coefficient of exactly 1.0 leaves a factor bit-for-bit unchanged.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import torch

from safemerge.common.errors import SafemergeWarning
from safemerge.engine.lora import LoraFactors

F64 = torch.float64


def _scaled(x: torch.Tensor, coef: float) -> torch.Tensor:
    return x.to(F64) * coef


def exact_merge(
    task: LoraFactors, safety: LoraFactors | None, w_task: float, w_safety: float, out_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW' = w_f s_f B_f A_f + w_s s_s B_s A_s as one LoRA of rank r_f + r_s, without loss.

    A' = [c_f A_f ; c_s A_s] (rows stacked), B' = [B_f , B_s] (side by side), c = w s / out_scale.
    Without a safety module (or with w_s = 0) the safety half is zero; unselected modules use (1, 0).
    """
    a_parts = [_scaled(task.A, w_task * task.scaling / out_scale)]
    b_parts = [task.B.to(F64)]
    if safety is not None:
        if w_safety != 0.0:
            a_parts.append(_scaled(safety.A, w_safety * safety.scaling / out_scale))
        else:
            a_parts.append(torch.zeros_like(safety.A, dtype=F64))
        b_parts.append(safety.B.to(F64))
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def peft_linear_merge(
    task: LoraFactors, safety: LoraFactors, w_task: float, w_safety: float, out_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The released SafeMERGE code's merge (PEFT `linear`): mixes the factors, not the products.

    A' = √(w_f s_f) A_f + √(w_s s_s) A_s, B' likewise, so B'A' has cross terms √(w_f s_f w_s s_s)(B_f A_s +
    B_s A_f). Needs r_f = r_s. Negative weights put their sign on A, as PEFT does.
    """
    if task.rank != safety.rank:
        raise ValueError(f"peft-linear needs equal ranks (task r={task.rank}, safety r={safety.rank})")
    cf, cs = w_task * task.scaling, w_safety * safety.scaling
    ra, rb = math.sqrt(abs(cf)), math.sqrt(abs(cs))
    norm = math.sqrt(out_scale)
    a = _scaled(task.A, math.copysign(ra, cf) / norm) + _scaled(safety.A, math.copysign(rb, cs) / norm)
    b = _scaled(task.B, ra / norm) + _scaled(safety.B, rb / norm)
    return a, b


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad A (rows) and B (columns) to `rank`, which leaves B A unchanged."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if r == rank:
        return a, b
    a2 = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    b2 = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return a2, b2


def module_seed(seed: int, module: str) -> int:
    """A per-module seed that depends only on (seed, module name), not on processing order."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare(delta: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """DARE on one update: keep each entry with probability `density`, multiply the kept ones by 1/density.

    The one DARE of safemerge (`merge --method dare_*` and RESTA's `--dare`). The mask is PEFT's
    `random_pruning` rule, Bernoulli(density) over `delta`'s shape, dtype and device, drawn right after
    `torch.manual_seed(seed)` in a forked RNG (the caller's stream is untouched). Callers pass a per-module
    seed, `module_seed(seed, module)`, so masks do not depend on processing order. `dare(ΔW, p, s)` is
    exactly the first update's mask in `merge_dense([ΔW, …], …, "dare_linear" | "dare_ties", p, s)`.
    """
    return dare_in_order([delta], density, seed)[0]


def dare_in_order(deltas: list[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    """DARE on several updates from one seeded stream: their masks are drawn one after the other.

    This is how PEFT's `dare_linear` / `dare_ties` prune under one `torch.manual_seed`, so merges keep
    their outputs; the first update's mask equals `dare(deltas[0], density, seed)`. density = 1 keeps
    everything and draws nothing (as PEFT's `prune`).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density == 1.0:
        return list(deltas)
    with torch.random.fork_rng(devices=[deltas[0].device] if deltas[0].is_cuda else []):
        torch.manual_seed(seed)
        return [delta * torch.bernoulli(torch.full_like(delta, density)) / density for delta in deltas]


def dare_no_pruning(density: float) -> str:
    """The warning of DARE at density ≥ 1 (PEFT's words): nothing is dropped."""
    return f"The density {density} is greater than or equal to 1, no pruning will be performed."


def merge_dense(
    deltas: list[torch.Tensor], weights: list[float], method: str, density: float, seed: int
) -> torch.Tensor:
    """Combine full updates ΔW with PEFT's task-arithmetic operators, seeded.

    linear: Σ w_i ΔW_i. ties: trim to `density` by magnitude, elect signs, disjoint mean (PEFT `ties`).
    dare_linear / dare_ties: `dare_in_order` first (random drop with keep-probability `density`, 1/density
    rescale), then PEFT's weighted sum / sign election and disjoint mean, as PEFT's own dare_* do.
    """
    from peft.utils.merge_utils import (  # lazy: peft adds ~2.4 s to every command's start
        calculate_majority_sign_mask,
        disjoint_merge,
        reshape_weight_task_tensors,
        task_arithmetic,
        ties,
    )

    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device)
    if method == "linear":
        return task_arithmetic(deltas, w)
    if method == "ties":
        return ties(deltas, w, density, "total")  # magnitude trimming: no randomness
    if method not in ("dare_linear", "dare_ties"):
        raise ValueError(f"unknown merge method {method!r}")
    if density >= 1.0:  # nothing is dropped; PEFT's dare_* said so, and merges still do
        warnings.warn(dare_no_pruning(density), SafemergeWarning, stacklevel=2)
    pruned = dare_in_order(deltas, density, seed)
    if method == "dare_linear":
        return task_arithmetic(pruned, w)
    stacked = torch.stack(pruned, dim=0)
    signs = calculate_majority_sign_mask(stacked, method="total")
    return disjoint_merge(stacked * reshape_weight_task_tensors(stacked, w), signs)


def svd_factors(
    delta: torch.Tensor, rank: int, out_scale: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of ΔW into A' (rank × d_in), B' (d_out × rank) with out_scale · B'A' ≈ ΔW.

    Returns the relative Frobenius error ‖ΔW − out_scale·B'A'‖ / ‖ΔW‖ (0 when ΔW = 0), computed in float64.
    Small matrices use an exact SVD; large ones a seeded randomised SVD (exact for rank ≤ `rank`).
    """
    d64 = delta.to(F64)
    k = min(rank, *d64.shape)
    if min(d64.shape) <= 1024:
        u, s, vh = torch.linalg.svd(d64, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        with torch.random.fork_rng(devices=[d64.device] if d64.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(d64, q=min(k + 8, min(d64.shape)), niter=4)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    root = s.sqrt()
    b = u * root  # d_out × k
    a = (root[:, None] * vh) / out_scale  # k × d_in
    total = float(torch.linalg.vector_norm(d64))
    err = float(torch.linalg.vector_norm(d64 - out_scale * (b @ a))) / total if total > 0 else 0.0
    a, b = pad_rank(a, b, rank)
    return a, b, err
