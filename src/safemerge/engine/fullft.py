"""Full fine-tunes (docs/method.md §3.7): a task *model* instead of a task LoRA.

The task update of a module is ΔW_f = W_task − W_al, a dense d_out × d_in matrix. This module finds the
modules (linear-layer weights matched by name in the aligned, unaligned and task checkpoints), streams
them through `criterion.update_similarity` (three tensors read, ρ computed, all forgotten), and writes
merged full models tensor by tensor with `writer.write_model`, from the task checkpoint, so every tensor
that is not changed is the task model's bit for bit. The safety update comes from a safety LoRA on the
aligned model (ΔW_s = s·B A) or from a full safety fine-tune (ΔW_s = W_S − W_al).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from rich.progress import Progress

from safemerge.common.errors import InputError
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.criterion import Similarity, update_route, update_similarity
from safemerge.engine.lora import LoraAdapter, layer_index, module_type, natural_key
from safemerge.engine.merging import merge_dense, module_seed
from safemerge.engine.report import ModuleRecord
from safemerge.engine.subspace import Sketch, sketch_similarity_dense
from safemerge.engine.writer import write_model

# The default module set: attention and MLP projections (Llama / Qwen2 / Mistral names; GPT-2's Conv1D).
PROJECTIONS = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "c_attn", "c_proj", "c_fc"}
)
# Name parts of 2-D weights that are not linear layers (the same list as RESTA's all-linear scope).
NON_LINEAR_MARKERS = ("embed", "lm_head", "wte", "wpe", "norm", "ln_")
# Architectures whose linear layers are transformers' Conv1D (weights stored d_in × d_out).
CONV1D_MODEL_TYPES = frozenset({"gpt2"})
WEIGHT = ".weight"


def model_type(ckpt: Checkpoint) -> str | None:
    """`model_type` of the checkpoint's config.json (None without one)."""
    path = ckpt.directory / "config.json"
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"{path}: not a valid config.json ({exc})") from exc
    return str(value) if value is not None else None


def conv1d_layout(ckpt: Checkpoint) -> bool:
    """Whether linear weights are stored transposed (d_in × d_out), as GPT-2's Conv1D does."""
    return model_type(ckpt) in CONV1D_MODEL_TYPES


def check_same_tensors(model: Checkpoint, aligned: Checkpoint) -> None:
    """A fine-tune of the aligned model has its tensors: the same names and shapes, or InputError naming
    the first tensor that differs (matching is by name, never by position)."""
    mine, theirs = set(model.keys()), set(aligned.keys())
    for name in sorted(mine - theirs, key=natural_key):
        raise InputError(
            f"tensor {name!r} of the {model.label} {model.directory} is not in the aligned model "
            f"{aligned.directory} — is it a fine-tune of the aligned model?"
        )
    for name in sorted(theirs - mine, key=natural_key):
        raise InputError(
            f"tensor {name!r} of the aligned model {aligned.directory} is missing from the {model.label} "
            f"{model.directory}"
        )
    for name in sorted(mine, key=natural_key):
        if model.shape(name) != aligned.shape(name):
            raise InputError(
                f"tensor {name!r} has shape {model.shape(name)} in the {model.label} {model.directory} but "
                f"{aligned.shape(name)} in the aligned model {aligned.directory}"
            )


def is_linear_weight(ckpt: Checkpoint, key: str) -> bool:
    """A 2-D `*.weight` that is not an embedding, LM head or norm (by name)."""
    if not key.endswith(WEIGHT) or len(ckpt.shape(key)) != 2:
        return False
    return not any(m in part for part in key.lower().split(".") for m in NON_LINEAR_MARKERS)


