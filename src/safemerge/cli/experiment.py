"""`safemerge experiment`: thin typer wrapper over `safemerge.experiment.runner.run_experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape

from safemerge.cli.common import config_file, run_guarded
from safemerge.common.errors import InputError
from safemerge.experiment.config import ExecutionSpec, parse_experiment
from safemerge.experiment.executor_ray import RayExecutor
from safemerge.experiment.results import print_rows
from safemerge.experiment.runner import Executor, run_experiment


def experiment_command(
    config_pos: Annotated[
        Path | None,
        typer.Argument(
            metavar="CONFIG",
            help="Experiment YAML (docs/defenses.md); the same as --config. Required, here or as --config.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Experiment YAML (docs/defenses.md). Required, here or as CONFIG."
        ),
    ] = None,
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
    executor: Annotated[
        Literal["local", "ray"] | None,
        typer.Option(
            help="local: every stage in this process; ray: on a Ray cluster (docs/distributed.md). "
            "Default: the config's execution.executor, else local."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to join (`auto` or HOST:PORT). Default: start a local Ray instance."),
    ] = None,
    gpus_per_cell: Annotated[
        float | None,
        typer.Option(help="GPUs of each Ray task and eval worker (a fraction packs them). Default 0."),
    ] = None,
    cpus_per_cell: Annotated[
        float | None,
        typer.Option(help="CPUs (and torch threads) of each Ray task and eval worker. Default 1."),
    ] = None,
) -> None:
    """Run every defence × grid cell on one setup, evaluate all variants, write the table and plot."""

    def body() -> int:
        source = config_file(config_pos, config)
        if source is None:
            raise InputError("missing required option: --config (or the YAML as the first argument)")
        cfg = parse_experiment(source)
        spec = (cfg.execution or ExecutionSpec()).with_flags(
            executor=executor,
            ray_address=ray_address,
            gpus_per_cell=gpus_per_cell,
            cpus_per_cell=cpus_per_cell,
        )
        runner: Executor | None = RayExecutor(spec) if spec.executor == "ray" else None
        result = run_experiment(
            cfg, out, dry_run=dry_run, progress=not quiet, limit=limit, executor=runner, source=source
        )
        if dry_run:
            return 0
        print_rows(result.rows, Console())
        Console().print(
            f"computed {len(result.computed)} cell(s), evaluated {len(result.evaluated)}; "
            f"results in {result.out}/results.md",
            highlight=False,
        )
        for label, error in result.failed.items():
            Console(stderr=True).print(f"[bold red]failed:[/] {label}: {escape(error)}", highlight=False)
        return 1 if result.failed else 0

    code = run_guarded(body, quiet)
    if code:
        raise typer.Exit(code)
