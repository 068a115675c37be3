"""A synthetic sanity check of scan + merge that runs in seconds on any CPU (the `toy` demo).

It builds a tiny random Llama as the 'unaligned' model, adds a planted low-rank safety difference V per
attention module to make the 'aligned' model, and writes a task LoRA whose update lies inside V's
subspace on some modules and drifts out of it on the others ("drifted" modules), plus a safety LoRA.
SafeMERGE must then select exactly the drifted modules. Nothing here says anything about real models:
the model-organism demo does that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safemerge.common.outdir import atomic_output_dir, write_marker
from safemerge.engine.config import MergeConfig
from safemerge.engine.pipeline import merge
from safemerge.engine.report import Report

TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class ToyInputs:
    aligned: Path
    unaligned: Path
    task: Path
    safety: Path
    drifted: list[str]  # module paths whose task update was planted outside the safety subspace


def build_toy_inputs(root: Path, layers: int = 4, hidden: int = 64, r: int = 4, seed: int = 0) -> ToyInputs:
    """Write unaligned/aligned models and task/safety adapters under `root` (deterministic)."""
    from peft import LoraConfig, get_peft_model  # lazy: peft adds ~2.4 s to every command's start
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy, like peft: slow to import
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "models" / "unaligned")
    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in TARGETS:
                lin = getattr(layer.self_attn, name)
                d_out, d_in = lin.weight.shape
                u = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen))[0]
                w = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))[0]
                lin.weight.add_(0.05 * u[:, :r] @ w[:, :r].T)  # V = W_al - W_un, rank r
                bases[f"model.layers.{i}.self_attn.{name}"] = (u, w)
    model.save_pretrained(root / "models" / "aligned")

    def adapter(path: Path, drifted: set[str], scale: float) -> None:
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)))
        with torch.no_grad():
            for module, (u, w) in bases.items():
                lin: Any = peft_model.base_model.model.get_submodule(module)  # type: ignore[union-attr]
                # in the subspace: B spans V's column space; drifted: B spans directions V never uses
                cols = u[:, -r:] if module in drifted else u[:, :r]
                noise = 0.3 * torch.randn(cols.shape, generator=gen) / cols.shape[0] ** 0.5
                lin.lora_B["default"].weight.copy_(scale * (cols + noise))
                lin.lora_A["default"].weight.copy_(scale * w[:, :r].T)
        peft_model.save_pretrained(str(path))
        peft_model.unload()

    modules = list(bases)
    drifted = {m for k, m in enumerate(modules) if k % 3 == 1}
    adapter(root / "adapters" / "task", drifted, 0.1)
    adapter(root / "adapters" / "safety", set(), 0.05)
    return ToyInputs(
        aligned=root / "models" / "aligned",
        unaligned=root / "models" / "unaligned",
        task=root / "adapters" / "task",
        safety=root / "adapters" / "safety",
        drifted=sorted(drifted),
    )


def run_toy_demo(out: Path, force: bool = False, progress: bool = True) -> tuple[ToyInputs, Report]:
    """Build the toy inputs in `out` and run SafeMERGE on them; returns the inputs and the merge report."""
    with atomic_output_dir(out, force, command="demo --toy") as tmp:
        built = build_toy_inputs(tmp)
    inputs = ToyInputs(
        aligned=out / "models" / "aligned",
        unaligned=out / "models" / "unaligned",
        task=out / "adapters" / "task",
        safety=out / "adapters" / "safety",
        drifted=built.drifted,
    )
    cfg = MergeConfig.from_flat(
        aligned=str(inputs.aligned),
        unaligned=str(inputs.unaligned),
        task_adapter=str(inputs.task),
        safety_adapter=str(inputs.safety),
        out=str(out / "merged"),
    )
    report = merge(cfg, progress=progress)
    write_marker(out, "demo --toy", os.listdir(out))  # merged/ is the toy demo's too
    return inputs, report