def linear_modules(
    aligned: Checkpoint, unaligned: Checkpoint | None, pattern: str | None
) -> tuple[list[str], list[str]]:
    """(modules, missing): the modules whose weight the criterion reads, in natural order, and those left
    out because the unaligned checkpoint lacks them (none without an unaligned checkpoint: a sketch must
    then hold every module, `Sketch.require`).

    Default: the projections of `PROJECTIONS`; with `pattern`, every linear-layer weight whose module name
    matches the regular expression (`re.search`). The task model was checked to have the aligned model's
    tensors, so the aligned model's names are the task's.
    """
    try:
        regex = re.compile(pattern) if pattern is not None else None
    except re.error as exc:
        raise InputError(f"--modules {pattern!r} is not a valid regular expression: {exc}") from None
    found: list[str] = []
    for key in aligned.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        if not is_linear_weight(aligned, key):
            continue
        module = key[: -len(WEIGHT)]
        wanted = module_type(module) in PROJECTIONS if regex is None else bool(regex.search(module))
        if wanted:
            found.append(module)
    found.sort(key=natural_key)
    modules = [m for m in found if unaligned is None or m + WEIGHT in unaligned]
    missing = [m for m in found if unaligned is not None and m + WEIGHT not in unaligned]
    if not modules:
        what = f"matching --modules {pattern!r}" if pattern is not None else "(attention / MLP projections)"
        where = f" and the unaligned model {unaligned.directory}" if unaligned is not None else ""
        raise InputError(
            f"no linear-layer weights {what} found in the aligned model {aligned.directory}{where}"
        )
    if unaligned is not None:
        check_same_shapes([m + WEIGHT for m in modules], aligned, unaligned)
    return modules, missing


def check_same_shapes(keys: list[str], aligned: Checkpoint, unaligned: Checkpoint) -> None:
    """V = W_al − W_un needs both weights in one shape: InputError naming the first that differs."""
    for key in keys:
        if unaligned.shape(key) != aligned.shape(key):
            raise InputError(
                f"{key}: aligned shape {aligned.shape(key)} ({aligned.directory}) differs from unaligned "
                f"shape {unaligned.shape(key)} ({unaligned.directory})"
            )


@dataclass
class FullModel:
    """A full fine-tune of the aligned model: its checkpoint, the modules scanned, the weight layout."""

    checkpoint: Checkpoint
    modules: list[str]
    transposed: bool  # Conv1D layout: weights stored d_in × d_out
    missing_unaligned: list[str] = field(default_factory=list)

    @classmethod
    def open(
        cls, checkpoint: Checkpoint, aligned: Checkpoint, unaligned: Checkpoint | None, pattern: str | None
    ) -> FullModel:
        """Check the task model against the aligned one and find its modules."""
        check_same_tensors(checkpoint, aligned)
        modules, missing = linear_modules(aligned, unaligned, pattern)
        return cls(checkpoint, modules, conv1d_layout(aligned), missing)

    def shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of a module, whatever the stored layout."""
        rows, cols = self.checkpoint.shape(module + WEIGHT)
        return (cols, rows) if self.transposed else (rows, cols)


def full_record(module: str, shape: tuple[int, int], sim: Similarity, norm: float) -> ModuleRecord:
    """The report row of a scanned full-fine-tune module: ‖ΔW_f‖_F as `delta_norm_in`, no rank."""
    return ModuleRecord(
        name=module,
        layer=layer_index(module),
        module_type=module_type(module),
        shape=shape,
        rank_task=None,
        rho=sim.rho,
        rho_rounded=sim.rho_rounded,
        selected=False,
        delta_norm_in=norm,
        flags=[sim.degenerate] if sim.degenerate else [],
        route=update_route(*shape),
    )


def full_similarities(
    aligned: Checkpoint, unaligned: Checkpoint, task: FullModel, device: torch.device, progress: bool
) -> list[ModuleRecord]:
    """Stream the task model's modules: read W_al, W_un and W_task of one module, compute ρ, forget them."""
    records: list[ModuleRecord] = []
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("scanning modules", total=len(task.modules))
        for module in task.modules:
            key = module + WEIGHT
            sources = (aligned, unaligned, task.checkpoint)
            w_al, w_un, w_ft = (src.get(key).to(device) for src in sources)
            block_rows = w_al.shape[0] if w_al.is_cuda else 1024  # CPU: blocks of rows, V never whole
            try:
                sim, norm = update_similarity(w_al, w_un, w_ft, task.transposed, block_rows)
            except ValueError:  # non-finite input: name the tensor
                for src in sources:
                    src.get_float(key)
                raise
            del w_al, w_un, w_ft
            records.append(full_record(module, task.shape(module), sim, norm))
            bar.advance(job)
    return records


