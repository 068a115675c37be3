"""PEFT LoRA adapters: reading their config and factors per module, and writing merged adapters.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (A, r × d_in) and `...lora_B.weight` (B, d_out × r).
The module's update is ΔW = s · B A in `nn.Linear` layout (d_out × d_in), s = alpha / r, or alpha / √r
with rsLoRA, with `rank_pattern` / `alpha_pattern` overriding r / alpha per module.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.engine.checkpoint import _read_safetensors_header, resolve_local_dir
from safemerge.engine.hub import split_revision

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters",
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_B.bias": "LoRA with lora_bias",
    "trainable_tokens_delta": "trainable tokens (trainable_token_indices)",  # PEFT 0.21's key
}
# init_lora_weights values after which the adapter's update is not s·B·A on the base it names: PEFT
# (0.21, tuners/lora/layer.py `update_layer`) rewrites the base weight when it loads them — PiSSA,
# OLoRA, CorDA subtract s·B0·A0, LoftQ quantises — and LoRA-GA subtracted s·B0·A0 at training time
# (on load PEFT leaves the base alone, so the trained model is not reproduced either). Matched as
# lower-case prefixes: PiSSA is also `pissa_niter_<n>`.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# values that only choose the initial A and B (PEFT's default True, False or null, and the inits that
# leave the base weight alone); the loaded update is s·B·A
_PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal", "mica")


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA factors: ΔW = scaling · B @ A (Linear layout)."""

    A: torch.Tensor  # r × d_in
    B: torch.Tensor  # d_out × r
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ΔW = s · B A in `dtype` (d_out × d_in)."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling


def natural_key(name: str) -> list[Any]:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layer_index(module: str) -> int | None:
    """The transformer block index of a module path, if any (`model.layers.3.self_attn.q_proj` → 3)."""
    m = re.search(r"\.(?:layers|h|layer|blocks|block)\.(\d+)\.", f".{module}.")
    return int(m.group(1)) if m else None


def module_type(module: str) -> str:
    """The module's leaf name (`q_proj`, `c_attn`, ...), used to group modules in reports."""
    return module.rsplit(".", 1)[-1]


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter on disk; factors are read lazily per module."""

    directory: Path
    config: dict[str, Any]
    weights_file: Path
    lora_modules: list[str]  # module paths in natural order
    extra_keys: list[str]  # non-LoRA tensors (modules_to_save, ...): carried through unchanged
    label: str = "adapter"
    revision: str | None = None
    _ranks: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what `load` warned about, for the report

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path, label: str = "adapter") -> LoraAdapter:
        """Open an adapter directory (or hub id): its config and safetensors header, no tensors."""
        directory, revision = resolve_local_dir(name_or_path)
        config = _read_config(directory, label)
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            if (directory / "adapter_model.bin").exists():
                raise InputError(
                    f"{directory} has only adapter_model.bin (pickle, can execute code when loaded); "
                    "convert it to adapter_model.safetensors"
                )
            raise InputError(f"{directory}: {WEIGHTS_NAME} is missing — {label}")
        ranks, extra = _scan_header(weights, label)
        notes = []
        if extra:
            notes.append(
                f"{label} {directory} carries non-LoRA tensors (modules_to_save): "
                f"{', '.join(extra)}; they are copied unchanged"
            )
            warnings.warn(notes[-1], SafemergeWarning, stacklevel=2)
        return cls(
            directory=directory,
            config=config,
            weights_file=weights,
            lora_modules=sorted(ranks, key=natural_key),
            extra_keys=extra,
            label=label,
            revision=revision,
            _ranks=ranks,
            warnings=notes,
        )

    # --- per-module facts ---------------------------------------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def rank(self, module: str) -> int:
        return self._ranks[module]

    def scaling(self, module: str) -> float:
        """s = alpha / r (or alpha / √r with rsLoRA), honouring rank_pattern / alpha_pattern."""
        cfg = self.config
        r_pat, a_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        if r_pat or a_pat:  # PEFT's own matching rule (imported lazily: peft is slow to import)
            from peft.utils.other import get_pattern_key  # lazy: peft adds ~2.4 s to every command's start

            r = r_pat.get(get_pattern_key(list(r_pat), module), r)
            alpha = a_pat.get(get_pattern_key(list(a_pat), module), alpha)
        if r != self._ranks[module]:
            raise InputError(
                f"{self.weights_file}: module {module} has rank {self._ranks[module]} but the config says {r}"
            )
        return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)

    def factors(self, module: str) -> LoraFactors:
        """Read one module's factors (float32), refusing NaN/Inf."""
        if module not in self._ranks:
            raise InputError(f"module {module!r} is not in the {self.label} {self.directory}")
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as fh:
            a = fh.get_tensor(_find_key(fh, module, "A")).to(torch.float32)
            b = fh.get_tensor(_find_key(fh, module, "B")).to(torch.float32)
        if a.shape[0] != b.shape[1]:
            raise InputError(
                f"{self.weights_file}: {module} lora_A {tuple(a.shape)} vs lora_B {tuple(b.shape)}"
            )
        for which, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"{self.weights_file}: {module}.{which} has NaN or Inf")
        return LoraFactors(A=a, B=b, scaling=self.scaling(module))

    def storage_dtype(self) -> torch.dtype:
        """The dtype the factors are stored in."""
        header = _read_safetensors_header(self.weights_file)
        names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        for key, info in header.items():
            if key != "__metadata__" and "lora_" in key:
                return names.get(info["dtype"], torch.float32)
        return torch.float32

    def output_dtype(self) -> torch.dtype:
        """The dtype of the factors of an adapter written from this one: float64 stays, anything else is
        float32. Merged factors of a half-precision adapter rounded back to bfloat16 would err by ~1e-3 of
        ‖ΔW‖; float32 holds them (and any half-precision factor exactly), and PEFT loads float32 factors
        onto a half-precision model as it loads any adapter (docs/engine.md, "Output rank and scaling")."""
        return torch.float64 if self.storage_dtype() == torch.float64 else torch.float32

    def read_extra(self) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors (modules_to_save, ...), unchanged."""
        with safe_open(str(self.weights_file), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in self.extra_keys}

    def extra_for_base(self, base_keys: Collection[str]) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors by the base model's tensor name, for writing a full model: a
        modules_to_save tensor (e.g. a trained `lm_head`) replaces the base model's copy, as PEFT's
        merge does. InputError naming the tensor when the base model has no tensor of that name."""
        out = {}
        for key, t in self.read_extra().items():
            name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            # modules_to_save copies, and base layers PEFT saves beside a LoRA on them (embeddings)
            name = name.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
            if name not in base_keys:
                raise InputError(f"{self.directory}: tensor {key!r} ({name}) is not in the base model")
            out[name] = t
        return out


