"""reset: restore to their aligned values the fine-tuned weights the harmful direction implicates most
(Yang et al., "Alleviating the Fear of Losing Alignment in LLM Fine-tuning", IEEE S&P 2025, arXiv
2504.09757, code github.com/kangyangWHU/LLMAlignment; docs/defenses.md, "reset").

As the reference code: h̄ = the mean, over the calibration prompts, of the hidden state of the prompt's
last token after layer L = ⌊2·n_layers/3⌋ (the reference truncates the model there); the loss is
L = −cos(h̄_ft, h̄_al), the fine-tuned model's harmful direction against the aligned model's; g = ∂L/∂W
on the fine-tuned (merged) weights. An entry is eligible when a gradient step moves it towards the
aligned value (sign g_ij = sign(W_ft − W_al)_ij ≠ 0), and the ⌈fraction · N⌉ eligible entries with the
largest |g_ij| over all modules (N: the fine-tuned modules' entries) are reset to W_al.

Decisions of ours: one step (the reference repeats the step, re-measuring g, with a rollback of 20% of
each step's resets while a task metric drops more than 5% — that needs a task evaluation inside the
defence), exactly ⌈fraction · N⌉ entries (the reference's strict `> k-th largest` keeps one fewer), N counts
the fine-tuned modules' entries (the reference: the whole model's parameters), ties broken by module
then position, and the calibration responses are not used (the direction is read on the prompts).
Output: a full model (the reset is on the merged ΔW entries, as the reference merges the LoRA first).
"""

from __future__ import annotations

import hashlib
import math
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
    Encoded,
    Scanned,
    Target,
    aligned_model,
    change_norm,
    finetuned_model,
    finish_report,
    forward,
    linear,
    write_full_model,
)
from safemerge.engine.pipeline import resolve_device

F64 = torch.float64


class ResetOptions(CalibrationOptions):
    """reset's options: the fraction reset and the calibration data."""

    model_config = ConfigDict(extra="forbid")

    reset_fraction: float = Field(
        0.01,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="reset: share of the fine-tuned entries restored to W_al, largest harmful-direction "
        "gradient first (one step of the paper's iterative method; its steps reset 0.1-0.2% each)",
    )


