"""The `safemerge train` command (a thin wrapper over `safemerge.train.train`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.common import ModelOpt, TrustRemoteCodeOpt, console, given_options, run_guarded
from safemerge.common.config_io import load_config
from safemerge.train.config import TrainConfig
from safemerge.train.trainer import train

_LIST = "comma-separated"


def train_command(
    ctx: typer.Context,
    config_pos: Annotated[
        Path | None, typer.Argument(help="YAML config whose keys mirror the options (default: none)")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML config (default: none)")] = None,
    model: ModelOpt = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="gsm8k | pubmedqa | safety | safety-hub | arithmetic | path to .jsonl/.csv. Required."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output directory for the adapter and logs. Required.")
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            help="training examples (default: gsm8k all, pubmedqa 2000, safety 1000, arithmetic 2000)"
        ),
    ] = None,
    mix_safety: Annotated[
        int | None, typer.Option(help="SafeInstr: offline safety examples mixed into the data (default: 0)")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="stop after N steps; -1: use --epochs (default: -1)")
    ] = None,
    epochs: Annotated[float | None, typer.Option(help="training epochs (default: 1)")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="learning rate (default: 2e-4)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="per-device batch size (default: 4)")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="gradient accumulation steps (default: 1)")] = None,
    max_length: Annotated[int | None, typer.Option(help="max tokens per example (default: 512)")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default: 8)")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha (default: 16)")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout (default: 0)")] = None,
    target_modules: Annotated[
        str | None,
        typer.Option(
            help=f"{_LIST} LoRA target modules, or all-linear (PEFT: every linear layer but the output "
            "layer) (default: q_proj,v_proj)"
        ),
    ] = None,
    like: Annotated[
        str | None,
        typer.Option(
            help="copy target modules, --lora-r and --lora-alpha from this LoRA adapter (e.g. train the "
            "safety adapter like the task adapter, so SafeMERGE can merge every module); not with "
            "--target-modules/--lora-r/--lora-alpha (default: none)"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="random seed for data and training (default: 42)")] = None,
    gradient_checkpointing: Annotated[
        bool | None, typer.Option(help="trade compute for memory (default: off)")
    ] = None,
    bf16: Annotated[
        bool | None, typer.Option(help="bf16 training (default: on for a GPU that supports it, off on CPU)")
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    force: Annotated[
        bool | None,
        typer.Option(help="replace an earlier safemerge output at --out, never other files (default: off)"),
    ] = None,
) -> None:
    """Fine-tune a LoRA adapter (task or safety) with the model's chat template, loss on responses only."""

    def body() -> None:
        cfg = load_config(TrainConfig, config or config_pos, given_options(ctx, "config", "config_pos"))
        result = train(cfg)
        console.print(
            f"adapter written to {result.out} ({result.n_examples} examples, {result.steps} steps, "
            f"loss {result.first_loss:.4f} -> {result.last_loss:.4f})"
        )

    run_guarded(body)
