"""One-example safety patch ("Safety at One Shot", Zhang et al., ICLR 2026, arXiv 2601.01887).

The task LoRA is fine-tuned for `steps` optimizer steps on ONE safety example (a harmful prompt and its
refusal): the first of the seeded draw `load_calibration(calibration, 1, seed)` (calibration.py). The
loop is ours, minimal and seeded: the aligned model in float32 with the task adapter loaded by PEFT,
AdamW (weight decay 0) on the LoRA factors only, the mean cross-entropy over the response tokens, the
whole example as one batch, no dropout (eval mode), no schedule. The base model's weights and any
non-LoRA tensor (modules_to_save) are not trained. Output: an adapter of the task adapter's shape —
its config copied byte for byte, its LoRA factors replaced by the trained ones (float32, or float64 for a
float64 adapter), every other tensor unchanged (docs/defenses.md, "One-shot safety patch").
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file

from safemerge.common.datasets import Example
from safemerge.common.errors import InputError
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.calibration import CalibrationOptions, encode_calibration, load_calibration
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import scan_config, without_selection
from safemerge.engine.checkpoint import resolve_local_dir
from safemerge.engine.lora import LoraAdapter, LoraFactors, adapter_key
from safemerge.engine.pipeline import lora_delta_norm, resolve_device, run_scan

# Ours (the paper reports convergence "within a few epochs" of one example; its exact settings are not
# used here): 10 full-batch steps at a LoRA-typical learning rate. Sweep `steps` with a grid.
DEFAULT_STEPS = 10
DEFAULT_LR = 1e-4
IGNORE = -100  # label of the prompt tokens: no loss there


class OneShotOptions(CalibrationOptions):
    """`oneshot`'s own options: the steps (its knob), the learning rate and the calibration file."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(
        DEFAULT_STEPS,
        ge=1,
        description="optimizer steps on the one safety example (default 10, ours; the paper trains a few "
        "epochs). 0 is refused: that is method none",
    )
    lr: float = Field(
        DEFAULT_LR, gt=0.0, allow_inf_nan=False, description="AdamW learning rate (default 1e-4, ours)"
    )
    calibration_samples: int = Field(
        1, ge=1, le=1, description="always 1: the patch uses exactly one example of `calibration`"
    )


def response_labels(ids: list[int], start: int) -> torch.Tensor:
    """Labels for the causal-LM loss: the token ids, with the prompt (positions < start) ignored."""
    labels = torch.tensor(ids)
    labels[:start] = IGNORE
    return labels


def load_trainable(base: Path, adapter: Path, device: torch.device) -> tuple[Any, Any]:
    """The aligned model (float32) with the task adapter, only its LoRA factors trainable; its tokenizer."""
    from peft import PeftModel  # lazy: peft and transformers take seconds to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base))
    except (OSError, ValueError) as exc:
        raise InputError(
            f"oneshot: cannot load the tokenizer of {base} (the example needs it): {exc}"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise InputError(f"oneshot: the tokenizer of {base} has no chat template (needed for the example)")
    try:
        base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model: Any = PeftModel.from_pretrained(base_model, str(adapter), is_trainable=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"oneshot: cannot load {adapter} onto {base}: {exc}") from None
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model.to(device).eval(), tok


def patch(model: Any, ids: list[int], start: int, steps: int, lr: float, seed: int) -> list[float]:
    """`steps` AdamW steps on one example; returns the loss before each step and after the last."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    labels = response_labels(ids, start).unsqueeze(0).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=labels).loss
        losses.append(loss.detach().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(model(input_ids=input_ids, labels=labels).loss))
    return losses


def trained_factors(model: Any, stored: dict[str, torch.Tensor], weights: Path) -> dict[str, torch.Tensor]:
    """The trained LoRA factors by the adapter file's keys (PEFT's saved names); every file key covered."""
    from peft import get_peft_model_state_dict

    state = {k: v for k, v in get_peft_model_state_dict(model).items() if ".lora_A." in k or ".lora_B." in k}
    wanted = {k for k in stored if ".lora_A." in k or ".lora_B." in k}
    if set(state) != wanted:
        missing = sorted(wanted ^ set(state))[:3]
        raise InputError(f"oneshot: {weights} and the loaded adapter name different LoRA tensors: {missing}")
    return {k: v.detach().cpu() for k, v in state.items()}


class OneShot(Defense):
    """Fine-tune the task LoRA a few steps on one safety example."""

    name = "oneshot"
    output = "adapter"
    options = frozenset({"seed"})
    changed_verb = "patched (trained on one safety example)"
    option_model = OneShotOptions
    sweep = MappingProxyType({"steps": (5, 15, 40)})  # ~3 s per step on the organism, one thread

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        opts = OneShotOptions.model_validate(cfg.plugin_options)
        (example,) = load_calibration(opts.calibration, 1, cfg.merge.seed)
        report, task, _ = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        if cfg.inputs.aligned is None:
            raise InputError("method oneshot needs `aligned`: the model the task adapter is trained on")
        base, _ = resolve_local_dir(cfg.inputs.aligned, allow_pickle=cfg.run.allow_pickle)
        model, tok = load_trainable(base, task.directory, resolve_device(cfg.run.device))
        ((ids, start),) = encode_calibration(tok, [example], opts.calibration_max_length)
        losses = patch(model, ids, start, opts.steps, opts.lr, cfg.merge.seed)
        factors = trained_factors(model, load_file(task.weights_file), task.weights_file)
        write_patched(task, factors, tmp)
        for rec in report.modules:
            a, b = (factors[adapter_key(rec.name, w)] for w in ("A", "B"))
            rec.selected = rec.merged = True
            rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, task.scaling(rec.name)))
        report.options = without_selection(report.options) | {
            "selection_policy": "oneshot (every LoRA factor trained on one safety example)",
            **opts.model_dump(mode="json"),
            "seed": cfg.merge.seed,
            "example_prompt": prompt_text(example),
            "loss_before": losses[0],
            "loss_after": losses[-1],
            "losses": losses,
        }
        report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", len(report.modules), report)

    def report_notes(self, cfg: DefendConfig) -> list[str]:
        return [
            "oneshot trains every LoRA factor on one safety example; the loss on it before and after is",
            "`loss_before` / `loss_after` in the JSON report's options.",
            "",
        ]


def prompt_text(example: Example) -> str:
    """The user turns of the example, for the report."""
    return " / ".join(str(m["content"]) for m in example["prompt"] if m["role"] == "user")


def write_patched(task: LoraAdapter, factors: dict[str, torch.Tensor], tmp: Path) -> None:
    """The task adapter with its LoRA factors replaced (in the output dtype), config copied byte for byte."""
    dtype = task.output_dtype()
    tensors = load_file(task.weights_file)
    tensors.update({k: v.to(dtype).contiguous() for k, v in factors.items()})
    save_file(tensors, str(tmp / task.weights_file.name), metadata={"format": "pt"})
    shutil.copyfile(task.directory / "adapter_config.json", tmp / "adapter_config.json")


DEFENSE = OneShot()
