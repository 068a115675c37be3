"""The `safemerge` command line: thin typer wrappers over the Python API (nothing is computed here)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from safemerge.errors import InputError

app = typer.Typer(
    name="safemerge",
    help="SafeMERGE: find the LoRA modules whose update left the safety subspace and merge only those "
    "with a safety LoRA; train, evaluate and compare defences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body, mapping bad input to exit code 2 and unexpected failures to exit code 1."""
    try:
        return fn()
    except InputError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:  # internal error: keep the traceback visible for bug reports
        console.print_exception(show_locals=False)
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None


# --- command registration: merge engine (scan, merge, demo) ---

# --- command registration: training and evaluation (train, eval) ---

# --- command registration: defences and experiments (defend, experiment) ---


def main() -> None:
    """Console-script entry point."""
    app(prog_name="safemerge")


if __name__ == "__main__":
    sys.exit(main())
