"""Mixed-adapter batches with one LoRA product per layer ("stacked" LoRA).

PEFT runs a mixed-adapter batch (`adapter_names=`) by looping, in every LoRA layer and at every decoding
step, over the batch's adapters: gather that adapter's rows, two small products, scatter them back. With
8 adapters and 60 LoRA layers that is ~2,000 small operations per step, and their per-call overhead
grows with the adapters rather than with the work (docs/benchmarks.md, "Mixed-adapter batched
evaluation"). Here each layer instead holds the batch's adapters' factors side by side,

    A = [A_1; …; A_k]  (Σr × d_in),    B = [B_1 … B_k]  (d_out × Σr),

and adds  B · (M ⊙ A·x)  to the base layer's output, where row i of M holds adapter i's LoRA scaling
in that adapter's r columns and zeros elsewhere (all zeros for a base-model row). That is the same sum
PEFT computes, Σ_j [row i runs adapter j] · s_j · B_j A_j x, in two products per layer whatever k is.
It equals PEFT's result up to rounding: the scaling is applied before B instead of after, and the
products run over Σr instead of r (last-bit effects, measured in docs/benchmarks.md).

It applies to plain LoRA on `Linear` layers only; anything else (DoRA and other LoRA variants, LoRA
bias, LoRA on embeddings or convolutions, modules saved whole, trainable tokens, merged adapters, hooks
that already replace a layer's forward) is left to PEFT's own mixed batch: `stacked_lora_blocker` says
why. The base pass runs under PEFT's `disable_adapter()`, and the LoRA term is added by a forward hook
on each LoRA layer, removed on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

BASE_ROW = "__base__"  # PEFT's adapter name for a row of the base model in a mixed-adapter batch


def lora_layers(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, module) of every PEFT LoRA layer of any kind in `model`."""
    from peft.tuners.lora import LoraLayer  # lazy: peft adds seconds to every start

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def stacked_lora_blocker(model: Any, names: Sequence[str]) -> str | None:
    """Why a mixed batch whose row i runs PEFT adapter `names[i]` (`BASE_ROW`: the base model) cannot
    take the stacked path (None: it can)."""
    from peft.tuners.lora import Linear as LoraLinear  # lazy: see above
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not hasattr(model, "disable_adapter"):
        return "the model is not a PEFT model"
    used = set(names) - {BASE_ROW}
    for name, layer in model.named_modules():
        if isinstance(layer, AuxiliaryTrainingWrapper):
            return f"module {name} is saved whole or holds trainable tokens"
        if not isinstance(layer, LoraLayer):
            continue
        mine = used & set(layer.lora_A)
        if not isinstance(layer, LoraLinear):
            return f"{name} is a LoRA {type(layer).__name__} layer, not Linear"
        if layer.merged or layer.training or "forward" in vars(layer):
            return f"{name} is merged, in training mode or has its forward replaced"
        if mine & set(layer.lora_variant):
            return f"{name} runs a LoRA variant (e.g. DoRA) for an adapter of the batch"
        if any(layer.lora_B[a].bias is not None for a in mine):
            return f"{name} has a LoRA bias"
    return None


def row_scales(layer: Any, names: Sequence[str], present: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
    """M: [rows, Σr], row i holding adapter names[i]'s scaling in its columns of the stacked factors
    (adapters in the order `present`), zeros elsewhere."""
    ranks = [layer.lora_A[a].weight.shape[0] for a in present]
    scale = torch.zeros(len(names), sum(ranks), dtype=dtype)
    start = 0
    for a, r in zip(present, ranks, strict=True):
        rows = [i for i, n in enumerate(names) if n == a]
        scale[rows, start : start + r] = float(layer.scaling[a])
        start += r
    return scale


def stacked_hook(layer: Any, names: Sequence[str]) -> Any:
    """A forward hook adding the batch's LoRA terms to `layer`'s base output, or None when no adapter
    of the batch has a LoRA on this layer."""
    present = [a for a in dict.fromkeys(names) if a != BASE_ROW and a in layer.lora_A]
    if not present:
        return None
    a_stack = torch.cat([layer.lora_A[a].weight for a in present], dim=0)
    b_stack = torch.cat([layer.lora_B[a].weight for a in present], dim=1)
    scale = row_scales(layer, names, present, a_stack.dtype).to(a_stack.device)

    def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0].to(a_stack.dtype)  # PEFT casts the input to the LoRA weights' dtype too
        m = scale.reshape(scale.shape[0], *([1] * (x.dim() - 2)), scale.shape[1])
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x, a_stack) * m, b_stack)
        return output + lora.to(output.dtype)

    return hook


@contextlib.contextmanager
def stacked_lora(model: Any, names: Sequence[str]) -> Iterator[None]:
    """Within this block, a forward of `model` runs row i with PEFT adapter `names[i]` (`BASE_ROW`: the
    base model), one stacked LoRA product per layer. Check `stacked_lora_blocker` first. The batch's
    rows must stay in this order for every forward inside (true of greedy generation)."""
    handles = []
    try:
        for _, layer in lora_layers(model):
            hook = stacked_hook(layer, names)
            if hook is not None:
                handles.append(layer.register_forward_hook(hook))
        with model.disable_adapter():
            yield
    finally:
        for h in handles:
            h.remove()