def _read_config(directory: Path, label: str) -> dict[str, Any]:
    """adapter_config.json, checked for what this tool supports."""
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.exists():
        raise InputError(f"{directory}: not a PEFT adapter directory ({CONFIG_NAME} missing) — {label}")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path}: invalid JSON ({exc})") from exc
    check_config(config, cfg_path)
    return config


def _scan_header(weights: Path, label: str) -> tuple[dict[str, int], list[str]]:
    """({module: rank}, non-LoRA keys) from the safetensors header; unsupported tensors are errors."""
    modules: dict[str, set[str]] = {}
    extra: list[str] = []
    ranks: dict[str, int] = {}
    for key, info in _read_safetensors_header(weights).items():
        if key == "__metadata__":
            continue
        for marker, what in _UNSUPPORTED_KEYS.items():
            if marker in key:
                raise InputError(f"{weights}: tensor {key!r} — {what} are not supported")
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(name)
        if m is None:
            if "lora_" in name:
                raise InputError(f"{weights}: unsupported LoRA tensor {key!r}")
            extra.append(key)
            continue
        if len(info["shape"]) != 2:
            raise InputError(
                f"{weights}: {key!r} has shape {info['shape']}; only Linear/Conv1D LoRA is supported"
            )
        modules.setdefault(m["module"], set()).add(m["which"])
        if m["which"] == "A":
            ranks[m["module"]] = int(info["shape"][0])
    incomplete = [mod for mod, which in modules.items() if which != {"A", "B"}]
    if incomplete:
        raise InputError(f"{weights}: modules without both lora_A and lora_B: {', '.join(incomplete[:5])}")
    if not modules:
        raise InputError(f"{weights}: no LoRA tensors found — {label}")
    return ranks, extra


def lora_tensor_shapes(weights: Path) -> Iterator[tuple[str, str, str, tuple[int, ...]]]:
    """(key, module path, "A" or "B", shape) of every lora_A / lora_B tensor of an adapter's safetensors
    file, from its header alone (no tensor is read): what shape checks against a base model need."""
    for key, info in _read_safetensors_header(weights).items():
        if key == "__metadata__" or (".lora_A." not in key and ".lora_B." not in key):
            continue
        module = key.removeprefix(PREFIX).split(".lora_")[0]
        yield key, module, "A" if ".lora_A." in key else "B", tuple(int(x) for x in info["shape"])


