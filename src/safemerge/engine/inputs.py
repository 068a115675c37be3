"""Which input is which: checks that the models and adapters a command is given play the roles it assumes.

SafeMERGE's ρ measures a task update against V = W_aligned − W_unaligned (docs/method.md §3). Inputs that
are each valid on their own can still make that meaningless or silently wrong, and nothing in the numbers
shows it: the same model twice (V = 0, every module "selected"), the two models swapped (V only changes
sign, and ρ is invariant under V → −V), a safety adapter passed as the task adapter, a safety adapter made
for another base model, a LoRA on an LM head that is tied to the input embeddings. These checks read
configs and safetensors headers; only the identity check reads tensors, and only when two checkpoints
have the same layout (docs/engine.md, "Which input is which").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from safemerge.common.errors import InputError
from safemerge.engine.checkpoint import Checkpoint, candidate_keys
from safemerge.engine.hub import split_revision
from safemerge.engine.lora import LoraAdapter, lora_tensor_shapes, module_type

# Recipes of `safemerge train` (train/recipes.py) whose adapter is a safety adapter; every other named
# recipe trains a task adapter. A recipe given as a data file says nothing about its role.
SAFETY_RECIPES = frozenset({"safety", "safety-hub"})
TASK_RECIPES = frozenset({"gsm8k", "pubmedqa", "arithmetic"})
TRAIN_CONFIG = "train_config.yaml"  # what `safemerge train` writes beside the adapter
# A snapshot directory of the hub cache: .../models--owner--name/snapshots/<revision>
_HUB_CACHE_DIR = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


# --- the same model twice ------------------------------------------------------------------------------
def check_distinct(aligned: Checkpoint, unaligned: Checkpoint, keys: Sequence[str]) -> None:
    """InputError when --aligned and --unaligned are the same model: V = 0, and ρ = 0 by convention.

    Same model means the same directory once symlinks are resolved (a hub id and revision resolve to one
    snapshot directory), or the same content. Content is decided cheaply: only when the fingerprints
    (file names, sizes, safetensors headers) are equal are tensors compared, byte for byte, in the order
    of `keys` (the weights the command reads for V), stopping at the first that differs — for a real pair
    that is the first module, a read the scan does anyway; the refusal reads every key in `keys`.
    """
    dir_al, dir_un = aligned.directory.resolve(), unaligned.directory.resolve()
    if dir_al == dir_un:
        raise InputError(_same_model(f"both are {dir_al}"))
    if aligned.fingerprint() != unaligned.fingerprint():
        return
    compared = [k for k in keys if k in aligned and k in unaligned] or aligned.keys()
    for key in compared:
        if not _same_bytes(aligned.get(key), unaligned.get(key)):
            return
    raise InputError(
        _same_model(
            f"{aligned.directory} and {unaligned.directory} have the same files and safetensors headers, "
            f"and the same bytes in all {len(compared)} weights compared"
        )
    )


def _same_model(why: str) -> str:
    return f"--aligned and --unaligned are the same model ({why}): V = 0, rho is meaningless"


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and raw bytes (NaN-safe, unlike torch.equal on floats)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def check_some_v(flags: Iterable[list[str]], zero_v: str, aligned: str | None, unaligned: str) -> None:
    """InputError when V = 0 on every scanned module (e.g. a re-saved copy of the aligned model, whose
    files differ): ρ = 0 by convention everywhere, every module would be selected on no evidence."""
    all_flags = list(flags)
    if all_flags and all(zero_v in f for f in all_flags):
        raise InputError(
            f"V = W_aligned - W_unaligned is 0 on every one of the {len(all_flags)} scanned modules: "
            f"--aligned {aligned} and --unaligned {unaligned} hold the same weights there, so rho is "
            "meaningless (0 by convention, every module would be selected)"
        )


# --- swapped models ------------------------------------------------------------------------------------
def hub_id(name: str, local_dir: Path) -> str | None:
    """The hub id a model input stands for: the name as given (without its `@revision`) when it is not a
    path, else the id of a hub-cache snapshot directory; None for other local directories."""
    if not Path(name).expanduser().exists():
        return split_revision(name)[0]
    m = _HUB_CACHE_DIR.search(local_dir.resolve().as_posix())
    return f"{m['owner']}/{m['name']}" if m else None


def names_model(base: str | None, name: str, local_dir: Path) -> bool:
    """Whether an adapter's `base_model_name_or_path` designates the model given as `name` (opened from
    `local_dir`): the same directory after resolving symlinks, or the same hub id. A name that designates
    neither (a moved directory, another machine's path) is not a match."""
    if not base:
        return False
    path = Path(base).expanduser()
    if path.exists():
        return path.resolve() == local_dir.resolve()
    target = hub_id(name, local_dir)
    return target is not None and base.casefold() == target.casefold()


def check_not_swapped(adapter: LoraAdapter, role: str, unaligned: tuple[str, Path]) -> None:
    """InputError when the adapter names the --unaligned model as its base: SafeMERGE's adapters are
    trained on the aligned model, so --aligned and --unaligned are most likely swapped."""
    base = adapter.config.get("base_model_name_or_path")
    name, local_dir = unaligned
    if names_model(str(base) if base else None, name, local_dir):
        raise InputError(
            f"the {role} {adapter.directory} names {base}, the --unaligned model, as its base: are "
            "--aligned and --unaligned swapped? (adapters are trained on the aligned model)"
        )


# --- task and safety adapters mixed up -----------------------------------------------------------------
def trained_recipe(adapter: LoraAdapter) -> str | None:
    """The recipe `safemerge train` recorded for the adapter (train_config.yaml), or None."""
    path = adapter.directory / TRAIN_CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None  # not ours to judge: the adapter itself was checked
    recipe = data.get("recipe") if isinstance(data, dict) else None
    return str(recipe) if recipe is not None else None


def role_warning(adapter: LoraAdapter, role: str) -> str | None:
    """A warning when safemerge's own training wrote the adapter for the other role: a safety recipe
    passed as the task adapter, or a task recipe passed as the safety adapter."""
    recipe = trained_recipe(adapter)
    if recipe is None:
        return None
    if role == "task adapter" and recipe in SAFETY_RECIPES:
        trained_as = "a safety adapter"
    elif role == "safety adapter" and recipe in TASK_RECIPES:
        trained_as = "a task adapter"
    else:
        return None
    return (
        f"the {role} {adapter.directory} was trained by safemerge train as {trained_as} (recipe: {recipe}, "
        f"{TRAIN_CONFIG}): are the task and safety adapters swapped?"
    )


# --- adapters that do not fit the aligned model --------------------------------------------------------
def check_fits(adapter: LoraAdapter, aligned: Checkpoint, role: str) -> None:
    """Every LoRA module of the adapter must fit the aligned model's weight, read from headers only:
    lora_A (r × d_in) and lora_B (d_out × r) against the weight's (d_out, d_in) (transposed with
    `fan_in_fan_out`). A module the aligned model lacks is left to the callers (they name it)."""
    check_untied(adapter, aligned, role)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for _, module, which, shape in lora_tensor_shapes(adapter.weights_file):
        shapes.setdefault(module, {})[which] = shape
    for module in adapter.lora_modules:
        key = next((k for k in candidate_keys(module) if k in aligned), None)
        if key is None:
            continue
        a, b = shapes[module]["A"], shapes[module]["B"]
        expected = (b[0], a[1])
        stored = aligned.shape(key)
        if (stored[::-1] if adapter.fan_in_fan_out else stored) != expected:
            raise InputError(
                f"module {module}: the {role} {adapter.directory} has lora_A {a} and lora_B {b}, a weight "
                f"of (d_out, d_in) = {expected}, but {key} in the aligned model {aligned.directory} has "
                f"shape {stored} — was the {role} trained on another base model?"
            )


def check_same_shapes(task: LoraAdapter, safety: LoraAdapter) -> None:
    """Without an aligned model (a scan from a sketch), the modules both adapters target must agree on
    (d_out, d_in), or the merge of the two updates is undefined."""

    def dims(adapter: LoraAdapter) -> dict[str, tuple[int, int]]:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for _, module, which, shape in lora_tensor_shapes(adapter.weights_file):
            out.setdefault(module, {})[which] = shape
        return {m: (s["B"][0], s["A"][1]) for m, s in out.items() if "A" in s and "B" in s}

    ours, theirs = dims(task), dims(safety)
    for module, shape in ours.items():
        if module in theirs and theirs[module] != shape:
            raise InputError(
                f"module {module}: the task adapter {task.directory} has (d_out, d_in) = {shape}, the safety "
                f"adapter {safety.directory} has {theirs[module]} — was it trained on another base model?"
            )


def tie_setting(ckpt: Checkpoint) -> bool | None:
    """`tie_word_embeddings` of the checkpoint's config.json (or its text_config); None when unknown."""
    path = ckpt.directory / "config.json"
    try:
        config: Any = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    for where in (config, config.get("text_config")):
        if isinstance(where, dict) and "tie_word_embeddings" in where:
            return bool(where["tie_word_embeddings"])
    return None


def check_untied(adapter: LoraAdapter, aligned: Checkpoint, role: str) -> None:
    """A LoRA on `lm_head` of a model whose LM head is tied to the input embeddings is refused: the head
    has no weight of its own, so a merged full model could not hold the update without changing the
    embeddings too, and the checkpoint has no `lm_head` weight to read V from."""
    heads = [m for m in adapter.lora_modules if module_type(m) == "lm_head"]
    if not heads:
        return
    tied = tie_setting(aligned)
    stored = any(k in aligned for k in candidate_keys(heads[0]))
    if tied or (tied is None and not stored):
        setting = "tie_word_embeddings: true" if tied else "no lm_head weight; transformers ties by default"
        raise InputError(
            f"{heads[0]} is tied to the input embeddings in {aligned.directory} ({setting}) and has no "
            f"weight of its own; the {role} {adapter.directory} has a LoRA on it, which safemerge does not "
            "support (a merge would change the input embeddings too): train the adapter without lm_head "
            "in target_modules"
        )


# --- the checks of one command -------------------------------------------------------------------------
def check_lora_inputs(
    task: LoraAdapter,
    safety: LoraAdapter | None,
    aligned: Checkpoint | None,
    unaligned: tuple[Checkpoint, str] | None,
) -> list[str]:
    """All the checks above for a LoRA scan or merge (`unaligned`: the checkpoint and the name given),
    before any tensor work; returns the warnings (adapters trained for the other role)."""
    if aligned is not None:
        check_untied(task, aligned, "task adapter")
        if safety is not None and safety.fan_in_fan_out == task.fan_in_fan_out:  # else: the merge names it
            check_fits(safety, aligned, "safety adapter")
    elif safety is not None:
        check_same_shapes(task, safety)
    if unaligned is not None:
        ckpt, name = unaligned
        if aligned is not None:
            keys = [k for m in task.lora_modules for k in candidate_keys(m) if k in aligned]
            check_distinct(aligned, ckpt, keys)
        for adapter, role in ((task, "task adapter"), (safety, "safety adapter")):
            if adapter is not None:
                check_not_swapped(adapter, role, (name, ckpt.directory))
    found = [role_warning(task, "task adapter")]
    if safety is not None:
        found.append(role_warning(safety, "safety adapter"))
    return [w for w in found if w]
