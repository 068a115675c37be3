"""`safemerge organism build`, `safemerge organism fullft` and the organism side of `safemerge demo`
(thin wrappers)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safemerge.cli.common import run_guarded
from safemerge.common.errors import InputError
from safemerge.common.precision import check_precision
from safemerge.organism.build import build_organism
from safemerge.organism.compare import CompareSettings, run_compare
from safemerge.organism.demo import DemoSettings
from safemerge.organism.fullft import FullFtSettings, run_fullft_table
from safemerge.organism.recipe import OrganismRecipe, reduced_recipe
from safemerge.organism.seeds import run_demo

PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        metavar="<auto|float32|bfloat16>",
        show_default=False,
        help="Training and generation precision. Default auto: $SAFEMERGE_DTYPE, else whichever is faster "
        'on this machine (docs/organism.md, "Precision").',
    ),
]

ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an earlier safemerge output, never other files. Default off.")
]
CacheOpt = Annotated[
    Path | None, typer.Option(help="Cache directory. Default $SAFEMERGE_CACHE, else ~/.cache/safemerge.")
]

organism_app = typer.Typer(
    help="The CPU model organism: SmolLM2-135M aligned, fine-tuned and repaired (see docs/organism.md).",
    no_args_is_help=True,
)


@organism_app.command("build")
def build_command(
    reduced: Annotated[
        bool,
        typer.Option("--reduced", help="A tiny organism (a few steps and prompts) for tests. Default off."),
    ] = False,
    mix_safety: Annotated[
        bool,
        typer.Option(
            "--mix-safety/--no-mix-safety",
            help="Also build the SafeInstr variant of T. Default on.",
            show_default=False,
        ),
    ] = True,
    full_ft: Annotated[
        bool,
        typer.Option(
            "--full-ft", help="Also build T_full: A fully fine-tuned on T's task data. Default off."
        ),
    ] = False,
    cache: CacheOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars. Default off.")] = False,
    precision: PrecisionOption = "auto",
) -> None:
    """Build (or reuse from the cache) U, A, T, S and, with --mix-safety, SafeInstr's T; with --full-ft
    also T_full (a full fine-tune of A on the task)."""

    def body() -> None:
        stages = ("aligned", "task", "safety") + (("safeinstr",) if mix_safety else ())
        stages += ("taskfull",) if full_ft else ()
        recipe = (reduced_recipe() if reduced else OrganismRecipe()).with_precision(
            check_precision(precision, "--precision")
        )
        org = build_organism(recipe, cache, not quiet, stages)
        con = Console()
        if org.precision is not None:
            con.print(f"precision   : {org.precision.describe()}")
        con.print(f"unaligned U : {org.unaligned}")
        con.print(f"aligned A   : {org.aligned}")
        con.print(f"task T      : {org.task}")
        con.print(f"safety S    : {org.safety}")
        if mix_safety:
            con.print(f"SafeInstr T : {org.safeinstr}")
        if full_ft:
            con.print(f"full-FT T   : {org.taskfull}")
        con.print(
            "seconds per stage (0 = cached): " + ", ".join(f"{k} {v:.0f}" for k, v in org.timings.items())
        )

    run_guarded(body, quiet)


RequiredOutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Output directory, written atomically. Required.")
]


def required_out(out: Path | None) -> Path:
    """--out, which these commands need (an `InputError` naming it, as every command words a missing
    option, rather than click's own usage error)."""
    if out is None:
        raise InputError("missing required option: --out")
    return out


@organism_app.command("fullft")
def fullft_command(
    out: RequiredOutOpt = None,
    reduced: Annotated[
        bool, typer.Option("--reduced", help="A tiny organism and 4 prompts per set, for tests. Default off.")
    ] = False,
    force: ForceOpt = False,
    cache: CacheOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No training or defence progress bars. Default off.")
    ] = False,
    precision: PrecisionOption = "auto",
) -> None:
    """SafeMERGE (τ 0.35, w 0.8/0.2), its scale-only control and merge-all on T_full, the organism's full
    fine-tune (built if needed), evaluated like the demo's rows; writes results.{md,json,csv} to OUT."""

    def body() -> None:
        target = required_out(out)
        s = FullFtSettings(out=target, cache=cache, force=force, progress=not quiet)
        if reduced:
            s = replace(s, recipe=reduced_recipe(), task_limit=4, harm_limit=4, benign_limit=4)
        s = replace(s, recipe=s.recipe.with_precision(check_precision(precision, "--precision")))
        run_fullft_table(s)
        typer.echo((target / "results.md").read_text(encoding="utf-8"))

    run_guarded(body, quiet)


