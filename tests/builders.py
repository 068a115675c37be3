"""Builders of tiny random models and PEFT adapters in temporary directories (shared by tests)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def tiny_model(arch: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A tiny random causal LM (float32)."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = Qwen2Config(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )  # fmt: skip
        return Qwen2ForCausalLM(cfg)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def save_pair(
    root: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    shard: str | None = None,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Save an 'unaligned' model and an 'aligned' one (= unaligned + a perturbation); return their dirs."""
    un = tiny_model(arch, seed)
    al = tiny_model(arch, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in al.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": shard} if shard else {}
    dirs = []
    for name, model in (("unaligned", un), ("aligned", al)):
        d = root / f"{arch}-{name}"
        model.to(dtype).save_pretrained(d, **kwargs)
        dirs.append(d)
    return dirs[1], dirs[0]


def save_adapter(
    base_dir: Path,
    out: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    arch: str = "llama",
    **lora_kwargs: object,
) -> Path:
    """A PEFT LoRA adapter on `base_dir` with random non-zero A and B (as if trained)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets or TARGETS[arch], lora_dropout=0.0, **lora_kwargs
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def pair_with_adapters(
    root: Path, task_targets: list[str] | None = None, safety_targets: list[str] | None = None
) -> dict[str, Path]:
    """The tiny Llama pair of `save_pair` (float32) and a task (seed 1) and a safety (seed 2) LoRA on its
    aligned model, by role: the inputs of most command-line tests."""
    al, un = save_pair(root, "llama", torch.float32)
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, targets=task_targets),
        "safety": save_adapter(al, root / "safety", seed=2, targets=safety_targets),
    }


def merge_args(env: Mapping[str, Path], out: Path, **over: object) -> list[str]:
    """`safemerge merge` of `env`'s four inputs (`pair_with_adapters`) into `out`, any of them replaced
    by keyword (`task=other_dir`), without the plot."""
    paths = {k: str(env[k]) for k in ("aligned", "unaligned", "task", "safety")}
    paths.update({k: str(v) for k, v in over.items()})
    return [
        "merge", "--aligned", paths["aligned"], "--unaligned", paths["unaligned"],
        "--task-adapter", paths["task"], "--safety-adapter", paths["safety"], "--out", str(out), "--no-plot",
    ]  # fmt: skip


def adapter_config(path: Path) -> dict[str, object]:
    return dict(json.loads((path / "adapter_config.json").read_text()))


def tiny_chat_setup(root: Path) -> dict[str, Path]:
    """A tiny chat model pair (unaligned seed 0, aligned seed 1, with a tokenizer and chat template) and a
    task and a safety adapter on the aligned one: the inputs of the end-to-end experiment tests."""
    from tinymodel import build_tiny_model

    un = build_tiny_model(root / "unaligned", seed=0)
    al = build_tiny_model(root / "aligned", seed=1)
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "safety": save_adapter(al, root / "safety", seed=2, r=4, alpha=8),
    }


def pickle_copy(src: Path, dst: Path) -> Path:
    """A copy of a single-file safetensors checkpoint (config.json + model.safetensors) saved as the
    pickle `pytorch_model.bin`, for the `--allow-pickle` paths."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def edited_copy(
    src: Path,
    dst: Path,
    fn: Callable[[dict[str, torch.Tensor]], object],
    weights: str = "model.safetensors",
) -> Path:
    """A copy of a checkpoint or adapter directory whose single weights file has its tensors edited in
    place by `fn` (never the original: inputs are not written)."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / weights)
    fn(tensors)
    save_file(tensors, dst / weights, metadata={"format": "pt"})
    return dst


def record_hub_downloads(monkeypatch: pytest.MonkeyPatch, local: Mapping[str, Path]) -> list[list[str]]:
    """Replace `snapshot_download` by a recorder: hub id `org/NAME` is served from `local[NAME]`; returns
    the list that collects each call's `allow_patterns`."""
    from safemerge.engine import checkpoint

    asked: list[list[str]] = []

    def fake_download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        asked.append(allow_patterns)
        return str(local[repo_id.removeprefix("org/")])

    monkeypatch.setattr(checkpoint, "snapshot_download", fake_download)
    return asked


def one_tensor_apart(src: Path, dst: Path, key: str, by: float = 0.05) -> Path:
    """A copy of a checkpoint (single file or shards) with `by` added to tensor `key` only: as an
    'unaligned' model beside `src`, V = 0 on every module but that one (V = 0 everywhere is refused)."""
    index = src / "model.safetensors.index.json"
    weights = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
    return edited_copy(src, dst, lambda t: t[key].add_(by), weights)
