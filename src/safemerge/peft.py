"""SafeMERGE (and Safe LoRA) on a `peft.PeftModel` in memory (docs/python-api.md), in PEFT's own idiom:
one call adds the merged adapter to the model, as `add_weighted_adapter` does.

The model holds the task and the safety adapter; the aligned weights are its own (each LoRA layer's
`base_layer.weight`), the unaligned ones come from a path, a hub id, a model or a state dict. The rows
of the report, the selection, the merge and the report's account of it are the engine's
(`engine/pipeline.py`: `module_similarity`, `module_record`, `selected_report`, `merge_and_record`), so
the factors are those `safemerge merge` writes for the same adapters, bit for bit. Safe LoRA's
selection and projection are the defence's (`defenses/safelora.py`, `defenses/tensors.py`): the factors
`safemerge defend --method safelora` writes, bit for bit. RESTA stays file-based: its output adds
β·V to every weight, a full model, not an adapter.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import try_to_load_from_cache
from pydantic import BaseModel, ValidationError

from safemerge.common.config_io import validation_message
from safemerge.common.errors import InputError
from safemerge.common.outdir import atomic_output_dir
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import defense_card, defense_markdown
from safemerge.defenses.safelora import (
    SAFELORA_NAME,
    SAFELORA_THRESHOLD,
    flag_unselected_zero_v,
    policy_options,
    select_by_policy,
)
from safemerge.defenses.safemerge import MergeAll
from safemerge.defenses.tensors import rescale, safelora_project
from safemerge.engine.checkpoint import Checkpoint, candidate_keys, find_module_weight
from safemerge.engine.config import SELECTION_OPTIONS, MergeOptions, SelectionConfig
from safemerge.engine.criterion import safety_difference
from safemerge.engine.hub import looks_like_hub_id, split_revision
from safemerge.engine.inputs import names_model
from safemerge.engine.lora import LoraFactors, check_config, merged_adapter_settings
from safemerge.engine.merging import exact_merge, pad_rank
from safemerge.engine.pipeline import (
    check_pair,
    dtype_name,
    lora_delta_norm,
    merge_and_record,
    module_record,
    module_similarity,
    open_checkpoint,
    output_scaling,
    ranked_last,
    selected_report,
    warn_in_report,
)
from safemerge.engine.report import (
    PLOT_PNG,
    REPORT_JSON,
    REPORT_MD,
    ModuleRecord,
    Report,
    model_card,
    plot_similarity,
    report_dict,
    write_report,
)

if TYPE_CHECKING:
    from peft import PeftModel

# The options of `safemerge merge` that apply in memory (MergeOptions less its full-model output).
MERGE_KEYS = ("weights", "allow_any_weights", "mode", "method", "density", "seed", "rank", "allow_partial")
NOT_IN_MEMORY = {
    "merge_into_base": "use PEFT's model.merge_and_unload() on the merged adapter",
    "max_shard_size": "save with model.save_pretrained(..., max_shard_size=...)",
}
ALLOW_PARTIAL_KEYWORD = "allow_partial=True"
TRAIN_LIKE = (
    "Train a safety adapter on the same modules: "
    "`safemerge train --recipe safety --like TASK_ADAPTER_DIR ...`"
)


# --- the PeftModel's adapters ---------------------------------------------------------------------------
@dataclass
class LoraModule:
    """One LoRA layer of the PeftModel: its module path (as in the adapter's file, `model.layers.0...`)
    and the layer (PEFT's `lora.Linear`, whose `base_layer` holds the aligned weight)."""

    name: str
    layer: Any

    @property
    def aligned(self) -> torch.Tensor:
        return self.layer.get_base_layer().weight.detach()

    def factors(self, adapter: str) -> LoraFactors:
        """The adapter's factors as `LoraAdapter.factors` reads them from a file: float32 on the CPU, the
        scaling the layer holds (alpha / r or alpha / √r, rank and alpha patterns applied); NaN or Inf
        refused."""
        a = self.layer.lora_A[adapter].weight.detach().to("cpu", torch.float32)
        b = self.layer.lora_B[adapter].weight.detach().to("cpu", torch.float32)
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"adapter {adapter!r}: {self.name}.{which} has NaN or Inf")
        return LoraFactors(A=a, B=b, scaling=float(self.layer.scaling[adapter]))


def require_peft_model(model: Any, adapters: dict[str, str]) -> None:
    """InputError unless `model` is a PeftModel holding LoRA adapters of the given names (by role)."""
    from peft import PeftModel  # lazy: peft adds ~2.4 s to an import

    if not isinstance(model, PeftModel):
        raise InputError(
            f"model must be a peft.PeftModel holding the adapters (got {type(model).__name__}): load them "
            "with PeftModel.from_pretrained(base, TASK_DIR) and model.load_adapter(SAFETY_DIR, 'safety')"
        )
    for role, name in adapters.items():
        if name not in model.peft_config:
            have = ", ".join(repr(n) for n in model.peft_config)
            raise InputError(f"the model has no adapter {name!r} ({role}); its adapters: {have}")
        check_config(config_dict(model.peft_config[name]), f"adapter {name!r} ({role}) of the PeftModel")
    if len(set(adapters.values())) < len(adapters):
        raise InputError(f"the task and safety adapters must differ (both are {adapters['task adapter']!r})")


def config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as the plain dict of its adapter_config.json (enums as their values)."""
    data = dict(config.to_dict())
    for key, value in data.items():
        data[key] = getattr(value, "value", value)
        if isinstance(value, set):
            data[key] = sorted(value)
    return data


def lora_modules(model: PeftModel, adapter: str) -> list[LoraModule]:
    """The LoRA layers that hold `adapter`, in module order. Only Linear and Conv1D LoRA layers
    (`lora.Linear`) are supported, on unmerged, loaded base weights: InputError naming the module."""
    from peft.tuners.lora.layer import Linear, LoraLayer  # lazy: peft adds ~2.4 s to an import

    found = []
    for name, layer in model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            if isinstance(layer, LoraLayer) and adapter in getattr(layer, "lora_embedding_A", {}):
                raise InputError(f"adapter {adapter!r}: {name} is a LoRA on an embedding, not supported")
            continue
        if type(layer) is not Linear:
            raise InputError(
                f"adapter {adapter!r}: {name} is a {type(layer).__module__}.{type(layer).__name__} LoRA "
                "layer; safemerge supports LoRA on Linear and Conv1D layers of unquantised weights"
            )
        if layer.merged:
            raise InputError(
                f"{name} has adapters merged into its base weight ({', '.join(layer.merged_adapters)}): the "
                "aligned weights are not the base model's; call model.unmerge_adapter() first"
            )
        if layer.get_base_layer().weight.device.type == "meta":
            raise InputError(f"{name}: the base weight is not loaded (meta device, offloaded?)")
        found.append(LoraModule(name, layer))
    if not found:
        raise InputError(f"adapter {adapter!r} has no LoRA layers in the model")
    return found


# --- the unaligned weights ------------------------------------------------------------------------------
class Unaligned:
    """The unaligned weights by module: from a checkpoint (a path or hub id, read one tensor at a time) or
    a mapping of tensors (a model's state dict)."""

    def __init__(self, source: Checkpoint | Mapping[str, torch.Tensor], info: dict[str, Any]):
        self.source, self.info = source, info

    @classmethod
    def open(cls, unaligned: Any) -> Unaligned:
        """A path or hub id, an `nn.Module` (a transformers model) or a state dict; InputError otherwise,
        and for a model holding LoRA layers (a PeftModel is not the unaligned base)."""
        if isinstance(unaligned, str | os.PathLike):
            ckpt, info = open_checkpoint(os.fspath(unaligned), "unaligned", allow_pickle=False)
            return cls(ckpt, info)
        if isinstance(unaligned, torch.nn.Module):
            if any("lora_A" in n for n, _ in unaligned.named_modules()):
                raise InputError(
                    "unaligned holds LoRA layers (a PeftModel?): pass the unaligned base model, against "
                    "whose weights V = W_aligned - W_unaligned is measured"
                )
            config: Any = getattr(unaligned, "config", None)
            name = getattr(config, "name_or_path", None) or None
            info = {"path": name or f"a {type(unaligned).__name__} in memory", "in_memory": True}
            return cls(unaligned.state_dict(), info)
        if isinstance(unaligned, Mapping) and all(isinstance(v, torch.Tensor) for v in unaligned.values()):
            return cls(unaligned, {"path": "a state dict in memory", "in_memory": True})
        raise InputError(
            "unaligned must be a directory, a hub id, a model or a state dict of the unaligned base model "
            f"(got {type(unaligned).__name__})"
        )

    def weight(self, module: str) -> torch.Tensor:
        """The module's weight, found as the file path finds it (`engine/checkpoint.candidate_keys`)."""
        if isinstance(self.source, Checkpoint):
            return self.source.get(find_module_weight(self.source, module))
        for key in candidate_keys(module):
            if key in self.source:
                return self.source[key].detach()
        raise InputError(f"module {module!r}: no weight {module}.weight in the unaligned {self.info['path']}")


# --- options --------------------------------------------------------------------------------------------
def validated(cls: type[BaseModel], options: dict[str, Any]) -> Any:
    """`cls` from keyword options, with the CLI's error wording (`invalid options: key: message`)."""
    try:
        return cls.model_validate(options)
    except ValidationError as exc:
        raise InputError(f"invalid options: {validation_message(exc, cls)}") from None


def split_options(options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """InputError for an option that is not in `allowed`, with a near-miss suggestion."""
    for key in options:
        if key in NOT_IN_MEMORY:
            raise InputError(f"{key} does not apply in memory: {NOT_IN_MEMORY[key]}")
        if key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise InputError(f"unknown option {key!r}{hint}; options: {', '.join(allowed)}")


def selection_of(options: dict[str, Any], merge_all: bool) -> SelectionConfig:
    """The selection policy of the options (SafeMERGE's ρ < 0.35 when none; every module with
    `merge_all`, which takes none)."""
    given = {k: options[k] for k in SELECTION_OPTIONS if k in options}
    if merge_all:
        if given:
            raise InputError(f"merge_all merges every module: give no {', '.join(given)} with it")
        return validated(SelectionConfig, {"fraction": 1.0})
    return validated(SelectionConfig, given)


# --- scan -----------------------------------------------------------------------------------------------
def _records(modules: list[LoraModule], task: str, unaligned: Unaligned) -> Iterator[ModuleRecord]:
    """ρ of every task module, as `engine/pipeline._similarities` computes it, on the model's weights."""
    for mod in modules:
        w_al, w_un = mod.aligned, _unaligned_weight(mod, unaligned)
        factors = mod.factors(task)
        dev = LoraFactors(factors.A.to(w_al.device), factors.B.to(w_al.device), factors.scaling)
        sim = module_similarity(w_al, w_un, dev, bool(mod.layer.fan_in_fan_out))
        yield module_record(mod.name, factors, sim)


def _unaligned_weight(mod: LoraModule, unaligned: Unaligned) -> torch.Tensor:
    """The module's unaligned weight on the aligned weight's device, its shape checked."""
    w_al, w_un = mod.aligned, unaligned.weight(mod.name)
    if tuple(w_un.shape) != tuple(w_al.shape):
        raise InputError(
            f"module {mod.name}: the unaligned weight has shape {tuple(w_un.shape)}, the model's base "
            f"weight {tuple(w_al.shape)} — is unaligned the same architecture as the model?"
        )
    return w_un.to(w_al.device)


def check_distinct(modules: list[LoraModule], unaligned: Unaligned, given: Any) -> None:
    """InputError when the unaligned weights are the model's own base weights (the same model twice:
    V = 0, ρ meaningless), compared in the model's dtype (a bfloat16 model of the aligned checkpoint is
    the same model) module by module, stopping at the first that differs (as `engine/inputs.check_distinct`:
    for a real pair, one weight is read)."""
    for mod in modules:
        w_al = mod.aligned
        if not torch.equal(_unaligned_weight(mod, unaligned).to(w_al.dtype), w_al):
            return
    raise InputError(
        f"unaligned {_shown(given)} holds the model's own base weights in all {len(modules)} LoRA modules "
        "(in the model's dtype): V = W_aligned - W_unaligned is 0, rho is meaningless; pass the unaligned "
        "(pre-alignment) base model"
    )


def _shown(unaligned: Any) -> str:
    return (
        os.fspath(unaligned) if isinstance(unaligned, str | os.PathLike) else f"({type(unaligned).__name__})"
    )


def _check_not_swapped(model: PeftModel, adapters: dict[str, str], unaligned: Any, un: Unaligned) -> None:
    """An adapter whose base_model_name_or_path names the unaligned input: the PeftModel was built on the
    unaligned model, or the two models are swapped (ρ cannot tell: it is invariant under V → −V)."""
    if not isinstance(unaligned, str | os.PathLike) or not isinstance(un.source, Checkpoint):
        return
    for role, name in adapters.items():
        base = model.peft_config[name].base_model_name_or_path
        if names_model(str(base) if base else None, os.fspath(unaligned), un.source.directory):
            raise InputError(
                f"the {role} {name!r} names {base}, the unaligned model, as its base: is the PeftModel built "
                "on the unaligned model? (adapters are trained on the aligned model, whose weights it holds)"
            )


def _adapter_info(model: PeftModel, name: str) -> dict[str, Any]:
    config = config_dict(model.peft_config[name])
    return {
        "path": f"adapter {name!r} of the PeftModel (in memory)",
        "adapter_name": name,
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "config": {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")},
    }


def base_model_info(model: PeftModel) -> dict[str, Any]:
    """The report's description of the PeftModel's base (the aligned model): the name it was loaded from,
    with `local_dir` for a directory and `hub_id` for a hub id (its card, when in the local cache, as
    `local_dir`: the license the output's card inherits). `revision` is None: transformers keeps no
    commit of a loaded model, so none is claimed."""
    name = str(getattr(model.get_base_model().config, "name_or_path", "") or "")
    info: dict[str, Any] = {"path": name or "the PeftModel's base model", "revision": None}
    if name and Path(name).expanduser().is_dir():
        info["local_dir"] = str(Path(name).expanduser().resolve())
    elif looks_like_hub_id(split_revision(name)[0]):
        info["hub_id"] = split_revision(name)[0]
        card = try_to_load_from_cache(info["hub_id"], "README.md")  # the local cache, never the network
        if isinstance(card, str):
            info["local_dir"] = str(Path(card).parent)
    return info


def _scan(
    model: PeftModel,
    unaligned: Any,
    adapters: dict[str, str],
    selection: SelectionConfig,
    options: dict[str, Any],
    command: str,
) -> tuple[Report, list[LoraModule]]:
    """The scan's report (the engine's rows and selection) and the task adapter's LoRA layers."""
    require_peft_model(model, adapters)
    modules = lora_modules(model, adapters["task adapter"])
    source = Unaligned.open(unaligned)
    check_distinct(modules, source, unaligned)
    _check_not_swapped(model, adapters, unaligned, source)
    records = list(_records(modules, adapters["task adapter"], source))
    inputs = {
        "aligned": base_model_info(model),
        "unaligned": source.info,
        "task_adapter": _adapter_info(model, adapters["task adapter"]),
    }
    options = {**selection.model_dump(mode="json"), **options, "in_memory": True}
    return selected_report(command, inputs, options, records, selection), modules


def scan_peft_model(model: PeftModel, unaligned: Any, task: str = "default", **selection: Any) -> Report:
    """ρ of every module of the `task` adapter of a PeftModel, and the selection, as `safemerge scan`.

    `unaligned`: the unaligned base model as a directory, hub id, model or state dict. `selection`: one
    of `threshold` (default 0.35), `top_k`, `fraction`, checked as the CLI checks them (InputError).
    Nothing in the model changes."""
    split_options(selection, SELECTION_OPTIONS)
    policy = selection_of(selection, merge_all=False)
    report, _ = _scan(model, unaligned, {"task adapter": task}, policy, {}, "scan")
    return report


# --- merge ----------------------------------------------------------------------------------------------
def add_safemerge_adapter(
    model: PeftModel,
    unaligned: Any,
    task: str = "default",
    safety: str = "safety",
    adapter_name: str = "safemerged",
    *,
    merge_all: bool = False,
    **options: Any,
) -> Report:
    """SafeMERGE in memory: scan the `task` adapter, merge the selected modules with the `safety` adapter
    and add the result to `model` as `adapter_name` (PEFT's `add_adapter`, then the merged factors); the
    active adapter is left as it was (`model.set_adapter(adapter_name)` to use it).

    The factors are those `safemerge merge` writes for the same adapters and base weights, bit for bit.
    `options`: the selection (`threshold`, `top_k`, `fraction`) and the merge options of `safemerge merge`
    (`weights`, `allow_any_weights`, `mode`, `method`, `density`, `seed`, `rank`, `allow_partial`), checked
    by the same option groups (InputError). `merge_all=True` merges every module (the merge-all defence).
    Nothing is added when anything is refused."""
    split_options(options, SELECTION_OPTIONS + MERGE_KEYS)
    selection = selection_of(options, merge_all)
    opts: MergeOptions = validated(MergeOptions, {k: v for k, v in options.items() if k in MERGE_KEYS})
    adapters = {"task adapter": task, "safety adapter": safety}
    require_peft_model(model, adapters)
    _require_free_name(model, adapter_name)
    merge_options = opts.model_dump(mode="json", exclude={"merge_into_base", "max_shard_size"})
    report, modules = _scan(model, unaligned, adapters, selection, merge_options, "merge")
    if merge_all:
        report.options["selection_policy"] = MergeAll.policy_label
    report.inputs["safety_adapter"] = _adapter_info(model, safety)
    safety_modules = lora_modules(model, safety)
    fifo = (_fan_in_fan_out(model, task), _fan_in_fan_out(model, safety))
    check_pair(report, fifo, [m.name for m in modules], [m.name for m in safety_modules])
    task_factors = {m.name: m.factors(task) for m in modules}
    safety_factors = {m.name: m.factors(safety) for m in safety_modules if m.name in task_factors}
    dtype = _output_dtype(modules, task)
    ranks = {name: f.rank for name, f in safety_factors.items()}
    result = merge_and_record(
        report, task_factors, safety_factors, ranks, opts, dtype, TRAIN_LIKE, ALLOW_PARTIAL_KEYWORD
    )
    shape = (result.rank, result.lora_alpha, result.scaling)
    _add_filled_adapter(model, report, modules, task, adapter_name, result.factors, shape)
    return report


def _require_free_name(model: PeftModel, adapter_name: str) -> None:
    if adapter_name in model.peft_config:
        raise InputError(
            f"the model already has an adapter {adapter_name!r}: pass another adapter_name, or remove it "
            f"with model.delete_adapter({adapter_name!r})"
        )


def _add_filled_adapter(
    model: PeftModel,
    report: Report,
    modules: list[LoraModule],
    task: str,
    adapter_name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    shape: tuple[int, float, float],
) -> None:
    """Add `adapter_name` with the task adapter's config at `shape` = (rank, lora_alpha, scaling), fill
    it with `factors` and the task adapter's modules_to_save; on any failure, remove it again."""
    rank, alpha, scaling = shape
    config = dataclasses.replace(
        model.peft_config[task], **merged_adapter_settings(config_dict(model.peft_config[task]), rank, alpha)
    )
    try:
        model.add_adapter(adapter_name, config)
        _fill(model, modules, task, adapter_name, factors, scaling)
        if extra := _copy_modules_to_save(model, task, adapter_name):
            msg = f"adapter {task!r} carries non-LoRA modules (modules_to_save): {extra}; they are copied"
            warn_in_report(report, msg + " unchanged")
    except BaseException:
        if adapter_name in model.peft_config:  # no half-made adapter is left in the model
            model.delete_adapter(adapter_name)
        raise
    report.outputs["adapter_name"] = adapter_name


def _fan_in_fan_out(model: PeftModel, adapter: str) -> bool:
    return bool(getattr(model.peft_config[adapter], "fan_in_fan_out", False))


def _fill(
    model: PeftModel,
    modules: list[LoraModule],
    task: str,
    name: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scaling: float,
) -> None:
    """Copy the merged factors into the new adapter's layers, which must be the task adapter's (PEFT
    injected it with the task adapter's config) with the merged scaling."""
    from peft.tuners.lora.layer import LoraLayer  # lazy: peft adds ~2.4 s to an import

    added = [
        n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer) and name in m.lora_A
    ]
    if sorted(added) != sorted(m.name for m in modules):
        raise InputError(
            f"PEFT placed the adapter {name!r} on other modules than the task adapter {task!r} "
            f"({len(added)} vs {len(modules)}); this PeftModel's configuration is not supported"
        )
    with torch.no_grad():
        for mod in modules:
            a, b = factors[mod.name]
            mod.layer.lora_A[name].weight.copy_(a)
            mod.layer.lora_B[name].weight.copy_(b)
            if mod.layer.scaling[name] != scaling:
                raise InputError(f"{mod.name}: PEFT's scaling {mod.layer.scaling[name]} is not {scaling}")


def _copy_modules_to_save(model: PeftModel, task: str, name: str) -> str:
    """The task adapter's trained copies of its modules_to_save into the new adapter's (PEFT's
    `add_adapter` starts them from the base module); returns their names ("" when none)."""
    from peft.utils.other import ModulesToSaveWrapper  # lazy: peft adds ~2.4 s to an import

    copied = []
    for path, wrapper in model.get_base_model().named_modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and task in wrapper.modules_to_save:
            if name not in wrapper.modules_to_save:
                raise InputError(f"{path}: PEFT made no modules_to_save copy for the adapter {name!r}")
            wrapper.modules_to_save[name].load_state_dict(wrapper.modules_to_save[task].state_dict())
            copied.append(path)
    return ", ".join(copied)


# --- Safe LoRA ------------------------------------------------------------------------------------------
def add_safelora_adapter(
    model: PeftModel,
    unaligned: Any,
    task: str = "default",
    adapter_name: str = "safelora",
    *,
    preserve_norm: bool = False,
    **selection: Any,
) -> Report:
    """Safe LoRA (Hsu et al. 2024) in memory: B ← C B with C = V Vᵀ / ‖V‖_F on the `task` adapter's
    selected modules, added to `model` as `adapter_name` (the active adapter is left as it was).

    The factors are those `safemerge defend --method safelora` writes for the same adapter and base
    weights, bit for bit: ρ of every module first, then the selection (`threshold`, default Safe LoRA's
    0.5, with its round(ρ, 5) ≤ τ rule; or `top_k`; or `fraction`), then the projection (float64 on the
    aligned weight's device). `preserve_norm=True` rescales each projected update to its norm before.
    Nothing is added when anything is refused (InputError)."""
    split_options(selection, SELECTION_OPTIONS)
    policy = {k: selection[k] for k in SELECTION_OPTIONS if k in selection} or {
        "threshold": SAFELORA_THRESHOLD
    }
    validated(SelectionConfig, policy)  # exactly one policy, in range: the CLI's checks and wording
    adapters = {"task adapter": task}
    require_peft_model(model, adapters)
    _require_free_name(model, adapter_name)
    report, modules = _scan(model, unaligned, adapters, SelectionConfig.scan_only(), {}, "defend")
    source = Unaligned.open(unaligned)
    factors, rank, alpha, scaling = _safelora_factors(report, modules, task, source, policy, preserve_norm)
    report.options = policy_options(report.options, policy, preserve_norm) | {
        "defense": SAFELORA_NAME,
        "output_rank": rank,
        "output_scaling": scaling,
        "output_lora_alpha": alpha,
        "output_dtype": dtype_name(_output_dtype(modules, task)),
    }
    _add_filled_adapter(model, report, modules, task, adapter_name, factors, (rank, alpha, scaling))
    return report


def _output_dtype(modules: list[LoraModule], task: str) -> torch.dtype:
    """float64 for a float64 task adapter, else float32 (as `LoraAdapter.output_dtype`: docs/engine.md)."""
    stored = {m.layer.lora_A[task].weight.dtype for m in modules}
    return torch.float64 if stored == {torch.float64} else torch.float32


def _safelora_factors(
    report: Report,
    modules: list[LoraModule],
    task: str,
    unaligned: Unaligned,
    policy: dict[str, Any],
    preserve_norm: bool,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float, float]:
    """Safe LoRA's factors of every module, with (rank, lora_alpha, scaling), the report's rows marked:
    the steps of `defenses/safelora.SafeLora.run` on the model's weights, in its order."""
    chosen = select_by_policy([r.rho for r in report.modules], policy, ranked_last(report.modules))
    flag_unselected_zero_v(report.modules, chosen)
    task_factors = {m.name: m.factors(task) for m in modules}
    rank = max(f.rank for f in task_factors.values())
    out_scale, alpha = output_scaling([f.scaling for f in task_factors.values()], rank)
    dtype = _output_dtype(modules, task)
    factors = {}
    for mod, rec, pick in zip(modules, report.modules, chosen, strict=True):
        rec.selected = pick
        a, b = exact_merge(task_factors[mod.name], None, 1.0, 0.0, out_scale)
        if pick:
            w_al = mod.aligned
            v = safety_difference(w_al, _unaligned_weight(mod, unaligned))
            projected = safelora_project(v.T if mod.layer.fan_in_fan_out else v, b.to(w_al.device))
            if projected is None:
                rec.flags.append("zero-V: projection undefined, module left unchanged")
            else:
                b = projected.cpu()
                if preserve_norm:
                    b = rescale(b, rec.delta_norm_in, lora_delta_norm(LoraFactors(a, b, out_scale)))
                rec.merged = True
        a, b = pad_rank(a, b, rank)
        factors[mod.name] = (a.to(dtype), b.to(dtype))
        rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, out_scale))
    return factors, rank, alpha, out_scale


# --- save -----------------------------------------------------------------------------------------------
PEFT_STAGING = "_peft_save"  # PEFT's save_pretrained writes here inside the temporary output, then moves
OPTIONS_IN_REPORT = "`safemerge_report.json` (`options`)"


def save_safemerged(
    model: PeftModel,
    report: Report,
    out: str | os.PathLike[str],
    adapter_name: str | None = None,
    *,
    force: bool = False,
    plot: bool = True,
) -> Path:
    """Save the adapter `add_safemerge_adapter` added as the folder `safemerge merge` writes (for
    `add_safelora_adapter`'s, the folder of `safemerge defend --method safelora`), which `safemerge push`
    uploads: the adapter at the top of `out` (PEFT's `save_pretrained` of that one adapter), its model
    card (README.md, the command's card), `safemerge_report.json` / `.md` (`report`), the ρ plot (unless
    `plot=False`) and safemerge's output marker. Not the command's rerunnable YAML: the adapters were in
    memory. Returns `out`.

    `adapter_name`: the adapter to save, by default the one the report describes (another is refused).
    Written into a temporary sibling renamed into place when complete; an existing `out` is refused
    unless `force=True`, and even then unless safemerge wrote it (the CLI's `--force` rule). `report`
    is not changed: the saved copy names `out` as its output."""
    name = _saved_adapter(model, report, adapter_name)
    folder = Path(out).expanduser()
    saved = dataclasses.replace(
        report,
        outputs={**report.outputs, "adapter": str(folder), "report": str(folder / REPORT_JSON)},
    )
    base = model.peft_config[name].base_model_name_or_path
    with atomic_output_dir(folder, force, _local_inputs(report), report.command) as tmp:
        _peft_files(model, name, tmp)
        if report.command == "merge":  # the files of `safemerge merge` (and `defend --method merge-all`)
            (tmp / "README.md").write_text(model_card(saved, base, OPTIONS_IN_REPORT))
            write_report(saved, tmp, plot=plot)
        else:  # the files of `safemerge defend --method safelora`
            _write_safelora_reports(saved, tmp, plot)
    return folder


def _write_safelora_reports(report: Report, tmp: Path, plot: bool) -> None:
    """The report files and card of `safemerge defend --method safelora` (`defenses/report.py`), its
    settings from the report's options; no `defense.yaml`, which would not rerun from memory."""
    policy = {k: report.options[k] for k in SELECTION_OPTIONS if report.options.get(k) is not None}
    cfg = DefendConfig.model_validate(
        {
            "method": SAFELORA_NAME,
            **{key: report.inputs[key]["path"] for key in ("aligned", "unaligned", "task_adapter")},
            "out": report.outputs["adapter"],
            "preserve_norm": bool(report.options.get("preserve_norm")),
            **policy,
        }
    )
    data = report_dict(report) | {"defense": cfg.settings()}
    (tmp / REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n")
    (tmp / REPORT_MD).write_text(defense_markdown(report, cfg))
    if plot and report.modules:
        plot_similarity(report, tmp / PLOT_PNG)
    (tmp / "README.md").write_text(defense_card(report, cfg, OPTIONS_IN_REPORT))


def _saved_adapter(model: PeftModel, report: Report, adapter_name: str | None) -> str:
    """The adapter to save: the merged adapter the report describes, present in `model` (InputError)."""
    described = report.outputs.get("adapter_name")
    saves = report.command == "merge" or report.options.get("defense") == SAFELORA_NAME
    if not saves or described is None:
        raise InputError(
            f"the report is a `{report.command}` report without an adapter in memory: save_safemerged "
            "saves the adapter that add_safemerge_adapter (or add_safelora_adapter) added, with the report "
            "it returned"
        )
    if adapter_name is not None and adapter_name != described:
        raise InputError(
            f"the report describes the adapter {described!r}, not {adapter_name!r}: pass the report that "
            f"was returned when {adapter_name!r} was added"
        )
    require_peft_model(model, {})
    if described not in model.peft_config:
        have = ", ".join(repr(n) for n in model.peft_config)
        raise InputError(f"the model has no adapter {described!r} (the report's); its adapters: {have}")
    return str(described)


def _local_inputs(report: Report) -> dict[str, str | None]:
    """The report's inputs that are directories on this machine, which `out` must not overlap."""
    return {
        key: info.get("local_dir")
        for key, info in report.inputs.items()
        if isinstance(info, Mapping) and info.get("local_dir") and not info.get("hub_id")
    }


def _peft_files(model: PeftModel, name: str, tmp: Path) -> None:
    """PEFT's files of the one adapter `name` (adapter_config.json, adapter_model.safetensors) at the top
    of `tmp`: PEFT saves an adapter other than "default" in a subfolder of its name, and writes its own
    README.md, which the merge's card replaces."""
    staging = tmp / PEFT_STAGING
    model.save_pretrained(str(staging), selected_adapters=[name])
    written = staging if name == "default" else staging / name
    for entry in written.iterdir():
        if entry.name != "README.md" and entry.is_file():
            entry.rename(tmp / entry.name)
    shutil.rmtree(staging)
