"""The `safemerge eval` command (a thin wrapper over `safemerge.evaluate.evaluate`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Literal

import typer

from safemerge.cli.common import (
    ConfigArg,
    ConfigOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    config_file,
    console,
    load_cli_config,
    run_guarded,
)
from safemerge.evaluate.api import evaluate
from safemerge.evaluate.benchmarks import benchmark_names
from safemerge.evaluate.config import DEFAULT_GUARD, EvalConfig, split_adapter_names
from safemerge.evaluate.judge_plugins import judge_names


class _ConsoleLog(logging.Handler):
    """The evaluation's INFO log (engine sizes, free GPU memory, normalised adapters) on the console."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(self.format(record), style="dim", markup=False, highlight=False)


def show_evaluation_log() -> None:
    logger = logging.getLogger("safemerge.evaluate")
    if not any(isinstance(h, _ConsoleLog) for h in logger.handlers):
        logger.addHandler(_ConsoleLog())
    logger.setLevel(logging.INFO)


def eval_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<[name=]dir>",
            help="PEFT adapter directory, or NAME=PATH to name the variant; repeat for several, all on one "
            "base. Default none.",
        ),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Compare every variant with this one (an adapter's NAME or path, or the --model for the "
            "base): per benchmark the difference with a 95% interval, paired flips and McNemar p. "
            "Default none."
        ),
    ] = None,
    benchmarks: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated: {', '.join(benchmark_names())}, or a .jsonl with a `prompt` field "
            "(harmful prompts) or `prompt` and `reference` fields (a utility task); other installed "
            "packages can add benchmarks (docs/extending.md). Required."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory. Required.")] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            help=f"Harm judges, comma-separated, the first the headline: {', '.join(judge_names())}; a model "
            "judge as NAME=MODEL. Default keyword, with HarmBench's rule beside it."
        ),
    ] = None,
    judge_model: Annotated[
        str | None, typer.Option(help=f"The llama-guard judge's model. Default {DEFAULT_GUARD}.")
    ] = None,
    backend: Annotated[
        Literal["transformers", "vllm"] | None, typer.Option(help="Generation backend. Default transformers.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="First N prompts of each benchmark. Default all.")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens generated per answer. Default 256.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generation batch. Default 16.")] = None,
    include_base: Annotated[
        bool | None, typer.Option(help="Also evaluate the base model without adapters. Default on.")
    ] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option(help="vLLM: GPUs per engine. Default 1.")
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None, typer.Option(help="vLLM: share of GPU memory to use. Default 0.85.")
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            help="vLLM: context length of the generation engine, in tokens. Default: the longest rendered "
            "prompt + --max-new-tokens, rounded up to a multiple of 256."
        ),
    ] = None,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"] | None,
        typer.Option(
            help="Weights' dtype. Default auto: bf16 on a GPU that supports it (vLLM: the checkpoint's "
            "dtype, float32 checkpoints in bf16)."
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Generation cache. Default $SAFEMERGE_CACHE/generations.")
    ] = None,
    no_cache: Annotated[
        bool | None,
        typer.Option("--no-cache", help="Do not read or write the generation cache. Default off."),
    ] = None,
    trust_remote_code: TrustRemoteCodeOpt = None,
    force: Annotated[
        bool | None,
        typer.Option(help="Replace an earlier safemerge output at --out, never other files. Default off."),
    ] = None,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="No progress bars, evaluation log or closing summary. Default off."
        ),
    ] = False,
) -> None:
    """Measure utility (accuracy) and harmfulness (harmful rate) of a model and its adapters.

    Generations are cached: rerun an interrupted command and only the missing answers are generated.
    """

    def body() -> None:
        paths, names = split_adapter_names(adapter) if adapter else (None, None)
        overrides = {
            "model": model,
            "adapters": paths,
            "adapter_names": names,
            "reference": reference,
            "benchmarks": [b.strip() for b in benchmarks.split(",") if b.strip()]
            if benchmarks is not None
            else None,
            "out": out,
            "judge": judge,
            "judge_model": judge_model,
            "backend": backend,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "include_base": include_base,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": dtype,
            "cache_dir": cache_dir,
            "no_cache": no_cache,
            "trust_remote_code": trust_remote_code,
            "force": force,
        }
        cfg = load_cli_config(ctx, EvalConfig, config_file(config_pos, config), overrides, adapters="adapter")
        if not quiet:
            show_evaluation_log()
        evaluate(cfg)
        if not quiet:
            console.print(f"results written to {cfg.out} (metrics.json, generations.jsonl, summary.md)")

    run_guarded(body, quiet)
