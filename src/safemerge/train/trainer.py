"""LoRA supervised fine-tuning with TRL's SFTTrainer + PEFT, written atomically to one directory.

Output directory: the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), the resolved
config (`train_config.yaml`), the training log (`train_log.jsonl`, one record per logging step) and the
loss curve (`loss_curve.png`).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from safemerge.common.config_io import plain_dump
from safemerge.common.datasets import Example
from safemerge.common.errors import InputError
from safemerge.common.guard import check_no_harmbench
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.common.packaged import resolve_model
from safemerge.engine.lora import LoraAdapter, module_type
from safemerge.engine.rerun import rerun_comment, rerunnable
from safemerge.train.config import ALL_LINEAR, TrainConfig
from safemerge.train.recipes import RECIPES, build_examples, mix_in_safety, user_texts

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Where the adapter went and how training went."""

    out: Path
    n_examples: int
    steps: int
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        return self.losses[0] if self.losses else float("nan")

    @property
    def last_loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")


def prepare_data(cfg: TrainConfig) -> list[Example]:
    """Recipe examples (+ SafeInstr mix), checked against HarmBench."""
    examples = build_examples(cfg.recipe, cfg.samples, cfg.seed)
    examples = mix_in_safety(examples, cfg.mix_safety, cfg.seed)
    if not examples:
        raise InputError(f"recipe {cfg.recipe!r} produced no training examples")
    check_no_harmbench(user_texts(examples), source=f"recipe {cfg.recipe!r}")
    return examples


def resolve_like(cfg: TrainConfig) -> TrainConfig:
    """With `like`, the config with the adapter's target modules (the leaf names of the modules it holds
    factors for, in module order), r and lora_alpha copied in, and `like` cleared (the resolved config
    stands alone) — a safety adapter trained this way has a counterpart for every module of the task
    adapter (docs/engine.md, "Partial merges")."""
    if cfg.like is None:
        return cfg
    adapter = LoraAdapter.load(cfg.like, label="adapter given to --like")
    r, alpha = adapter.config.get("r"), adapter.config.get("lora_alpha")
    if not adapter.lora_modules or not isinstance(r, int) or not isinstance(alpha, int | float):
        raise InputError(
            f"--like {cfg.like}: {adapter.directory} is not a LoRA adapter with modules, r and lora_alpha"
        )
    targets = list(dict.fromkeys(module_type(m) for m in adapter.lora_modules))
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return cfg.model_copy(update={"target_modules": targets, "lora_r": r, "lora_alpha": alpha, "like": None})


def load_model_and_tokenizer(name: str, use_bf16: bool, trust_remote_code: bool) -> tuple[Any, Any]:
    """The base model (float32 on CPU, bf16 when asked) and its tokenizer, with a pad token."""
    from transformers import (  # lazy: transformers adds ~0.7 s to every command's start
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.bfloat16 if use_bf16 else torch.float32, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise InputError(f"cannot load model {name!r}: {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise InputError(f"model {name!r}: its tokenizer has no chat template (needed to format the data)")
    return model, tok


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Loss against step, saved as PNG."""
    import matplotlib  # lazy: matplotlib adds ~0.6 s; only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    """Train a LoRA adapter as configured and write it (with config, log, loss curve) to `cfg.out`;
    `progress`: show the trainer's progress bar."""
    from datasets import Dataset  # lazy, like peft and trl below: training-only, seconds to import
    from peft import LoraConfig
    from trl import SFTTrainer

    inputs = {
        "model": cfg.model,
        "data file": cfg.recipe if Path(cfg.recipe).is_file() else None,
        "adapter it is trained like": cfg.like,
    }
    check_output_dir(cfg.out, cfg.force, inputs)
    like, cfg = cfg.like, resolve_like(cfg)
    examples = prepare_data(cfg)
    use_bf16 = _use_bf16(cfg)
    model_name = resolve_model(cfg.model)
    model, tok = load_model_and_tokenizer(model_name, use_bf16, cfg.trust_remote_code)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules if cfg.target_modules == ALL_LINEAR else list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with atomic_output_dir(cfg.out, cfg.force, inputs, "train") as tmp:
        trainer = SFTTrainer(
            model=model,
            args=_sft_args(cfg, tmp / "_trainer", use_bf16, progress),
            train_dataset=Dataset.from_list(examples),
            processing_class=tok,
            peft_config=lora,
        )
        trainer.train()
        peft_model: Any = trainer.model
        peft_model.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        history = [dict(h) for h in trainer.state.log_history]
        _write_logs(tmp, cfg, model_name, len(examples), history, like)
    losses = [float(h["loss"]) for h in history if "loss" in h]
    return TrainResult(
        out=cfg.out, n_examples=len(examples), steps=int(trainer.state.global_step), losses=losses
    )


def _use_bf16(cfg: TrainConfig) -> bool:
    """bf16 when asked, or by default on a GPU that supports it; never on the CPU."""
    cuda = torch.cuda.is_available()
    use = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    if use and not cuda:
        raise InputError("--bf16 needs a GPU; leave it unset on CPU")
    return use


def _sft_args(cfg: TrainConfig, output_dir: Path, use_bf16: bool, progress: bool = True) -> Any:
    """TRL's SFTConfig: loss on the completion only, no checkpoints, no reporting services."""
    from trl import SFTConfig  # lazy: see train()

    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        warmup_steps=cfg.warmup_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        bf16=use_bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        completion_only_loss=True,
        disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
    )


def train_config_yaml(cfg: TrainConfig) -> str:
    """The resolved config: a local model and a data file absolute, a hub id, the packaged model's alias
    and a built-in recipe as given (engine/rerun.py), the output directory absolute; `force` left out
    (a rerun replaces nothing unless asked)."""
    files = ("model",) if cfg.recipe in RECIPES else ("model", "recipe")
    data = rerunnable(plain_dump(cfg, exclude=("force",)), files)
    header = rerun_comment("safemerge train configuration", "train", "train_config.yaml")
    return header + yaml.safe_dump(data, sort_keys=False)


def _write_logs(
    tmp: Path, cfg: TrainConfig, model_name: str, n: int, history: list[dict[str, Any]], like: str | None
) -> None:
    """train_config.yaml (resolved: it trains the same adapter again, from any working directory),
    train_log.jsonl (one record per logging step), loss_curve.png."""
    copied = f"# target_modules, lora_r, lora_alpha: copied from --like {like}\n" if like else ""
    (tmp / "train_config.yaml").write_text(
        train_config_yaml(cfg) + f"# resolved model path: {model_name}\n# examples: {n}\n" + copied,
        encoding="utf-8",
    )
    with (tmp / "train_log.jsonl").open("w", encoding="utf-8") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    plot_losses(history, tmp / "loss_curve.png")
