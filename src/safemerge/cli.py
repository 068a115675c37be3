"""The `safemerge` command line: thin typer wrappers over the Python API (nothing is computed here)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from safemerge.cliutils import (
    AlignedOpt,
    ConfigArg,
    DeviceOpt,
    ForceOpt,
    FractionOpt,
    MaxShardOpt,
    MergeIntoBaseOpt,
    PickleOpt,
    PlotOpt,
    QuietOpt,
    RankOpt,
    SeedOpt,
    TaskOpt,
    ThresholdOpt,
    TopKOpt,
    UnalignedOpt,
    run_guarded,
    strs,
)

app = typer.Typer(
    name="safemerge",
    help="SafeMERGE: find the LoRA modules whose update left the safety subspace and merge only those "
    "with a safety LoRA; train, evaluate and compare defences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command("scan")
def scan_command(
    config: ConfigArg = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    task_adapter: TaskOpt = None,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    fraction: FractionOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the report (JSON, Markdown, plot) here. Optional.")
    ] = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    plot: PlotOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compute ρ for every module of the task adapter and show which modules SafeMERGE would merge."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from safemerge.config import ScanConfig, load_config
    from safemerge.pipeline import scan
    from safemerge.report import print_summary

    def body() -> None:
        cfg = load_config(ScanConfig, config, strs(overrides))
        report = scan(cfg, progress=not quiet)
        if not quiet:
            print_summary(report, Console())

    run_guarded(body)


@app.command("merge")
def merge_command(
    config: ConfigArg = None,
    aligned: AlignedOpt = None,
    unaligned: UnalignedOpt = None,
    task_adapter: TaskOpt = None,
    safety_adapter: Annotated[
        str | None, typer.Option("--safety-adapter", "-s", help="Safety LoRA trained on the aligned model.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output directory (must not exist, see --force).")
    ] = None,
    threshold: ThresholdOpt = None,
    top_k: TopKOpt = None,
    fraction: FractionOpt = None,
    weights: Annotated[
        str | None, typer.Option(help="w_task,w_safety applied to selected modules. Default 0.8,0.2.")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="exact: lossless rank r_f+r_s merge of the products (default). peft-linear: the released "
            "code's factor mixing, with its cross terms (needs equal ranks)."
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="linear (default), ties, dare_linear or dare_ties; the last three act on the full ΔW of "
            "selected modules and re-factorise by truncated SVD."
        ),
    ] = None,
    density: Annotated[float | None, typer.Option(help="Kept fraction for TIES/DARE. Default 0.5.")] = None,
    seed: SeedOpt = None,
    rank: RankOpt = None,
    merge_into_base: MergeIntoBaseOpt = None,
    max_shard_size: MaxShardOpt = None,
    device: DeviceOpt = None,
    allow_pickle: PickleOpt = None,
    force: ForceOpt = None,
    plot: PlotOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Scan, then merge the selected modules with the safety adapter; write a PEFT adapter and a report."""
    overrides = {k: v for k, v in locals().items() if k not in ("config", "quiet")}
    from safemerge.config import MergeConfig, load_config
    from safemerge.pipeline import merge
    from safemerge.report import print_summary

    def body() -> None:
        cfg = load_config(MergeConfig, config, strs(overrides))
        report = merge(cfg, progress=not quiet)
        if not quiet:
            print_summary(report, Console())

    run_guarded(body)


@app.command("demo")
def demo_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where to build the inputs and write the results.")
    ] = Path("demo_out"),
    full: Annotated[
        bool,
        typer.Option("--full", help="Larger τ × weights grid, all task items, longer generations, U too."),
    ] = False,
    toy: Annotated[
        bool,
        typer.Option("--toy", help="The synthetic toy (planted modules, seconds) instead of the organism."),
    ] = False,
    reduced: Annotated[
        bool, typer.Option("--reduced", hidden=True, help="Tiny organism and prompt sets (tests only).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output directory.")] = False,
) -> None:
    """The model organism end to end on CPU: SmolLM2-135M aligned (A), fine-tuned on arithmetic (T),
    then SafeMERGE and the baselines, with a table of harmful rate / over-refusal / task accuracy.

    The first run builds the organism (about 14 minutes on 2 idle CPU cores) and caches it and every
    generation; a rerun takes seconds. See docs/organism.md. `--toy`: the seconds-long synthetic check.
    """

    def body() -> None:
        if not toy:
            from safemerge.organism.cli import run_organism_demo

            run_organism_demo(out, full=full, force=force, reduced=reduced)
            return
        from safemerge.demo import run_toy_demo
        from safemerge.report import print_summary

        inputs, report = run_toy_demo(out, force=force)
        print_summary(report, Console())
        selected = sorted(m.name for m in report.modules if m.selected)
        verdict = "[green]recovered exactly[/]" if selected == inputs.drifted else "[red]NOT recovered[/]"
        n_drift, n_sel = len(inputs.drifted), len(selected)
        Console().print(f"planted drifted modules: {n_drift}, selected by SafeMERGE: {n_sel} — {verdict}")

    run_guarded(body)


# --- command registration: merge engine (scan, merge, demo) ---

# --- command registration: model organism (organism build; demo above) ---
from safemerge.organism.cli import organism_app  # noqa: E402

app.add_typer(organism_app, name="organism")

# --- command registration: training and evaluation (train, eval) ---
from safemerge.evaluate.cli import eval_command  # noqa: E402
from safemerge.train.cli import train_command  # noqa: E402

app.command("train")(train_command)
app.command("eval")(eval_command)

# --- command registration: defences and experiments (defend, experiment) ---
from safemerge.defenses.cli import defend_command  # noqa: E402
from safemerge.experiment import experiment_command  # noqa: E402

app.command("defend")(defend_command)
app.command("experiment")(experiment_command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="safemerge")


if __name__ == "__main__":
    main()
