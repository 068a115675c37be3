"""Forward and backward passes of the data-dependent defences (Safe Delta, Antidote, reset), plain torch.

The model is loaded with transformers in float32, in eval mode (no dropout); the fine-tuned model is the
aligned one with each module's ΔW added in place (a LoRA's s·B A, or W_task − W_al), so one load serves
both. Activations are read by forward pre-hooks on the `nn.Linear` modules, one calibration example at
a time (no padding), over the example's response tokens (docs/defenses.md, "Calibration data").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safemerge.common.errors import InputError
from safemerge.common.packaged import resolve_model
from safemerge.defenses.base import Defense
from safemerge.defenses.calibration import CalibrationOptions, encode_calibration, load_calibration
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import move_up, scan_config, without_selection
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.fullft import FullModel
from safemerge.engine.lora import LoraAdapter
from safemerge.engine.pipeline import run_full_scan, run_scan
from safemerge.engine.report import ModuleRecord, Report
from safemerge.engine.writer import write_model

F64 = torch.float64
Encoded = list[tuple[list[int], int]]  # token ids and where the response starts (calibration.py)


@dataclass
class Target:
    """One fine-tuned linear module: its report row, checkpoint key, W_al and W_ft (d_out × d_in, float32;
    a full fine-tune's W_ft is its stored weight, exactly)."""

    rec: ModuleRecord
    key: str
    w_al: torch.Tensor
    w_ft: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        """ΔW = W_ft − W_al."""
        return self.w_ft - self.w_al

    @property
    def module(self) -> str:
        """The module's name in the transformers model (the checkpoint key less `.weight`)."""
        return self.key.removesuffix(".weight")


@dataclass
class Scanned:
    """The scan of a defence's inputs: the report, the fine-tuned modules and where the output comes from."""

    report: Report
    targets: list[Target]
    source: Checkpoint  # the checkpoint the output model is streamed from (aligned, or the task model)
    extra: dict[str, torch.Tensor]  # a LoRA's modules_to_save copies, by base key
    task: LoraAdapter | FullModel
    aligned_dir: Path  # the aligned model's local directory (a hub id resolved, a revision pinned)


def scan_targets(cfg: DefendConfig, progress: bool) -> Scanned:
    """ρ of every module (the report) and each module's W_al and ΔW, for a task LoRA or a full fine-tune."""
    if cfg.inputs.aligned is None:
        why = "it runs the aligned model on calibration data"
        raise InputError(f"method {cfg.method} needs `aligned`: {why}")
    if cfg.inputs.task_model is not None:
        report, full, aligned = run_full_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        if full.transposed:
            raise InputError(
                f"method {cfg.method} reads nn.Linear layers; {cfg.inputs.task_model} has Conv1D ones"
            )
        targets = []
        for rec in report.modules:
            key = rec.name + ".weight"
            w_ft = full.checkpoint.get(key).to(torch.float32)
            targets.append(Target(rec, key, aligned.get(key).to(torch.float32), w_ft))
        return Scanned(report, targets, full.checkpoint, {}, full, aligned.directory)
    report, task, al = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
    assert al is not None  # checked above: aligned is given
    if task.fan_in_fan_out:
        raise InputError(
            f"method {cfg.method} reads nn.Linear layers; {cfg.inputs.task_adapter} is fan_in_fan_out"
        )
    targets = []
    for rec in report.modules:
        key = find_module_weight(al, rec.name)
        w_al = al.get(key).to(torch.float32)
        targets.append(Target(rec, key, w_al, w_al + task.factors(rec.name).delta(torch.float32)))
    return Scanned(report, targets, al, task.extra_for_base(al.keys()), task, al.directory)


def load_model(name: str, device: torch.device) -> Any:
    """The causal LM `name` in float32, eval mode, gradients off, on `device` (InputError if unloadable)."""
    from transformers import AutoModelForCausalLM  # lazy: slow to import

    try:
        model: Any = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model {name!r}: {exc}") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer(name: str) -> Any:
    """The tokenizer of the aligned model, which must have a chat template (calibration rows are chats)."""
    from transformers import AutoTokenizer  # lazy: slow to import

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load the tokenizer of {name!r}: {exc}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(f"the tokenizer of {name} has no chat template: calibration examples are chats")
    return tokenizer


def aligned_model(scanned: Scanned, device: torch.device) -> Any:
    """The aligned model (from the directory the scan read)."""
    return load_model(str(scanned.aligned_dir), device)


def finetuned_model(scanned: Scanned, device: torch.device) -> Any:
    """The fine-tuned model: the full fine-tune itself, or the aligned model with each LoRA module's ΔW
    added and its modules_to_save copies in place."""
    if isinstance(scanned.task, FullModel):
        return load_model(str(scanned.task.checkpoint.directory), device)
    model = aligned_model(scanned, device)
    set_weights(model, scanned.targets, with_delta=True)
    state = model.state_dict()
    with torch.no_grad():
        for key, t in scanned.extra.items():
            if key in state:
                state[key].copy_(t)
    return model


def calibration_tokens(cfg: DefendConfig, opts: CalibrationOptions, tokenizer: Any) -> Encoded:
    """The calibration examples (seeded by the run's `seed`) as token ids and response starts."""
    examples = load_calibration(opts.calibration, opts.calibration_samples, seed=cfg.merge.seed)
    if not examples:
        raise InputError(f"`calibration` {opts.calibration} holds no examples")
    return encode_calibration(tokenizer, examples, opts.calibration_max_length)


def linear(model: nn.Module, target: Target) -> nn.Linear:
    """The model's nn.Linear of a target (InputError when the model has no such Linear of that shape)."""
    try:
        mod = model.get_submodule(target.module)
    except AttributeError:
        raise InputError(f"{target.module}: no such module in the loaded model ({target.rec.name})") from None
    if not isinstance(mod, nn.Linear) or tuple(mod.weight.shape) != tuple(target.w_al.shape):
        raise InputError(f"{target.module} is not an nn.Linear of shape {tuple(target.w_al.shape)}")
    return mod


def set_weights(model: nn.Module, targets: Iterable[Target], with_delta: bool) -> None:
    """Set each target's weight to W_al (+ ΔW when `with_delta`): the aligned or the fine-tuned model."""
    with torch.no_grad():
        for t in targets:
            w = linear(model, t).weight
            w.copy_(t.w_ft if with_delta else t.w_al)


def forward(model: nn.Module, ids: list[int], output_hidden_states: bool = False) -> Any:
    """One example through the model (batch of one, no padding)."""
    device = next(model.parameters()).device
    return model(torch.tensor([ids], device=device), output_hidden_states=output_hidden_states)


@contextmanager
def recording_inputs(model: nn.Module, targets: list[Target]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record each target Linear's input (tokens × d_in, detached) for the duration of the block."""
    seen: dict[str, list[torch.Tensor]] = {t.module: [] for t in targets}
    handles = []
    for t in targets:

        def hook(_mod: nn.Module, args: tuple[Any, ...], name: str = t.module) -> None:
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))

        handles.append(linear(model, t).register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def input_grams(model: nn.Module, targets: list[Target], encoded: Encoded) -> dict[str, torch.Tensor]:
    """G = Σ x xᵀ (d_in × d_in, float64, on the CPU) of each target's inputs over the response tokens."""
    grams = {t.module: torch.zeros(t.w_al.shape[1], t.w_al.shape[1], dtype=F64) for t in targets}
    with torch.no_grad(), recording_inputs(model, targets) as seen:
        for ids, start in encoded:
            forward(model, ids)
            for name, xs in seen.items():
                x = xs.pop()[start:].to(device="cpu", dtype=F64)
                grams[name] += x.T @ x
    return grams


def write_full_model(
    cfg: DefendConfig, scanned: Scanned, new: dict[str, torch.Tensor], tmp: Path, progress: bool
) -> None:
    """Stream the source checkpoint into `tmp` with the weights of `new` (by key) and the LoRA's
    modules_to_save copies; every other tensor is the source's."""

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in new:
            return new[name].to(t.dtype)
        if name in scanned.extra:
            return scanned.extra[name].to(t.dtype)
        return t

    inner = tmp / "_model"
    write_model(scanned.source, edit, inner, cfg.merge.max_shard_size, progress)
    move_up(inner, tmp)


def finish_report(
    cfg: DefendConfig, scanned: Scanned, out: Path, tmp: Path, policy: str, extra: dict[str, Any]
) -> Report:
    """The defence's report options, outputs and files (every scanned module counts as selected)."""
    report = scanned.report
    for rec in report.modules:
        rec.selected = True
    report.options = without_selection(report.options) | {"selection_policy": policy, **extra}
    report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    write_defense_report(report, tmp, cfg)
    return report


def change_norm(new: torch.Tensor, w_al: torch.Tensor) -> float:
    """‖W_out − W_al‖_F in float64 (the report's ‖ΔW‖ out)."""
    return float(torch.linalg.vector_norm(new.to(F64) - w_al.to(F64)))


class CalibratedDefense(Defense):
    """A defence measured on calibration data (docs/defenses.md, "Calibration data"): `check` requires the
    file, `prepare` scans the inputs and encodes the examples with the aligned model's tokenizer."""

    calibration_kind = "safety examples"  # what the file should hold, for the error

    def check(self, cfg: DefendConfig) -> None:
        if getattr(self.own_options(cfg), "calibration", None) is None:
            what = f"a JSONL/CSV of {self.calibration_kind}"
            raise ValueError(f"method {self.name} needs `calibration`: {what}")

    def prepare(self, cfg: DefendConfig, progress: bool) -> tuple[Scanned, Encoded, Any]:
        """The scan, the encoded calibration examples and the defence's own options."""
        opts = self.own_options(cfg)
        assert isinstance(opts, CalibrationOptions)  # every calibrated defence's options compose them
        scanned = scan_targets(cfg, progress)
        return scanned, calibration_tokens(cfg, opts, load_tokenizer(str(scanned.aligned_dir))), opts