def direction_layer(n_layers: int) -> int:
    """L = ⌊2·n_layers/3⌋ (the reference's layer_end = ⌊4·n/6⌋), at least 1."""
    return max(1, (2 * n_layers) // 3)


def last_prompt_state(model: Any, ids: list[int], start: int, layer: int) -> torch.Tensor:
    """The hidden state after `layer` layers at the prompt's last token (the response starts at `start`)."""
    return forward(model, ids, True).hidden_states[layer][0, max(start - 1, 0)]


def mean_hidden(model: Any, encoded: Encoded, layer: int) -> torch.Tensor:
    """h̄: the mean hidden state after `layer` layers at each prompt's last token (no gradient)."""
    with torch.no_grad():
        states = [last_prompt_state(model, ids, start, layer) for ids, start in encoded]
    return torch.stack(states).to(F64).mean(0)


def direction_gradients(
    model: Any, targets: list[Target], encoded: Encoded, layer: int, h_al: torch.Tensor
) -> dict[str, torch.Tensor]:
    """g = ∂(−cos(h̄_ft, h̄_al))/∂W of each target (float64, CPU). h̄ is linear in the h_i, so the gradient
    is Σ_i ∂(v · h_i)/∂W / n with v = ∂L/∂h̄: one example's graph at a time."""
    h_ft = mean_hidden(model, encoded, layer).requires_grad_(True)
    loss = -torch.nn.functional.cosine_similarity(h_ft, h_al.to(F64), dim=0)
    (v,) = torch.autograd.grad(loss, h_ft)
    weights = {t.module: linear(model, t).weight for t in targets}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    with torch.enable_grad():
        for ids, start in encoded:
            h = last_prompt_state(model, ids, start, layer)
            (h.to(F64) @ v.to(h.device) / len(encoded)).backward()
    grads = {}
    for name, w in weights.items():
        grads[name] = (w.grad if w.grad is not None else torch.zeros_like(w)).to(device="cpu", dtype=F64)
        w.requires_grad_(False)
    return grads


def reset_masks(grads: list[torch.Tensor], deltas: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """True where reset: the ⌈fraction · N⌉ eligible entries (sign g = sign Δ ≠ 0) with the largest |g|,
    ranked over all modules together (stable: ties in module, then row-major, order)."""
    total = sum(d.numel() for d in deltas)
    k = math.ceil(fraction * total)
    scores = []
    for g, d in zip(grads, deltas, strict=True):
        eligible = (torch.sign(g) == torch.sign(d.to(F64))) & (d != 0)
        scores.append(torch.where(eligible, g.abs(), torch.full_like(g, -1.0)).flatten())
    flat = torch.cat(scores)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[flat[order] >= 0]] = True
    masks, at = [], 0
    for d in deltas:
        masks.append(chosen[at : at + d.numel()].reshape(d.shape))
        at += d.numel()
    return masks


# The last gradients computed, by what they depend on: a sweep of `reset_fraction` (organism compare, an
# experiment grid) reuses them instead of running the calibration data through the models again.
_LAST_GRADIENTS: tuple[str, dict[str, torch.Tensor]] | None = None


def gradients_key(scanned: Scanned, encoded: Encoded, layer: int, device: torch.device) -> str:
    """What the gradients are a function of: the aligned model's files, every module's ΔW (its bytes),
    the calibration tokens, the layer and the device."""
    h = hashlib.sha256(f"{scanned.aligned_dir}|{layer}|{device}|{encoded}".encode())
    for f in sorted(Path(scanned.aligned_dir).glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    for t in scanned.targets:
        h.update(t.key.encode())
        h.update(t.delta.contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_gradients(
    scanned: Scanned, encoded: Encoded, device: torch.device
) -> tuple[int, dict[str, torch.Tensor]]:
    """The direction layer and g of every target, computed once per set of inputs (see above)."""
    from transformers import AutoConfig  # lazy: heavy; only the layer count is read here

    global _LAST_GRADIENTS
    layers = AutoConfig.from_pretrained(str(scanned.aligned_dir)).num_hidden_layers
    layer = direction_layer(int(layers))
    key = gradients_key(scanned, encoded, layer, device)
    if _LAST_GRADIENTS is not None and _LAST_GRADIENTS[0] == key:
        return layer, _LAST_GRADIENTS[1]  # a hit loads no model
    model = aligned_model(scanned, device)
    h_al = mean_hidden(model, encoded, layer)
    del model
    model = finetuned_model(scanned, device)
    grads = direction_gradients(model, scanned.targets, encoded, layer, h_al)
    _LAST_GRADIENTS = (key, grads)
    return layer, grads


class Reset(CalibratedDefense):
    """reset: the fine-tuned entries most implicated in the lost harmful direction restored to W_al."""

    name = "reset"
    output = "model"
    full_finetune = True
    options = frozenset({"seed", "max_shard_size"})
    option_model = ResetOptions
    # Resetting 0.5% already raised the organism's validation over-refusal past the tolerance in two of
    # three seeds, so the sweep starts lower. The gradients are computed once per sweep.
    sweep = MappingProxyType({"reset_fraction": (0.001, 0.002, 0.005, 0.01)})
    calibration_kind = "harmful prompts"
    changed_verb = "partly reset to aligned"

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        scanned, encoded, opts = self.prepare(cfg, progress)
        assert isinstance(opts, ResetOptions)
        layer, grads = cached_gradients(scanned, encoded, resolve_device(cfg.run.device))
        targets = scanned.targets
        masks = reset_masks(
            [grads[t.module] for t in targets], [t.delta for t in targets], opts.reset_fraction
        )
        new: dict[str, torch.Tensor] = {}
        for t, mask in zip(targets, masks, strict=True):
            new[t.key] = torch.where(mask, t.w_al, t.w_ft)  # W_ft: a full fine-tune's stored weight, exactly
            t.rec.merged = bool(mask.any())
            t.rec.delta_norm_out = change_norm(new[t.key], t.w_al)
        write_full_model(cfg, scanned, new, tmp, progress)
        n_reset = sum(int(m.sum()) for m in masks)
        info = {
            "reset_fraction": opts.reset_fraction,
            "calibration_examples": len(encoded),
            "direction_layer": layer,
            "reset_entries": n_reset,
            "delta_entries": sum(t.delta.numel() for t in targets),
        }
        policy = (
            f"reset (reset_fraction={opts.reset_fraction}): {n_reset} fine-tuned entries restored to aligned"
        )
        report = finish_report(cfg, scanned, out, tmp, policy, info)
        return DefenseResult(self.name, out, "model", sum(t.rec.merged for t in targets), report, out)


DEFENSE = Reset()
