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
from safemerge.organism.build import build_organism
from safemerge.organism.demo import DemoSettings
from safemerge.organism.fullft import FullFtSettings, run_fullft_table
from safemerge.organism.recipe import OrganismRecipe, reduced_recipe
from safemerge.organism.seeds import run_demo

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
    cache: Annotated[
        Path | None, typer.Option(help="Cache directory. Default $SAFEMERGE_CACHE, else ~/.cache/safemerge.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars. Default off.")] = False,
) -> None:
    """Build (or reuse from the cache) U, A, T, S and, with --mix-safety, SafeInstr's T; with --full-ft
    also T_full (a full fine-tune of A on the task)."""

    def body() -> None:
        stages = ("aligned", "task", "safety") + (("safeinstr",) if mix_safety else ())
        stages += ("taskfull",) if full_ft else ()
        org = build_organism(reduced_recipe() if reduced else OrganismRecipe(), cache, not quiet, stages)
        con = Console()
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

    run_guarded(body)


@organism_app.command("fullft")
def fullft_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory, written atomically. Required.")],
    reduced: Annotated[
        bool, typer.Option("--reduced", help="A tiny organism and 4 prompts per set, for tests. Default off.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an earlier safemerge output, never other files. Default off."),
    ] = False,
    cache: Annotated[
        Path | None, typer.Option(help="Cache directory. Default $SAFEMERGE_CACHE, else ~/.cache/safemerge.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No training or defence progress bars. Default off.")
    ] = False,
) -> None:
    """SafeMERGE (τ 0.35, w 0.8/0.2), its scale-only control and merge-all on T_full, the organism's full
    fine-tune (built if needed), evaluated like the demo's rows; writes results.{md,json,csv} to OUT."""

    def body() -> None:
        s = FullFtSettings(out=out, cache=cache, force=force, progress=not quiet)
        if reduced:
            s = replace(s, recipe=reduced_recipe(), task_limit=4, harm_limit=4, benign_limit=4)
        run_fullft_table(s)
        typer.echo((out / "results.md").read_text(encoding="utf-8"))

    run_guarded(body)


def run_organism_demo(
    out: Path,
    full: bool,
    force: bool,
    reduced: bool = False,
    cache: Path | None = None,
    seeds: int = 1,
    quiet: bool = False,
) -> None:
    """Run the organism demo for training seeds 0 … seeds − 1 and print its answers, tables and targets."""
    if seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {seeds}")
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
    result = run_demo(replace(s, seeds=tuple(range(seeds)), progress=not quiet))
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    met = sum(t["met"] for t in result["targets"])
    typer.echo(f"targets met: {met}/{len(result['targets'])}; files in {out}")
