"""The `safemerge train` command (a thin wrapper over `safemerge.train.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.common import (
    ConfigArg,
    ConfigOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    config_file,
    console,
    given_options,
    load_cli_config,
    run_guarded,
)
from safemerge.train.config import TrainConfig
from safemerge.train.trainer import train

_LIST = "comma-separated"


def train_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Recipe: gsm8k, pubmedqa, safety, safety-hub, arithmetic, or a path to a .jsonl/.csv "
            "file. Required."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory for the adapter and logs. Required."),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            help="Training examples. Default gsm8k all, pubmedqa 2000, safety 1000, arithmetic 2000."
        ),
    ] = None,
    mix_safety: Annotated[
        int | None, typer.Option(help="SafeInstr: offline safety examples mixed into the data. Default 0.")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after N steps; -1: use --epochs. Default -1.")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="Training epochs. Default 1.")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Learning rate. Default 2e-4.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-device batch size. Default 4.")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Gradient accumulation steps. Default 1.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Max tokens per example. Default 512.")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank. Default 8.")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha. Default 16.")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout. Default 0.")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(
            help=f"{_LIST} LoRA target modules, or all-linear (PEFT: every linear layer but the output "
            "layer). Default q_proj,v_proj."
        ),
    ] = None,
    like: Annotated[
        str | None,
        typer.Option(
            help="Copy target modules, --lora-r and --lora-alpha from this LoRA adapter (e.g. train the "
            "safety adapter like the task adapter, so SafeMERGE can merge every module); not with "
            "--target-modules/--lora-r/--lora-alpha. Default none."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed for data and training. Default 42.")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help="Trade compute for memory. Default off.")
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option(help="bf16 training. Default on for a GPU that supports it, off on CPU.")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    force: Annotated[
        bool | None,
        typer.Option(help="Replace an earlier safemerge output at --out, never other files. Default off."),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or closing summary. Default off.")
    ] = False,
) -> None:
    """Fine-tune a LoRA adapter (task or safety) with the model's chat template, loss on responses only."""

    def body() -> None:
        options = given_options(ctx, "quiet")
        cfg = load_cli_config(ctx, TrainConfig, config_file(config_pos, config), options)
        result = train(cfg, progress=not quiet)
        if not quiet:
            console.print(
                f"adapter written to {result.out} ({result.n_examples} examples, {result.steps} steps, "
                f"loss {result.first_loss:.4f} -> {result.last_loss:.4f})"
            )

    run_guarded(body, quiet)
