"""`safemerge subspace`: thin typer wrapper over `safemerge.engine.subspace.subspace` (docs/subspace.md)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from safemerge.cli.common import (
    AlignedOpt,
    ConfigArg,
    ConfigOpt,
    DeviceOpt,
    ForceOpt,
    PickleOpt,
    QuietOpt,
    RevisionOpt,
    UnalignedOpt,
    config_file,
    given_options,
    load_cli_config,
    pin_revisions,
    run_guarded,
)
from safemerge.engine.subspace import SubspaceConfig, SubspaceResult, subspace


def subspace_command(
    ctx: typer.Context,
    config_pos: ConfigArg = None,
    config: ConfigOpt = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank",
            "-k",
            help="K: singular directions kept per module (≥ 1; clamped to min(d_out, d_in)). Required.",
        ),
    ] = None,
    modules: Annotated[
        str | None,
        typer.Option(
            help="Regex (searched in module names) narrowing the default set: q/k/v/o/gate/up/down_proj, "
            "c_attn/c_proj/c_fc. Default: all of them."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the randomised SVD. Default 0.")] = None,
    layout: Annotated[
        Literal["auto", "linear", "conv1d"] | None,
        typer.Option(help="Weight layout (auto: from config.json; GPT-2 is conv1d). Default auto."),
    ] = None,
    u_dtype: Annotated[
        Literal["float32", "float16"] | None,
        typer.Option(help="Storage of U (float16: half the size, see docs/subspace.md). Default float32."),
    ] = None,
    device: DeviceOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output directory (must not exist, see --force). Required."),
    ] = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Sketch the safety subspace once per model pair: per module the top-K singular vectors and values of
    V = W_aligned − W_unaligned, so that ρ needs neither model afterwards."""

    def body() -> None:
        options = pin_revisions(given_options(ctx, "quiet"), revision)
        cfg = load_cli_config(ctx, SubspaceConfig, config_file(config_pos, config), options)
        result = subspace(cfg, progress=not quiet)
        if not quiet:
            print_result(result, Console())

    run_guarded(body, quiet)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def print_result(result: SubspaceResult, console: Console) -> None:
    """The one-paragraph summary: modules, K, energy kept, size on disk against the models, time."""
    clamped = f" ({result.clamped} clamped to min(d_out, d_in))" if result.clamped else ""
    e = result.energy
    share = 100 * result.bytes_on_disk / result.model_bytes
    console.print(
        f"subspace sketch: {result.modules} modules, K = {result.rank}{clamped}; share of ‖V‖²_F kept "
        f"{min(e):.4f} to {max(e):.4f} (median {statistics.median(e):.4f})\n"
        f"{_size(result.bytes_on_disk)} on disk ({share:.2f} % of the "
        f"{_size(result.model_bytes)} these weights take in the two models), {result.seconds:.1f} s\n"
        f"written to {result.out}",
        highlight=False,
    )