def full_sketch_similarities(
    aligned: Checkpoint, sketch: Sketch, task: FullModel, device: torch.device, progress: bool
) -> list[ModuleRecord]:
    """ρ of every module of a full fine-tune from a sketch of V (`engine.subspace`): per module read W_al
    and W_task, form ΔW (Linear orientation) and project it on the sketch's K directions."""
    if sketch.transposed != task.transposed:
        raise InputError(
            f"the subspace sketch {sketch.directory} has layout {sketch.meta.get('layout')}, but the aligned "
            f"model {aligned.directory} stores {'Conv1D' if task.transposed else 'Linear'} weights"
        )
    sketch.require(task.modules)
    records: list[ModuleRecord] = []
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("scanning modules", total=len(task.modules))
        for module in task.modules:
            key, shape = module + WEIGHT, task.shape(module)
            if sketch.shape(module) != shape:
                raise InputError(
                    f"module {module}: (d_out, d_in) = {shape} in {aligned.directory}, but the subspace "
                    f"sketch {sketch.directory} holds {sketch.shape(module)}"
                )
            delta = task.checkpoint.get(key).to(device=device, dtype=torch.float32)
            delta -= aligned.get(key).to(device=device, dtype=torch.float32)
            delta = delta.T if task.transposed else delta
            u, s = sketch.basis(module, device)
            try:
                sim = sketch_similarity_dense(u, s, delta)
            except ValueError:  # non-finite input: name the tensor
                aligned.get_float(key)
                task.checkpoint.get_float(key)
                raise
            norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            records.append(full_record(module, shape, sim, norm))
            records[-1].route, records[-1].sketch_energy = None, sketch.energy(module)
            del delta
            bar.advance(job)
    return records


# --- the safety update -----------------------------------------------------------------------------
class SafetyUpdates(Protocol):
    """Where ΔW_s of a module comes from: a safety LoRA or a full safety fine-tune."""

    def delta(self, module: str) -> torch.Tensor | None:
        """ΔW_s in float32 in the stored layout, or None when the safety input lacks the module."""

    def rank(self, module: str) -> int | None:
        """The safety LoRA's rank of the module (None for a full safety model or a missing module)."""

    def covers(self, module: str) -> bool:
        """Whether the safety input has an update for the module (`delta` is not None)."""


class LoraSafety:
    """ΔW_s = s · B A of a safety LoRA on the aligned model, matched to checkpoint modules by name."""

    def __init__(self, adapter: LoraAdapter, aligned: Checkpoint, transposed: bool):
        if adapter.fan_in_fan_out != transposed:
            layout = "d_in × d_out (Conv1D)" if transposed else "d_out × d_in"
            raise InputError(
                f"fan_in_fan_out of the {adapter.label} {adapter.directory} is {adapter.fan_in_fan_out}, but "
                f"the aligned model's linear weights are stored {layout}"
            )
        self.adapter, self.transposed = adapter, transposed
        self.by_key = {find_module_weight(aligned, m): m for m in adapter.lora_modules}

    def _module(self, module: str) -> str | None:
        return self.by_key.get(module + WEIGHT)

    def delta(self, module: str) -> torch.Tensor | None:
        name = self._module(module)
        if name is None:
            return None
        d = self.adapter.factors(name).delta(torch.float32)
        return d.T if self.transposed else d

    def rank(self, module: str) -> int | None:
        name = self._module(module)
        return self.adapter.rank(name) if name is not None else None

    def covers(self, module: str) -> bool:
        return self._module(module) is not None

    def unused(self, modules: Collection[str]) -> list[str]:
        """Adapter modules that match none of `modules` (ignored by the merge)."""
        keys = {m + WEIGHT for m in modules}
        return [m for k, m in self.by_key.items() if k not in keys]