def run_organism_demo(
    out: Path,
    full: bool,
    force: bool,
    reduced: bool = False,
    cache: Path | None = None,
    seeds: int = 1,
    precision: str = "auto",
    quiet: bool = False,
) -> None:
    """Run the organism demo for training seeds 0 … seeds − 1 and print its answers, tables and targets."""
    s = organism_settings(out, force, reduced, cache, seeds, precision, quiet, full=full)
    result = run_demo(s)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    met = sum(t["met"] for t in result["targets"])
    dtype = result["settings"]["precision"]["dtype"]
    typer.echo(f"targets met: {met}/{len(result['targets'])} (precision {dtype}); files in {out}")


def organism_settings(
    out: Path,
    force: bool,
    reduced: bool,
    cache: Path | None,
    seeds: int,
    precision: str,
    quiet: bool,
    full: bool = False,
) -> DemoSettings:
    """The demo's settings for seeds 0 … seeds − 1: the default demo, `--full`, or `reduced` (a tiny
    organism and 4 prompts per set, for tests); the precision as asked (resolved when the run starts)."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
    check_precision(precision, "--precision")
    if reduced:
        s = DemoSettings(
            out=out, recipe=reduced_recipe(), cache=cache, taus=(0.35,), weights=((0.8, 0.2),),
            task_limit=4, harm_limit=4, benign_limit=4, val_task=4, val_limit=4, force=force,
            validate_aligned=True,
        )  # fmt: skip
    elif full:
        s = DemoSettings.full(out, cache=cache, force=force)
    else:
        s = DemoSettings(out=out, cache=cache, force=force)
    recipe = s.recipe.with_precision(precision)
    return replace(s, seeds=tuple(range(seeds)), recipe=recipe, progress=not quiet)


@organism_app.command("compare")
def compare_command(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output directory (each variant written atomically; a rerun resumes in it, and only "
            "safemerge's own directory is reused). Needs about 7.5 GB per seed for the full-model "
            "variants. Required.",
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option(help="Training seeds 0 … N−1, pooled. Default 3.", show_default=False)
    ] = 3,
    defences: Annotated[
        str,
        typer.Option(
            help="Comma-separated defences to compare with SafeMERGE. Default: every registered defence "
            "that declares a knob to sweep.",
            show_default=False,
        ),
    ] = "",
    reduced: Annotated[
        bool,
        typer.Option(
            "--reduced", help="A tiny organism, 4 prompts per set, 2 values per knob, for tests. Default off."
        ),
    ] = False,
    force: ForceOpt = False,
    cache: CacheOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars. Default off.")] = False,
    precision: PrecisionOption = "auto",
) -> None:
    """Every defence's knob swept on validation, one setting chosen per defence and seed at matched
    utility (the demo's rule), tested and paired against SafeMERGE; writes results.{md,json,csv} and
    validation.png to OUT (docs/organism.md, "Which defence")."""

    def body() -> None:
        target = required_out(out)
        s = organism_settings(target, force, reduced, cache, seeds, precision, quiet)
        names = tuple(n.strip() for n in defences.split(",") if n.strip())
        data = run_compare(CompareSettings(s, names, 2 if reduced else None))
        typer.echo((target / "results.md").read_text(encoding="utf-8"))
        typer.echo(
            f"{len(data['defences'])} defences compared over {len(data['seeds'])} seed(s); files in {target}"
        )

    run_guarded(body, quiet)
