"""`safemerge push`: a thin typer wrapper over `safemerge.engine.push.push`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from safemerge.cli.common import run_guarded
from safemerge.engine.push import push


def push_command(
    out: Annotated[
        Path,
        typer.Argument(help="A safemerge output with a model card (merge, defend or subspace). Required."),
    ],
    repo_id: Annotated[
        str, typer.Argument(help="The hub repository, owner/name; created when missing. Required.")
    ],
    private: Annotated[
        bool,
        typer.Option(
            "--private",
            help="Create the repository private (an existing one keeps its setting). Default off.",
        ),
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Push to this branch, created when missing. Default: main."),
    ] = None,
    eval_dir: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="A `safemerge eval` output that evaluated OUT: its rates go into the card's model-index. "
            "Optional.",
        ),
    ] = None,
) -> None:
    """Upload a safemerge output to the Hugging Face Hub in one commit. The uploaded card, reports and
    configs name inputs by hub id or basename, never by local path; OUT itself is not changed."""

    def body() -> None:
        url = push(out, repo_id, private=private, branch=revision, eval_dir=eval_dir)
        typer.echo(f"pushed {out} to {url}")

    run_guarded(body)