class ModelSafety:
    """ΔW_s = W_S − W_al of a full safety fine-tune of the aligned model."""

    def __init__(self, model: Checkpoint, aligned: Checkpoint):
        check_same_tensors(model, aligned)
        self.model, self.aligned = model, aligned

    def delta(self, module: str) -> torch.Tensor | None:
        key = module + WEIGHT
        return self.model.get(key).to(torch.float32) - self.aligned.get(key).to(torch.float32)

    def rank(self, module: str) -> int | None:
        return None

    def covers(self, module: str) -> bool:
        return True  # the constructor checked: the safety model holds every tensor of the aligned one


# --- writing merged full models --------------------------------------------------------------------
@dataclass
class FullMerge:
    """What a full-model merge did: modules merged, their ‖W_out − W_al‖_F, selected modules kept."""

    merged: set[str] = field(default_factory=set)
    norms_out: dict[str, float] = field(default_factory=dict)
    no_safety_counterpart: list[str] = field(default_factory=list)


def merged_update(
    module: str,
    d_task: torch.Tensor,
    d_safety: torch.Tensor,
    weights: tuple[float, float],
    method: str,
    density: float,
    seed: int,
    transposed: bool,
) -> torch.Tensor:
    """w_f ΔW_f + w_s ΔW_s (linear), or TIES / DARE of the two (docs/method.md §4.3), in the stored
    layout. The operators see d_out × d_in updates, as in the LoRA route, so DARE masks are the same."""
    if method == "linear":
        return weights[0] * d_task + weights[1] * d_safety
    t, s = (d.T if transposed else d for d in (d_task, d_safety))
    merged = merge_dense([t, s], list(weights), method, density, module_seed(seed, module))
    return merged.T if transposed else merged


def write_full_merge(
    task: FullModel,
    aligned: Checkpoint,
    safety: SafetyUpdates,
    selected: Collection[str],
    merge: tuple[tuple[float, float], str, float, int],
    out_dir: Path,
    max_shard_size: str,
    progress: bool,
) -> FullMerge:
    """Write the task model with W_al + merged update on the selected modules (`merge` = weights, method,
    density, seed). Every other tensor is the task model's, bit for bit. Sums in float32, stored in the
    task model's dtype. A selected module the safety input lacks is kept as fine-tuned and listed."""
    weights, method, density, seed = merge
    targets = {m + WEIGHT: m for m in task.modules if m in selected}
    result = FullMerge()

    def edit(name: str, t: torch.Tensor) -> torch.Tensor:
        module = targets.get(name)
        if module is None:
            return t
        d_safety = safety.delta(module)
        if d_safety is None:
            result.no_safety_counterpart.append(module)
            return t
        w_al = aligned.get(name).to(torch.float32)
        d_task = t.to(torch.float32) - w_al
        update = merged_update(module, d_task, d_safety, weights, method, density, seed, task.transposed)
        new = (w_al + update).to(t.dtype)
        result.merged.add(module)
        result.norms_out[module] = change_norm(new, w_al)
        return new

    write_model(task.checkpoint, edit, out_dir, max_shard_size, progress)
    return result


def change_norm(new: torch.Tensor, w_aligned: torch.Tensor) -> float:
    """‖W_out − W_al‖_F in float64 (of the stored output, after rounding to its dtype)."""
    return float(torch.linalg.vector_norm(new.to(torch.float64) - w_aligned.to(torch.float64)))