def _find_key(fh: Any, module: str, which: str) -> str:
    for key in (f"{PREFIX}{module}.lora_{which}.weight", f"{module}.lora_{which}.weight"):
        if key in fh.keys():  # noqa: SIM118 (safe_open handles have keys(), no __contains__)
            return key
    raise InputError(f"lora_{which} of {module} not found")


def check_config(config: dict[str, Any], path: Path | str) -> None:
    """Refuse an adapter config safemerge cannot treat as ΔW = s·B·A per Linear module (another PEFT
    type, DoRA, lora_bias, layer replication, trainable tokens, an init that rewrites the base weights),
    naming `path` (the config file, or an adapter of a PeftModel in memory)."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type} is not supported (only LORA adapters)")
    if config.get("use_dora"):
        raise InputError(f"{path}: DoRA adapters (use_dora: true) are not supported")
    if config.get("lora_bias"):
        raise InputError(f"{path}: adapters with lora_bias are not supported")
    if config.get("layer_replication"):
        raise InputError(f"{path}: layer_replication is not supported")
    if config.get("trainable_token_indices"):
        raise InputError(f"{path}: trainable tokens (trainable_token_indices) are not supported")
    _check_init(config.get("init_lora_weights", True), path)


def _check_init(init: Any, path: Path | str) -> None:
    """Refuse an `init_lora_weights` after which the saved factors are not the update to the base model:
    the merge would use s·B·A while PEFT loads something else (docs/engine.md, "Adapters and settings
    that are refused")."""
    name = init.lower() if isinstance(init, str) else init
    if isinstance(name, str) and name.startswith("loftq"):
        raise InputError(
            f"{path}: init_lora_weights {init!r} — PEFT replaces the base weights by their quantised "
            "approximation when it loads a LoftQ adapter, so its update to the base model is not s·B·A; "
            "LoftQ adapters cannot be merged"
        )
    if isinstance(name, str) and name.startswith(_BASE_REWRITING_INITS):
        raise InputError(
            f"{path}: init_lora_weights {init!r} — PEFT subtracts the initial s·B0·A0 from the base weights "
            "for this initialisation (when it loads the adapter, or for LoRA-GA when it was trained), so "
            "the adapter's update to the base model is not s·B·A; save it as a plain LoRA with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before "
            "training, with init_lora_weights=True>)"
        )
    if not any(name is v or name == v for v in _PLAIN_INITS):
        raise InputError(
            f"{path}: init_lora_weights {init!r} is unknown to safemerge (known: true, false, gaussian, "
            "eva, orthogonal, mica); PEFT may change the base weights when it loads such an adapter"
        )


# settings of an initialisation, with PEFT's defaults: a merged adapter (init_lora_weights True) does
# not use them, and PEFT warns that they are ignored when it loads one that carries them
_INIT_SETTINGS: dict[str, Any] = {
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
}


def adapter_key(module: str, which: str) -> str:
    return f"{PREFIX}{module}.lora_{which}.weight"


def merged_adapter_settings(base_config: Mapping[str, Any], rank: int, lora_alpha: float) -> dict[str, Any]:
    """The settings of a merged adapter that replace those of the task adapter's config it copies: one
    rank and alpha for every module (no rsLoRA, no patterns), no dropout, inference mode, PEFT's default
    init, and the settings of data-driven inits reset to PEFT's defaults. Written to disk by
    `write_adapter`, and given to PEFT's `add_adapter` by `safemerge.peft`."""
    settings = {k: v for k, v in _INIT_SETTINGS.items() if k in base_config}
    settings.update(
        r=rank,
        lora_alpha=lora_alpha,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        lora_dropout=0.0,
        inference_mode=True,
        init_lora_weights=True,
    )
    return settings


def write_adapter(
    directory: Path,
    base_config: dict[str, Any],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    lora_alpha: float,
    base_model: str | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a PEFT adapter (config + safetensors) whose modules all share `rank` and `lora_alpha`.
    `base_model` None (no base known) is written as null, PEFT's own default; a pinned hub id
    (`owner/name@rev`) as PEFT spells it, `base_model_name_or_path` and `revision`. `init_lora_weights`
    is PEFT's default True: a value that rewrites the base weight on load would make PEFT change the
    base under the merged factors, and the settings of data-driven inits (eva, ...) no longer apply."""
    config = dict(base_config)
    if base_model is not None:
        base_model, revision = split_revision(base_model)
        if revision:
            config["revision"] = revision
    config.update(merged_adapter_settings(config, rank, lora_alpha), base_model_name_or_path=base_model)
    tensors: dict[str, torch.Tensor] = {}
    for module in sorted(factors, key=natural_key):
        a, b = factors[module]
        tensors[adapter_key(module, "A")] = a.contiguous()
        tensors[adapter_key(module, "B")] = b.contiguous()
    tensors.update(extra or {})
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
