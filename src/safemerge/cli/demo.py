"""`safemerge demo`: the model organism end to end (or the seconds-long synthetic toy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safemerge.cli.common import run_guarded
from safemerge.cli.organism import PrecisionOption, run_organism_demo
from safemerge.engine.report import print_summary
from safemerge.organism.toy import run_toy_demo


def demo_command(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where to build the inputs and write the results. Default demo_out.",
            show_default=False,
        ),
    ] = Path("demo_out"),
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="Larger τ × weights grid, all task items, longer generations, U too. Default off."
        ),
    ] = False,
    toy: Annotated[
        bool,
        typer.Option(
            "--toy", help="The synthetic toy (planted modules, seconds) instead of the organism. Default off."
        ),
    ] = False,
    reduced: Annotated[
        bool, typer.Option("--reduced", hidden=True, help="Tiny organism and prompt sets (tests only).")
    ] = False,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            help="Training seeds of T, S and SafeInstr's T (0 … N−1; A is built once); pooled. Default 1.",
            show_default=False,
        ),
    ] = 1,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="--toy: replace an earlier toy output (only safemerge's own output is replaced). The "
            "organism demo resumes in its directory and never empties it. Default off.",
        ),
    ] = False,
    precision: PrecisionOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars. Default off.")] = False,
) -> None:
    """The model organism end to end on CPU: SmolLM2-135M aligned (A), fine-tuned on arithmetic (T),
    then SafeMERGE and the baselines, with a table of harmful rate / over-refusal / task accuracy.

    The first run builds the organism (minutes on a CPU; the README's "Time" gives measured runs) and
    caches it and every generation; a rerun takes seconds. See docs/organism.md. `--toy`: the
    seconds-long synthetic check.
    """

    def body() -> None:
        if not toy:
            run_organism_demo(
                out, full=full, force=force, reduced=reduced, seeds=seeds, precision=precision, quiet=quiet
            )
            return

        inputs, report = run_toy_demo(out, force=force)
        print_summary(report, Console())
        selected = sorted(m.name for m in report.modules if m.selected)
        verdict = "[green]recovered exactly[/]" if selected == inputs.drifted else "[red]NOT recovered[/]"
        n_drift, n_sel = len(inputs.drifted), len(selected)
        Console().print(f"planted drifted modules: {n_drift}, selected by SafeMERGE: {n_sel} — {verdict}")

    run_guarded(body, quiet)
