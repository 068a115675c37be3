"""The `safemerge` command line: one typer app; each command lives in its own module of this package
and is a thin wrapper over the Python API (nothing is computed here)."""

from __future__ import annotations

import safemerge.cli.openmp  # noqa: F401  # first: before anything loads torch (and its OpenMP)

# isort: split
import inspect
from typing import Annotated

import typer

from safemerge import __version__
from safemerge.cli.defend import defend_command
from safemerge.cli.demo import demo_command
from safemerge.cli.engine import merge_command, scan_command
from safemerge.cli.eval import eval_command
from safemerge.cli.experiment import experiment_command
from safemerge.cli.organism import organism_app
from safemerge.cli.push import push_command
from safemerge.cli.subspace import subspace_command
from safemerge.cli.train import train_command

app = typer.Typer(
    name="safemerge",
    help="SafeMERGE: find the LoRA modules whose update left the safety subspace and merge only those "
    "with a safety LoRA; train, evaluate and compare defences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"safemerge {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool | None,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print safemerge's version and exit."
        ),
    ] = None,
) -> None:
    """The options every command shares (only --version)."""


app.command("scan")(scan_command)
app.command("merge")(merge_command)
app.command("demo")(demo_command)
app.add_typer(organism_app, name="organism")
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("defend")(defend_command)
app.command("experiment")(experiment_command)
app.command("subspace")(subspace_command)
app.command("push")(push_command)


def unwrap(doc: str) -> str:
    """A docstring's paragraphs as one line each: the help renderer wraps to the terminal, and a hard
    line break kept from the source would split a sentence mid-line."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Every command's help (its docstring unless given) unwrapped, sub-apps included; the help is
    plain click text (`rich_markup_mode=None`), which wraps at words and never truncates a flag."""
    for info in typer_app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback)
        info.help = unwrap(doc) if doc else None
        # the command list shows the whole first paragraph (click would cut it at 45 characters with "...")
        info.short_help = info.short_help or (info.help.split("\n\n")[0] if info.help else None)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _unwrap_help(group.typer_instance)


_unwrap_help(app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="safemerge")
