"""`safemerge experiment`: thin typer wrapper over `safemerge.experiment.runner.run_experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safemerge.cli.common import run_guarded
from safemerge.experiment.results import print_rows
from safemerge.experiment.runner import run_experiment


def experiment_command(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see docs/defenses.md). Required.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory. Default: the config's `out:`.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate and list every cell with its cache status; run nothing. Default off."
        ),
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option(
            help="Evaluate only the first N prompts of each benchmark. Default: the config's limit."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars. Default off.")] = False,
) -> None:
    """Run every defence × grid cell on one setup, evaluate all variants, write the table and plot."""

    def body() -> None:
        result = run_experiment(config, out, dry_run=dry_run, progress=not quiet, limit=limit)
        if not dry_run:
            print_rows(result.rows, Console())
            Console().print(
                f"computed {len(result.computed)} cell(s), evaluated {len(result.evaluated)}; "
                f"results in {result.out}/results.md",
                highlight=False,
            )

    run_guarded(body)
