"""Shared pieces of the command line: exit-code mapping and option types reused by several commands.

Kept apart from `cli.py` so that command modules can import them without importing the whole app.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from safemerge.common.errors import InputError

console = Console(stderr=True)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body, mapping bad input to exit code 2 and unexpected failures to exit code 1."""
    try:
        return fn()
    except InputError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)  # `[ray]` as written
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # internal error: keep the traceback visible for bug reports
        console.print_exception(show_locals=False)
        console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(1) from None


# --- scan / merge ------------------------------------------------------------------------------------
# Options default to None so that a YAML config can supply them; the help text states the real default.
ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config whose keys mirror the options; flags override it.")
]
AlignedOpt = Annotated[
    str | None,
    typer.Option("--aligned", "-a", help="Aligned model the adapters were trained on: directory or hub id."),
]
UnalignedOpt = Annotated[
    str | None,
    typer.Option("--unaligned", "-u", help="Unaligned (pre-alignment) base model: directory or hub id."),
]
TaskOpt = Annotated[
    str | None, typer.Option("--task-adapter", "-t", help="Fine-tuned task LoRA (PEFT directory).")
]
TaskModelOpt = Annotated[
    str | None,
    typer.Option(
        "--task-model",
        help="A full fine-tune of the aligned model (directory or hub id), instead of --task-adapter.",
    ),
]
ModulesOpt = Annotated[
    str | None,
    typer.Option(
        help="With --task-model: scan the linear layers whose module name matches this regular expression "
        "(re.search). Default: the attention and MLP projections (q,k,v,o,gate,up,down; c_attn,c_proj,c_fc)."
    ),
]
SubspaceOpt = Annotated[
    str | None,
    typer.Option(
        help="A sketch of V (`safemerge subspace`) instead of --unaligned: ρ from its rank-K directions. "
        "A LoRA scan then needs no base model; where aligned weights are read, --aligned must match the "
        "sketch's fingerprint."
    ),
]
IgnoreFingerprintOpt = Annotated[
    bool | None,
    typer.Option(
        "--ignore-fingerprint",
        help="Use a --subspace sketch made from another aligned checkpoint (the report records it). "
        "Default off.",
    ),
]
SafetyModelOpt = Annotated[
    str | None,
    typer.Option(
        "--safety-model",
        help="With --task-model: a full safety fine-tune of the aligned model, instead of --safety-adapter.",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(help="Select modules with round(ρ, 5) < THRESHOLD. Default 0.35 when no policy is given."),
]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help="Select the K modules with the lowest ρ instead.")
]
FractionOpt = Annotated[
    float | None, typer.Option(help="Select the lowest-ρ fraction of modules (⌈F·n⌉ of them) instead.")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="Where the math runs: cpu, cuda or auto (cuda when present). Default cpu.")
]
ForceOpt = Annotated[
    bool | None, typer.Option("--force", help="Replace an earlier safemerge output (never other files).")
]
PickleOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-pickle", help="Allow pickle (*.bin) checkpoints, loaded with weights_only=True. Default off."
    ),
]
PlotOpt = Annotated[bool | None, typer.Option("--plot/--no-plot", help="Write similarity.png. Default on.")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed of DARE masks and randomised SVD. Default 0.")]
RankOpt = Annotated[int | None, typer.Option(help="Output rank for TIES/DARE. Default r_task + r_safety.")]
MaxShardOpt = Annotated[str | None, typer.Option(help="Largest shard of a full model. Default 2GB.")]
MergeIntoBaseOpt = Annotated[
    bool | None,
    typer.Option(
        "--merge-into-base", help="Also write the full merged model to OUT/full_model. Default off."
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summary table.")]


def given_options(ctx: typer.Context, *skip: str) -> dict[str, Any]:
    """The command's parsed options by parameter name (= config field name), Paths as strings, minus
    `skip` (options that steer the command rather than the config). Options left unset are None, so
    `load_config` lets the YAML file or the field default decide them."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items() if k not in skip}


# --- train / eval ------------------------------------------------------------------------------------
ModelOpt = Annotated[
    str | None, typer.Option(help="base model: local dir, hub id, or `smollm2` (packaged). Required.")
]
TrustRemoteCodeOpt = Annotated[bool | None, typer.Option(help="allow model code from the hub (default: off)")]
