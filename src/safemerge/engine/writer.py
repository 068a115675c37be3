"""Streaming writer of full models: every tensor of a checkpoint, edited on the way, as sharded
safetensors with an index, plus the config, generation config and tokenizer files.

Holds at most one output shard in memory; used by `merge --merge-into-base` and the full-model defences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import Progress
from safetensors.torch import save_file

from safemerge.common.errors import InputError
from safemerge.engine.checkpoint import SAFE_INDEX, SAFE_SINGLE, Checkpoint, find_module_weight


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 bytes (decimal units as in transformers; also KiB/MiB/GiB)."""
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise InputError(f"max_shard_size: cannot parse {text!r} (use e.g. 2GB or 500MiB)") from None


# --- writing the full merged model -------------------------------------------------------------------
# Non-weight files copied from the aligned model next to the merged weights.
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def write_model(
    source: Checkpoint,
    edit: Callable[[str, torch.Tensor], torch.Tensor],
    out_dir: Path,
    max_shard_size: str,
    progress: bool = False,
) -> None:
    """Write every tensor of `source`, passed through `edit(name, tensor)`, as sharded safetensors.

    Streams tensor by tensor, holding at most one output shard in memory, with an index when there is
    more than one shard; copies config, generation config and tokenizer files. Refuses NaN/Inf.
    """
    limit = parse_size(max_shard_size)
    out_dir.mkdir(parents=True)
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(out_dir / f"shard-{len(shards)}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    names = sorted(source.keys(), key=lambda k: (str(source.file_of(k)), k))
    with Progress(transient=True, disable=not progress) as bar:
        job = bar.add_task("writing full model", total=len(names))
        for name in names:
            t = edit(name, source.get(name))
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(
                    f"tensor {name!r} of the {source.label} checkpoint {source.directory} has NaN or Inf"
                )
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > limit:
                flush()
            current[name] = t.contiguous()
            size += nbytes
            total += nbytes
            bar.advance(job)
        flush()
    n = len(shards)
    for idx, keys in enumerate(shards):
        final = SAFE_SINGLE if n == 1 else f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        (out_dir / f"shard-{idx}.tmp").rename(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for fname in MODEL_SIDE_FILES:
        src = source.directory / fname
        if src.exists():
            (out_dir / fname).write_bytes(src.read_bytes())


def write_merged_model(
    aligned: Checkpoint,
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    fan_in_fan_out: bool,
    out_dir: Path,
    max_shard_size: str,
    progress: bool = False,
    replace: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write aligned weights + ΔW, with ΔW = scale · B A per module (`deltas`: module → (A, B, scale)).

    `replace` (tensor name → tensor) takes the place of the aligned model's tensor: the adapter's
    modules_to_save. Every tensor keeps the aligned model's dtype; the sum is formed in float32.
    """
    targets = {find_module_weight(aligned, m): m for m in deltas}
    replace = replace or {}

    def add_delta(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in replace:
            t = replace[name].to(t.dtype)
        if name not in targets:
            return t
        a, b, scale = deltas[targets[name]]
        delta = (b @ a) * scale
        return (t.to(torch.float32) + (delta.T if fan_in_fan_out else delta)).to(t.dtype)

    write_model(aligned, add_delta, out_dir, max_shard_size, progress)
