"""Shared pieces of the command line: exit-code mapping and option types reused by several commands.

Kept apart from `cli.py` so that command modules can import them without importing the whole app.
"""

from __future__ import annotations

import errno
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from safemerge.common.config_io import load_config, name_keys, read_yaml_mapping
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.common.progress import progress_bars
from safemerge.engine.config import MergeMethod
from safemerge.engine.hub import split_revision

console = Console(stderr=True)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def run_guarded(fn: Callable[[], Any], quiet: bool = False) -> Any:
    """Run a command body, mapping bad input to exit code 2 and unexpected failures to exit code 1;
    `quiet` (the command's `-q`) turns off every progress bar, the libraries' too.

    safemerge's own warnings (`SafemergeWarning`) are printed once each, as they happen, styled like the
    errors and without the source line Python adds; the reports keep them in full. Warnings of the
    libraries (transformers, peft, torch) are printed as those libraries word them."""
    try:
        with warnings.catch_warnings():  # restores the filters and `showwarning` afterwards
            warnings.simplefilter("always", SafemergeWarning)  # deduplicated by text below
            warnings.showwarning = _warning_printer(warnings.showwarning)
            with progress_bars(not quiet):
                return fn()
    except InputError as exc:
        # escape: `[ray]` as written; soft_wrap: one line per message, so a log can be grepped
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if out_of_space(exc):  # the machine's state, not a bug: no traceback
            console.print(
                f"[bold red]error:[/] no space left on the device ({escape(str(exc))}): free some space, "
                "or write --out or $SAFEMERGE_CACHE elsewhere, and run again",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None
        # internal error: keep the traceback visible for bug reports
        console.print_exception(show_locals=False)
        console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}", highlight=False
        )
        raise typer.Exit(1) from None


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc` is a full disk: an OSError with ENOSPC, or a library's own error wrapping one
    (safetensors reports "No space left on device (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc)


def _warning_printer(library: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that prints each distinct safemerge warning once as `warning: …` on
    stderr and hands other warnings to `library` (Python's own printer)."""
    shown: set[str] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if not issubclass(category, SafemergeWarning):
            library(message, category, *args, **kwargs)
            return
        text = str(message)
        if text not in shown:
            shown.add(text)
            console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)

    return show


# --- the one convention -----------------------------------------------------------------------------
# Every command that reads a YAML config takes it as `--config/-c FILE` or as its first argument (the
# older form, kept); output directories are `-o/--out`, `-q/--quiet` silences progress; help says
# "Default X." or "Required."; flags are named as typed in errors (docs/engine.md, "The command line").
# Options default to None so that a YAML config can supply them; the help text states the real default.
ConfigArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="CONFIG",
        help="YAML config whose keys mirror the options (the same as --config). Default: none.",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="YAML config whose keys mirror the options; flags override it. Default: none."
    ),
]


def config_file(positional: Path | None, option: Path | None) -> Path | None:
    """The YAML config given as the argument or as `--config` (the same file twice is fine)."""
    if positional is not None and option is not None and positional != option:
        raise InputError(f"two configs given: {positional} and --config {option}; give one")
    return option if option is not None else positional


def flag_names(ctx: typer.Context, **rename: str) -> dict[str, str]:
    """{config key: the flag as typed} for the command's options (`task_adapter` → `--task-adapter`,
    `learning_rate` → `--lr`); `rename` maps a config key to the parameter that sets it."""
    flags = {
        p.name: max(p.opts, key=len)
        for p in ctx.command.params
        if p.param_type_name == "option" and p.name is not None  # typer vendors its own click
    }
    flags.update({key: flags[param] for key, param in rename.items() if param in flags})
    return flags


def typed_only(
    flags: dict[str, str], config: Path | None, options: dict[str, Any], typed: set[str] | None = None
) -> dict[str, str]:
    """`flags` less the keys the YAML file gives and no flag (nor a name in `typed`) overrides: a message
    names those as the file's keys, as `load_config` does."""
    data = read_yaml_mapping(config) if config is not None else {}
    nested = data.get("plugin_options")
    from_yaml = set(data) | (set(nested) if isinstance(nested, dict) else set())
    overridden = {k for k, v in options.items() if v is not None} | (typed or set())
    return {k: v for k, v in flags.items() if k not in from_yaml or k in overridden}


def in_flags(flags: dict[str, str], fn: Callable[[], T]) -> T:
    """`fn()`, with the keys its input errors name in backticks (`aligned`, `calibration`) shown as the
    command line's flags (--aligned, --option calibration): the Python API's messages name keys."""
    try:
        return fn()
    except InputError as exc:
        exc.args = (name_keys(str(exc), flags), *exc.args[1:])
        raise


def load_cli_config(
    ctx: typer.Context, cls: type[M], config: Path | None, overrides: dict[str, Any], **rename: str
) -> M:
    """`load_config` with errors in the command's flags (every missing required option at once)."""
    return load_config(cls, config, overrides, flag_names(ctx, **rename))


# --- scan / merge ------------------------------------------------------------------------------------
AlignedOpt = Annotated[
    str | None,
    typer.Option(
        "--aligned",
        "-a",
        help="Aligned model the adapters were trained on: directory or hub id. Required, except by a LoRA "
        "scan with --subspace.",
    ),
]
UnalignedOpt = Annotated[
    str | None,
    typer.Option(
        "--unaligned",
        "-u",
        help="Unaligned (pre-alignment) base model: directory or hub id. Required unless --subspace is "
        "given.",
    ),
]
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task-adapter",
        "-t",
        help="Fine-tuned task LoRA (PEFT directory or hub id). Required unless --task-model is given.",
    ),
]
TaskModelOpt = Annotated[
    str | None,
    typer.Option(
        "--task-model",
        help="A full fine-tune of the aligned model (directory or hub id), instead of --task-adapter. "
        "Optional.",
    ),
]
ModulesOpt = Annotated[
    str | None,
    typer.Option(
        help="With --task-model: scan the linear layers whose module name matches this regular expression "
        "(re.search). Default: the attention and MLP projections (q, k, v, o, gate, up, down; c_attn, "
        "c_proj, c_fc)."
    ),
]
SubspaceOpt = Annotated[
    str | None,
    typer.Option(
        help="A sketch of V (`safemerge subspace`) instead of --unaligned: ρ from its rank-K directions. "
        "A LoRA scan then needs no base model; where aligned weights are read, --aligned must match the "
        "sketch's fingerprint. Optional."
    ),
]
IgnoreFingerprintOpt = Annotated[
    bool | None,
    typer.Option(
        "--ignore-fingerprint",
        help="Use a --subspace sketch made from another aligned checkpoint (the report records it). "
        "Default off.",
    ),
]
SafetyModelOpt = Annotated[
    str | None,
    typer.Option(
        "--safety-model",
        help="With --task-model: a full safety fine-tune of the aligned model, instead of "
        "--safety-adapter. Optional.",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(help="Select modules with round(ρ, 5) < THRESHOLD. Default 0.35 when no policy is given."),
]
TopKOpt = Annotated[
    int | None, typer.Option("--top-k", help="Select the K modules with the lowest ρ instead. No default.")
]
FractionOpt = Annotated[
    float | None,
    typer.Option(help="Select the lowest-ρ fraction of modules (⌈F·n⌉ of them) instead. No default."),
]
DeviceOpt = Annotated[
    Literal["cpu", "cuda", "auto"] | None,
    typer.Option(help="Where the math runs (auto: cuda when present). Default cpu."),
]
ForceOpt = Annotated[
    bool | None,
    typer.Option("--force", help="Replace an earlier safemerge output, never other files. Default off."),
]
PickleOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-pickle", help="Allow pickle (*.bin) checkpoints, loaded with weights_only=True. Default off."
    ),
]
PlotOpt = Annotated[bool | None, typer.Option("--plot/--no-plot", help="Write similarity.png. Default on.")]
AllowAnyWeightsOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-any-weights",
        help="Accept --weights outside [0, 1] or not summing to 1: the scale-only control 0.8,0, or a "
        "negative weight that subtracts an update. Default off.",
    ),
]
SeedOpt = Annotated[int | None, typer.Option(help="Seed of DARE masks and randomised SVD. Default 0.")]
RankOpt = Annotated[int | None, typer.Option(help="Output rank for TIES/DARE. Default r_task + r_safety.")]
MaxShardOpt = Annotated[str | None, typer.Option(help="Largest shard of a full model. Default 2GB.")]
MergeIntoBaseOpt = Annotated[
    bool | None,
    typer.Option(
        "--merge-into-base", help="Also write the full merged model to OUT/full_model. Default off."
    ),
]
AllowPartialOpt = Annotated[
    bool | None,
    typer.Option(
        "--allow-partial",
        help="Merge even when some selected modules have no counterpart in the safety adapter (they stay "
        "as fine-tuned; the report records it). Default off: such a merge is refused (exit 2).",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or summary table. Default off.")
]
RevisionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--revision",
        metavar="<input=rev>",
        help="Pin a hub input given as a flag to a branch, tag or commit: INPUT=REV (e.g. aligned=main, "
        "task-adapter=1a2b3c4), repeatable; the same as writing the input as owner/name@REV (the form a "
        "YAML config uses). The report records the commit each hub input resolved to. Optional.",
    ),
]
MergeMethodOpt = Annotated[
    MergeMethod | None,
    typer.Option(
        "--merge-method",
        help="The merge operator on selected modules; ties, dare_linear and dare_ties act on the full ΔW "
        "and re-factorise by truncated SVD. Default linear.",
    ),
]


def merge_method_of(options: dict[str, Any]) -> str | None:
    """`--merge-method`, or its deprecated spelling `--method` (`safemerge merge`), with a warning;
    pops both from `options`."""
    new, old = options.pop("merge_method", None), options.pop("method", None)
    if old is not None:
        warnings.warn(
            "--method is deprecated; use --merge-method (the same operator)", SafemergeWarning, stacklevel=2
        )
        if new is not None and new != old:
            raise InputError(f"--merge-method {new} and --method {old} disagree; give --merge-method only")
    return new if new is not None else old


# The model and adapter inputs a `--revision INPUT=REV` may pin (those a command has).
HUB_INPUTS = ("aligned", "unaligned", "task_adapter", "task_model", "safety_adapter", "safety_model")


def given_options(ctx: typer.Context, *skip: str) -> dict[str, Any]:
    """The command's parsed options by parameter name (= config field name), Paths as strings, minus
    `skip` (options that steer the command rather than the config). Options left unset are None, so
    `load_config` lets the YAML file or the field default decide them."""
    skip = (*skip, "config", "config_pos")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in ctx.params.items() if k not in skip}


def pin_revisions(options: dict[str, Any], pins: list[str] | None) -> dict[str, Any]:
    """`--revision INPUT=REV` applied to the flags in `options`: the input becomes `ID@REV`
    (`checkpoint.resolve_local_dir` reads that form), so the resolved config records the pin."""
    options = {k: v for k, v in options.items() if k != "revision"}
    inputs = [k for k in HUB_INPUTS if k in options]
    for pin in pins or []:
        name, sep, rev = pin.partition("=")
        key = name.strip().lstrip("-").replace("-", "_")
        flag = "--" + key.replace("_", "-")
        if not sep or not rev.strip() or not key:
            raise InputError(f"--revision {pin}: expected INPUT=REV, e.g. --revision aligned=main")
        if key not in inputs:
            known = ", ".join(k.replace("_", "-") for k in inputs)
            raise InputError(f"--revision {pin}: no input {name!r} (this command's inputs: {known})")
        value = options[key]
        if value is None:
            raise InputError(
                f"--revision {pin}: give {flag} on the command line too (in a YAML config, write the "
                "input as owner/name@REV)"
            )
        if Path(value).expanduser().exists():
            raise InputError(f"--revision {pin}: {flag} {value} is a local directory; revisions pin hub ids")
        if split_revision(value)[1] is not None:
            raise InputError(f"--revision {pin}: {flag} {value} already names a revision")
        options[key] = f"{value}@{rev.strip()}"
    return options


# --- train / eval ------------------------------------------------------------------------------------
ModelOpt = Annotated[
    str | None, typer.Option(help="Base model: local dir, hub id, or `smollm2` (packaged). Required.")
]
TrustRemoteCodeOpt = Annotated[bool | None, typer.Option(help="Allow model code from the hub. Default off.")]
