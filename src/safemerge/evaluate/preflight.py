"""Pre-flight of the vLLM backend: what vLLM would refuse, or get silently wrong, checked on the CPU
before an engine starts (an engine start takes minutes, and vLLM reports a bad LoRA only when it is
first used, after the base model's generations).

- the context length (`max_model_len`): the longest rendered prompt + the new tokens, rounded up to a
  multiple of 256, instead of vLLM's default, the model's whole context (131,072 tokens for Llama-3.1-8B
  and Llama-Guard-3-8B: ~16 GiB of KV cache for one sequence, which does not fit beside the weights);
- the dtype: `auto` resolved the way vLLM resolves it, and then passed to the engine explicitly, so the
  generation cache is keyed by the dtype the engine really runs in;
- every adapter: a PEFT LoRA directory whose tensors sit on the model's projections with the shapes of
  its config.json, without `modules_to_save` or DoRA, with a rank vLLM supports;
- adapters whose modules have different scalings (`rank_pattern`, `alpha_pattern`, rsLoRA): vLLM applies
  one scaling, lora_alpha / r, to every module (vllm/lora/peft_helper.py reads only r, lora_alpha and
  use_rslora), so such an adapter is copied into a temporary directory with each module's scaling folded
  into B and A / B zero-padded to one rank; the input is never modified.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download

from safemerge.common.errors import InputError
from safemerge.common.packaged import resolve_model
from safemerge.engine.lora import LoraAdapter, layer_index, lora_tensor_shapes, module_type, write_adapter

# The max_lora_rank values vLLM accepts (vllm/config/lora.py: `MaxLoRARanks`; before, LoRAConfig's
# `possible_max_ranks`), by the first release from which each set is known to be accepted. The bounds are
# conservative (the release where we verified the set, not necessarily the first that had it): an older
# release is given a smaller set, so a rank it would refuse is never passed to it. 1 was added after
# 0.11.0 (vllm-project/vllm#26461); 128 and 256 came with the Triton LoRA kernels (vllm#5036).
VLLM_LORA_RANK_TABLE: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("0", (8, 16, 32, 64)),
    ("0.6.0", (8, 16, 32, 64, 128, 256)),
    ("0.8.0", (8, 16, 32, 64, 128, 256, 320, 512)),
    ("0.12.0", (1, 8, 16, 32, 64, 128, 256, 320, 512)),
)
VLLM_LORA_RANKS = VLLM_LORA_RANK_TABLE[-1][1]  # the newest set
# For a vLLM whose version cannot be read or parsed: the set every release accepts.
CONSERVATIVE_LORA_RANKS = VLLM_LORA_RANK_TABLE[0][1]
MODEL_LEN_MULTIPLE = 256
NO_LIMIT_SENTINEL = 10**29  # transformers' VERY_LARGE_INTEGER is int(1e30): a tokenizer without a limit
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_DTYPE_NAMES = {"half": "float16", "float": "float32", "fp16": "float16", "bf16": "bfloat16"}
# config.json keys vLLM reads the context length from (it takes the smallest one present).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
MODULES_TO_SAVE_HINT = (
    "vLLM cannot load adapters with modules_to_save (fully trained layers next to the LoRA factors): "
    "merge the adapter into the model (`safemerge defend ... --merge-into-base`) and evaluate the full "
    "model, or evaluate with `--backend transformers`"
)


# --- the model's config.json -------------------------------------------------------------------------


def model_config(model: str) -> dict[str, Any]:
    """config.json of a local model directory, the packaged model, or a hub id (config.json only)."""
    path = Path(resolve_model(model)).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise InputError(f"model {model}: no config.json in {path}")
    else:
        try:
            file = Path(hf_hub_download(str(model), "config.json"))
        except Exception as exc:  # offline cache miss, gated, no such repo: the user's input
            raise InputError(
                f"model {model}: cannot read its config.json (hub or local cache): {exc}"
            ) from exc
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: invalid JSON ({exc})") from exc
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k in _CONTEXT_KEYS}}
    return dict(cfg)


def projection_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA-able projection of a Llama / Qwen2 / Mistral-style block, from
    config.json; empty when the config does not describe such a block."""
    try:
        h, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        inter = int(cfg["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return {}
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or h // nh)
    q, kv = nh * hd, nkv * hd
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "qkv_proj": (h, q + 2 * kv),  # fused (Phi-3 style)
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
        "gate_up_proj": (h, 2 * inter),  # fused (Phi-3 style)
    }


def kv_bytes_per_token(cfg: dict[str, Any], dtype: str) -> int | None:
    """KV cache bytes per token: 2 (K and V) · layers · kv heads · head dim · dtype bytes."""
    try:
        h, nh, layers = (
            int(cfg["hidden_size"]),
            int(cfg["num_attention_heads"]),
            int(cfg["num_hidden_layers"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    nkv = int(cfg.get("num_key_value_heads") or nh)
    hd = int(cfg.get("head_dim") or h // nh)
    return 2 * layers * nkv * hd * DTYPE_BYTES.get(dtype, 2)


# --- max_model_len -----------------------------------------------------------------------------------


def context_limit(cfg: dict[str, Any], tokenizer: Any = None) -> int | None:
    """The model's context length as vLLM derives it (vllm/config/model.py, `_get_and_verify_max_len`):
    the smallest of the config's length keys and of the tokenizer's `model_max_length`; None when
    unknown or when a RoPE scaling other than Llama 3's lets vLLM stretch it (vLLM decides then).
    transformers' "no limit" sentinel (`VERY_LARGE_INTEGER`, ~1e30), written when tokenizer_config.json
    has no model_max_length, is not a limit."""
    rope = cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in (None, "default", "llama3", "mrope"):
        return None
    values = [int(cfg[k]) for k in _CONTEXT_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    tok_max = tokenizer_max_length(tokenizer)
    if tok_max is not None:
        values.append(tok_max)
    return min(values) if values else None


def tokenizer_max_length(tokenizer: Any) -> int | None:
    """The tokenizer's `model_max_length` when it is a real limit: a positive int below 1e29 (above that it
    is transformers' sentinel for "not set")."""
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= NO_LIMIT_SENTINEL:
        return None
    return value


def choose_max_model_len(
    longest_prompt: int, max_new_tokens: int, limit: int | None, given: int | None, label: str
) -> int:
    """`given`, checked; else the longest prompt + the new tokens rounded up to a multiple of 256 (at most
    the model's context length). Every prompt of the run must fit with its new tokens: vLLM refuses a
    longer prompt and silently cuts the answer of a prompt whose new tokens do not fit."""
    need = longest_prompt + max_new_tokens
    if given is not None:
        if given <= 0:
            raise InputError(f"{label}: max_model_len must be positive, got {given}")
        if limit is not None and given > limit:
            raise InputError(
                f"{label}: max_model_len {given} exceeds the model's context length {limit} "
                "(the smaller of max_position_embeddings in config.json and the tokenizer's "
                "model_max_length)"
            )
        if given < need:
            raise InputError(
                f"{label}: max_model_len {given} is too short: the longest prompt has {longest_prompt} "
                f"tokens, + {max_new_tokens} new tokens = {need}"
            )
        return given
    if limit is not None and need > limit:
        raise InputError(
            f"{label}: the longest prompt ({longest_prompt} tokens) + {max_new_tokens} new tokens = {need} "
            f"exceeds the model's context length {limit}; lower --max-new-tokens or drop the longest prompts"
        )
    chosen = MODEL_LEN_MULTIPLE * math.ceil(max(need, 1) / MODEL_LEN_MULTIPLE)
    return min(chosen, limit) if limit is not None else chosen


# --- dtype -------------------------------------------------------------------------------------------


def config_dtype(cfg: dict[str, Any]) -> str:
    """The checkpoint's dtype from config.json (`torch_dtype`, or `dtype` in newer transformers); float32
    when absent, as vLLM assumes after finding no dtype in the config."""
    value = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
    return _DTYPE_NAMES.get(value, value)


def resolve_vllm_dtype(requested: str, cfg: dict[str, Any], capability: tuple[int, int] | None) -> str:
    """The dtype a vLLM engine runs in. `auto` follows vLLM's rule (vllm/config/model.py,
    `_resolve_auto_dtype`): the config's dtype, except that float32 checkpoints are downcast to the
    platform's preferred half type — bfloat16 on GPUs of compute capability ≥ 8.0 (Ampere, Hopper), float16
    on older ones — and bfloat16 checkpoints run in float16 where bf16 is not supported. `capability` None
    (no GPU visible) counts as ≥ 8.0. The result is passed to the engine explicitly."""
    if requested != "auto":
        return _DTYPE_NAMES.get(requested, requested)
    bf16 = capability is None or tuple(capability) >= (8, 0)
    preferred = "bfloat16" if bf16 else "float16"
    dtype = config_dtype(cfg)
    if dtype == "float32" or (dtype == "bfloat16" and not bf16):
        return preferred
    return dtype


# --- adapters ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineAdapter:
    """One adapter as the engine gets it: `source` as given (it keys variants and the cache), `path` what
    vLLM loads (the source itself, or its normalised copy), `rank` the one rank of every module there."""

    source: str
    path: str
    rank: int
    normalised: bool


def _fit_problems(
    weights: Path, shapes: dict[str, tuple[int, int]], n_layers: int | None, model: str
) -> list[str]:
    """Each LoRA tensor that does not sit on a projection of the model's config with its shape."""
    problems = []
    for key, module, which, shape in lora_tensor_shapes(weights):
        leaf, layer = module_type(module), layer_index(module)
        if leaf not in shapes:
            problems.append(f"{key}: vLLM applies LoRA to {', '.join(shapes)}; {leaf!r} is not one of them")
        elif layer is None or (n_layers is not None and layer >= n_layers):
            problems.append(f"{key}: layer {layer}, but {model} has {n_layers} layers")
        elif which == "A" and shape[1] != shapes[leaf][0]:
            problems.append(f"{key}: {shape[1]} input features, {leaf} of {model} has {shapes[leaf][0]}")
        elif which == "B" and shape[0] != shapes[leaf][1]:
            problems.append(f"{key}: {shape[0]} output features, {leaf} of {model} has {shapes[leaf][1]}")
    return problems


def check_adapter(
    adapter: str, model: str, cfg: dict[str, Any], ranks: Sequence[int] | None = None
) -> LoraAdapter:
    """Everything vLLM would refuse about one adapter, as one InputError naming the adapter (and the
    tensor), before any engine starts. `ranks`: the max_lora_rank values the installed vLLM accepts
    (default: `vllm_lora_ranks()`)."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(f"adapter {adapter}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"adapter {adapter}: adapter_config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InputError(f"adapter {adapter}: adapter_config.json is not a JSON object")
    if config.get("modules_to_save"):
        raise InputError(
            f"adapter {adapter} has modules_to_save {config['modules_to_save']}: {MODULES_TO_SAVE_HINT}"
        )
    with warnings.catch_warnings():  # its warning about non-LoRA tensors becomes the error below
        warnings.simplefilter("ignore")
        # refuses (naming the adapter) a missing or pickle-only weights file, DoRA, lora_bias, LoRA on
        # embeddings, modules without both factors
        lora = LoraAdapter.load(adapter, label=f"adapter {adapter}")
    if lora.extra_keys:
        raise InputError(
            f"adapter {adapter} carries non-LoRA tensors ({', '.join(lora.extra_keys[:3])}): "
            f"modules_to_save or trained biases. {MODULES_TO_SAVE_HINT}"
        )
    shapes = projection_shapes(cfg)
    if not shapes:
        raise InputError(
            f"adapter {adapter}: the vLLM pre-flight checks adapters against Llama / Qwen2 / Mistral-style "
            f"models (hidden_size, num_attention_heads, intermediate_size in config.json); {model} "
            f"(model_type {cfg.get('model_type')!r}) is not one: evaluate with `--backend transformers`"
        )
    n_layers = cfg.get("num_hidden_layers")
    problems = _fit_problems(
        lora.weights_file, shapes, n_layers if isinstance(n_layers, int) else None, model
    )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(
            f"adapter {adapter} does not fit {model} for vLLM: " + "; ".join(problems[:3]) + more
        )
    rank = max(lora.rank(m) for m in lora.lora_modules)
    supported_lora_rank(rank, vllm_lora_ranks() if ranks is None else ranks, f"adapter {adapter}")
    for m in lora.lora_modules:  # a rank that contradicts the config (r / rank_pattern) is refused here
        lora.scaling(m)
    return lora


def needs_normalising(lora: LoraAdapter) -> bool:
    """True when vLLM's one scaling lora_alpha / r (or / √r with rsLoRA) would not be every module's:
    per-module ranks or alphas (rank_pattern / alpha_pattern), modules whose rank is not r, or rsLoRA
    (normalised too, so that no vLLM version's handling of use_rslora matters)."""
    cfg = lora.config
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        return True
    return any(lora.rank(m) != int(cfg.get("r", 8)) for m in lora.lora_modules)


def normalise_adapter(lora: LoraAdapter, out: Path) -> int:
    """Write a copy of `lora` into `out` that vLLM reads right: one rank R (the largest; A and B
    zero-padded), lora_alpha = R so vLLM's scaling s_out = 1, and each module's scaling folded into B:
    B' = (s_module / s_out) · B. ΔW = s_out · B' A' = s_module · B A for every module. Returns R."""
    rank = max(lora.rank(m) for m in lora.lora_modules)
    dtype = lora.storage_dtype()
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in lora.lora_modules:
        f = lora.factors(m)  # float32, with this module's scaling
        a = torch.zeros(rank, f.A.shape[1], dtype=torch.float32)
        b = torch.zeros(f.B.shape[0], rank, dtype=torch.float32)
        a[: f.rank] = f.A
        b[:, : f.rank] = f.B * f.scaling  # s_out = lora_alpha / r = 1
        factors[m] = (a.to(dtype), b.to(dtype))
    out.mkdir(parents=True, exist_ok=True)
    base = str(lora.config.get("base_model_name_or_path") or "")
    write_adapter(out, lora.config, factors, rank, rank, base)
    return rank


def prepare_adapters(
    adapters: Sequence[str],
    model: str,
    cfg: dict[str, Any],
    workdir: Path,
    ranks: Sequence[int] | None = None,
) -> list[EngineAdapter]:
    """Check every adapter first (nothing is written when one is refused), then normalise those that
    need it into `workdir`."""
    loras = [check_adapter(a, model, cfg, ranks) for a in adapters]
    out = []
    for i, (a, lora) in enumerate(zip(adapters, loras, strict=True)):
        if needs_normalising(lora):
            target = workdir / f"adapter{i}"
            rank = normalise_adapter(lora, target)
            out.append(EngineAdapter(a, str(target), rank, True))
        else:
            out.append(
                EngineAdapter(a, str(Path(a).resolve()), max(lora.rank(m) for m in lora.lora_modules), False)
            )
    return out


# --- max_lora_rank -----------------------------------------------------------------------------------


def installed_vllm_version() -> str | None:
    """The installed vLLM's version from its package metadata (vLLM is not imported), None without one."""
    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a version string ("0.11.1.dev12+gabc" → (0, 11, 1)); None when it has no
    leading number."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(x) for x in match.group(1).split(".")) if match else None


def vllm_lora_ranks(version: str | None = None) -> tuple[int, ...]:
    """The max_lora_rank values vLLM `version` accepts (default: the installed vLLM's), from
    `VLLM_LORA_RANK_TABLE`; the set every release accepts when the version is unknown or unparseable.
    Only the release numbers count ("0.12.0rc1" and "0.12.0.dev3" are 0.12.0)."""
    version = installed_vllm_version() if version is None else version
    release = _release(version) if version else None
    if release is None:
        return CONSERVATIVE_LORA_RANKS
    chosen = CONSERVATIVE_LORA_RANKS
    for first, ranks in VLLM_LORA_RANK_TABLE:
        bound = _release(first)
        assert bound is not None
        if release >= bound:
            chosen = ranks
    return chosen


def supported_lora_rank(rank: int, ranks: Sequence[int] | None = None, label: str = "LoRA") -> int:
    """The smallest max_lora_rank in `ranks` (default: those of the installed vLLM) that holds `rank`:
    vLLM accepts only those values, so a rank in between is rounded up (its adapters are zero-padded by
    vLLM). InputError naming `label` when `rank` exceeds them all."""
    ranks = sorted(vllm_lora_ranks() if ranks is None else ranks)
    fitting = [r for r in ranks if r >= rank]
    if not fitting:
        version = installed_vllm_version() or "of unknown version"
        raise InputError(
            f"{label}: LoRA rank {rank} exceeds the largest max_lora_rank vLLM {version} accepts "
            f"({ranks[-1]}; accepted: {', '.join(map(str, ranks))}): evaluate with `--backend "
            "transformers`, or a newer vLLM"
        )
    return fitting[0]
