"""`safemerge defend`: thin typer wrapper over `safemerge.defenses.defend`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel
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
    flag_names,
    given_options,
    in_flags,
    pin_revisions,
    run_guarded,
    typed_only,
)
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.common.plugins import entry_point
from safemerge.defenses import DefendConfig, defend, defense_names, get_defense
from safemerge.defenses.registry import GROUP
from safemerge.engine.report import print_summary


def builtin_option_models() -> dict[str, type[BaseModel]]:
    """{defence: its own options' model} of safemerge's own defences (another package's plugin is never
    loaded just for help or messages)."""
    models = {}
    for name in defense_names():
        if entry_point(GROUP, name).value.startswith("safemerge."):
            model = get_defense(name).option_model
            if model is not None:
                models[name] = model
    return models


def defend_flags(ctx: typer.Context, config: Path | None, options: dict[str, Any]) -> dict[str, str]:
    """{config key: how the command line names it}, for defend's messages: each option as its flag
    (`task_adapter` → --task-adapter, `merge_method` → --merge-method) and each defence's own option as
    `--option KEY`, except a key that the YAML file gives and no flag overrides, which stays a key (as
    `load_config` names it)."""
    flags = flag_names(ctx)
    pairs = [str(p) for p in options.get("plugin_options") or []]
    typed = {k.strip() for k, sep, _ in (p.partition("=") for p in pairs) if sep and k.strip()}
    own = {k for model in builtin_option_models().values() for k in model.model_fields}
    method = options.get("method")
    if method in defense_names():
        try:
            model = get_defense(method).option_model
        except InputError:  # a plugin that fails to load: using it says why
            model = None
        own |= set(model.model_fields) if model is not None else set()
    flags.update({k: f"--option {k}" for k in own | typed if k not in flags})
    return typed_only(flags, config, options, typed)


def own_options_help() -> str:
    """The built-in defences' own options (`--option KEY=VALUE`) with their descriptions. Only safemerge's
    own defences are imported for this: another package's plugin is never loaded just to print help."""
    parts = []
    for name, model in builtin_option_models().items():
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
        path = config_file(config_pos, config)
        flags = defend_flags(ctx, path, options)
        cfg = load_config(DefendConfig, path, options, flags)
        result = in_flags(flags, lambda: defend(cfg, progress=not quiet))
        if not quiet:
            print_summary(result.report, Console())
            Console().print(
                f"defence {cfg.method}: {result.modified} modules/tensors changed; "
                f"{result.kind} written to {result.out}",
                highlight=False,
            )

    run_guarded(body, quiet)
