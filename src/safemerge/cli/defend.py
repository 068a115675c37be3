"""`safemerge defend`: thin typer wrapper over `safemerge.defenses.defend`."""

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
    UnalignedOpt,
    config_file,
    given_options,
    load_cli_config,
    pin_revisions,
    run_guarded,
)
from safemerge.common.plugins import entry_point
from safemerge.defenses import DefendConfig, defend, defense_names, get_defense
from safemerge.defenses.registry import GROUP
from safemerge.engine.report import print_summary


def own_options_help() -> str:
    """The built-in defences' own options (`--option KEY=VALUE`) with their descriptions. Only safemerge's
    own defences are imported for this: another package's plugin is never loaded just to print help."""
    parts = []
    for name in defense_names():
        if not entry_point(GROUP, name).value.startswith("safemerge."):
            continue
        model = get_defense(name).option_model
        if model is not None:
            fields = "; ".join(f"{k}: {f.description}" for k, f in model.model_fields.items())
            parts.append(f"{name} — {fields}.")
    return " ".join(parts)


def defend_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help=f"The defence: {', '.join(defense_names())} (docs/defenses.md; other installed packages "
            "can add defences, docs/extending.md). Default safemerge.",
        ),
    ] = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    subspace: SubspaceOpt = None,
    ignore_fingerprint: IgnoreFingerprintOpt = None,
    task_adapter: TaskOpt = None,
    task_model: TaskModelOpt = None,
    modules: ModulesOpt = None,
    safety_adapter: Annotated[
        str | None,
        typer.Option("--safety-adapter", "-s", help="Safety LoRA (safemerge, merge-all). No default."),
    ] = None,
    safety_model: SafetyModelOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory (must not exist, see --force). Required."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            help="Selection threshold τ, used when no --top-k/--fraction is given. safemerge: "
            "round(ρ,5) < τ; safelora: round(ρ,5) ≤ τ. Default 0.35 (safemerge), 0.5 (safelora)."
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Select exactly the K lowest-ρ modules (Safe LoRA: K=10). No default."),
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Select the lowest-ρ fraction of modules (⌈F·n⌉). No default.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="w_task,w_safety on merged modules. Default 0.8,0.2; 0.8,0 (with --allow-any-weights) is "
            "the scale-only control."
        ),
    ] = None,
    allow_any_weights: AllowAnyWeightsOpt = None,
    mode: Annotated[
        Literal["exact", "peft-linear"] | None,
        typer.Option(help="exact, or peft-linear (the released code's factor mixing). Default exact."),
    ] = None,
    merge_method: MergeMethodOpt = None,
    density: Annotated[
        float | None, typer.Option(help="Kept fraction for TIES/DARE, and for RESTA's --dare. Default 0.5.")
    ] = None,
    seed: SeedOpt = None,
    rank: RankOpt = None,
    allow_partial: AllowPartialOpt = None,
    preserve_norm: Annotated[
        bool | None,
        typer.Option(
            "--preserve-norm",
            help="safelora: rescale C·B_f so ‖ΔW‖ is unchanged (not in the published method). Default off.",
        ),
    ] = None,
    beta: Annotated[
        float | None, typer.Option(help="resta: scale β of the safety vector W_al − W_un. Default 0.5.")
    ] = None,
    scope: Annotated[
        Literal["all-linear", "targeted"] | None,
        typer.Option(
            help="resta: add β·V to all linear layers or only to the LoRA-targeted modules. "
            "Default all-linear."
        ),
    ] = None,
    dare: Annotated[
        bool | None,
        typer.Option(
            "--dare", help="resta: DARE on the fine-tuning delta first (seeded, --density). Default off."
        ),
    ] = None,
    merge_into_base: MergeIntoBaseOpt = None,
    max_shard_size: MaxShardOpt = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    plot: PlotOpt = None,
    plugin_options: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            metavar="<key=value>",
            help="KEY=VALUE: an option of a plugin defence's own (repeat for several; see "
            f"docs/extending.md). Default: none. {own_options_help()}",
        ),
    ] = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Apply one post-fine-tuning defence to a task LoRA or full fine-tune (the defences: see --method)."""

    def body() -> None:
        options = pin_revisions(given_options(ctx, "quiet"), revision)
        cfg = load_cli_config(ctx, DefendConfig, config_file(config_pos, config), options)
        result = defend(cfg, progress=not quiet)
        if not quiet:
            print_summary(result.report, Console())
            Console().print(
                f"defence {cfg.method}: {result.modified} modules/tensors changed; "
                f"{result.kind} written to {result.out}",
                highlight=False,
            )

    run_guarded(body)
