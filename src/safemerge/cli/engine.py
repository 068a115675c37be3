"""`safemerge scan` and `safemerge merge`: thin typer wrappers over `safemerge.engine.scan` / `merge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from safemerge.cli.common import (
    AlignedOpt,
    AllowAnyWeightsOpt,
    AllowPartialOpt,
    ConfigArg,
    ConfigOpt,
    DeviceOpt,
    ForceOpt,
    FractionOpt,
    IgnoreFingerprintOpt,
    MaxShardOpt,
    MergeIntoBaseOpt,
    MergeMethodOpt,
    ModulesOpt,
    PickleOpt,
    PlotOpt,
    QuietOpt,
    RankOpt,
    RevisionOpt,
    SafetyModelOpt,
    SeedOpt,
    SubspaceOpt,
    TaskModelOpt,
    TaskOpt,
    ThresholdOpt,
    TopKOpt,
    UnalignedOpt,
    config_file,
    flag_names,
    given_options,
    in_flags,
    load_cli_config,
    merge_method_of,
    pin_revisions,
    run_guarded,
    typed_only,
)
from safemerge.engine.config import MergeConfig, ScanConfig
from safemerge.engine.pipeline import merge, scan
from safemerge.engine.report import print_summary


def scan_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    subspace: SubspaceOpt = None,
    ignore_fingerprint: IgnoreFingerprintOpt = None,
    task_adapter: TaskOpt = None,
    task_model: TaskModelOpt = None,
    modules: ModulesOpt = None,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    fraction: FractionOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write the report (JSON, Markdown, plot) here. Optional."),
    ] = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    plot: PlotOpt = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compute ρ for every module of the task adapter (or full fine-tune) and show which modules SafeMERGE
    would merge."""

    def body() -> None:
        options = pin_revisions(given_options(ctx, "quiet"), revision)
        file = config_file(config_pos, config)
        cfg = load_cli_config(ctx, ScanConfig, file, options)
        report = in_flags(typed_only(flag_names(ctx), file, options), lambda: scan(cfg, progress=not quiet))
        if not quiet:
            print_summary(report, Console())

    run_guarded(body, quiet)


def merge_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    subspace: SubspaceOpt = None,
    ignore_fingerprint: IgnoreFingerprintOpt = None,
    task_adapter: TaskOpt = None,
    task_model: TaskModelOpt = None,
    modules: ModulesOpt = None,
    safety_adapter: Annotated[
        str | None,
        typer.Option(
            "--safety-adapter",
            "-s",
            help="Safety LoRA trained on the aligned model. Required unless --safety-model is given.",
        ),
    ] = None,
    safety_model: SafetyModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory (must not exist, see --force). Required."),
    ] = None,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    fraction: FractionOpt = None,
    weights: Annotated[
        str | None, typer.Option(help="w_task,w_safety applied to selected modules. Default 0.8,0.2.")
    ] = None,
    allow_any_weights: AllowAnyWeightsOpt = None,
    mode: Annotated[
        Literal["exact", "peft-linear"] | None,
        typer.Option(
            help="exact: lossless rank r_f+r_s merge of the products. peft-linear: the released code's "
            "factor mixing, with its cross terms (needs equal ranks). Default exact."
        ),
    ] = None,
    merge_method: MergeMethodOpt = None,
    method: Annotated[
        Literal["linear", "ties", "dare_linear", "dare_ties"] | None,
        typer.Option("--method", help="Deprecated spelling of --merge-method. Default: as --merge-method."),
    ] = None,
    density: Annotated[float | None, typer.Option(help="Kept fraction for TIES/DARE. Default 0.5.")] = None,
    seed: SeedOpt = None,
    rank: RankOpt = None,
    allow_partial: AllowPartialOpt = None,
    merge_into_base: MergeIntoBaseOpt = None,
    max_shard_size: MaxShardOpt = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    plot: PlotOpt = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Scan, then merge the selected modules with the safety update; write a PEFT adapter (a full model
    for --task-model) and a report."""

    def body() -> None:
        options = pin_revisions(given_options(ctx, "quiet"), revision)
        options["method"] = merge_method_of(options)
        file = config_file(config_pos, config)
        cfg = load_cli_config(ctx, MergeConfig, file, options, method="merge_method")
        flags = typed_only(flag_names(ctx, method="merge_method"), file, options)
        report = in_flags(flags, lambda: merge(cfg, progress=not quiet))
        if not quiet:
            print_summary(report, Console())

    run_guarded(body, quiet)
