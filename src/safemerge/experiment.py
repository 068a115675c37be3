"""`safemerge experiment CONFIG.yaml`: every defence × hyperparameter cell on one setup, evaluated and
tabulated (results.csv / results.md / results.json, pareto.png), cached and resumable.

Layout of the output directory:

    adapters/{task,safety}/      adapters trained from recipes (when the setup gives recipes)
    variants/<cell>/             each cell's output: adapter or full model + report + cell.json
    evals/<cell>/                metrics.json, generations.jsonl, eval.json of each evaluated row
    results.{csv,md,json}, pareto.png

A cell is keyed by a hash of its resolved settings and the fingerprints of its inputs (`cell.json`);
an evaluation by the cell key and a hash of the evaluation settings (`eval.json`). A rerun recomputes
only cells whose key changed or whose files are missing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console

from safemerge.defenses.config import METHODS, DefendConfig
from safemerge.errors import InputError

Method = Literal["safemerge", "merge-all", "safelora", "resta", "none", "safeinstr"]
PLACEHOLDER_OUT = "<variant directory>"
CELL_JSON = "cell.json"
EVAL_JSON = "eval.json"
console = Console(stderr=True)


# --- configuration -----------------------------------------------------------------------------------
class SetupConfig(BaseModel):
    """The models and adapters: adapters are given as paths, or as training recipes for `safemerge train`."""

    model_config = ConfigDict(extra="forbid")

    aligned: str = Field(description="aligned model (directory or hub id); adapters are trained on it")
    unaligned: str = Field(description="unaligned (pre-alignment) model (directory or hub id)")
    task_adapter: str | None = Field(None, description="the fine-tuned task LoRA")
    task_train: dict[str, Any] | None = Field(
        None, description="TrainConfig fields (no model/out) for the task LoRA"
    )
    safety_adapter: str | None = Field(None, description="the safety LoRA")
    safety_train: dict[str, Any] | None = Field(None, description="TrainConfig fields for the safety LoRA")

    @model_validator(mode="after")
    def _one_source(self) -> SetupConfig:
        if (self.task_adapter is None) == (self.task_train is None):
            raise ValueError("give exactly one of setup.task_adapter and setup.task_train")
        if self.safety_adapter is not None and self.safety_train is not None:
            raise ValueError("give at most one of setup.safety_adapter and setup.safety_train")
        return self


class DefenseSpec(BaseModel):
    """One defence: fixed `options` and a `grid` (every combination of the listed values is one cell)."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    name: str | None = Field(None, description="row label (default: the method)")
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class EvaluationSpec(BaseModel):
    """How every variant is evaluated (the fields of `safemerge eval`)."""

    model_config = ConfigDict(extra="forbid")

    benchmarks: list[str] = Field(min_length=1)
    judge: Literal["keyword", "llama-guard"] = "keyword"
    judge_model: str = "meta-llama/Llama-Guard-3-8B"
    backend: Literal["transformers", "vllm"] = "transformers"
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    include_aligned: bool = Field(True, description="also evaluate the aligned model itself (row 'aligned')")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    trust_remote_code: bool = False
    cache_dir: str | None = Field(None, description="generation cache (default OUT/cache)")

    def key_settings(self) -> dict[str, Any]:
        """What changes the numbers (not batch size, parallelism or where the cache lives)."""
        return self.model_dump(
            mode="json",
            include={"benchmarks", "judge", "judge_model", "backend", "limit", "max_new_tokens", "dtype"},
        )


class ExperimentConfig(BaseModel):
    """A whole comparison: one setup, a list of defences with grids, one evaluation."""

    model_config = ConfigDict(extra="forbid")

    name: str = "experiment"
    out: str | None = Field(None, description="output directory (or --out)")
    setup: SetupConfig
    defenses: list[DefenseSpec] = Field(min_length=1)
    evaluation: EvaluationSpec
    device: Literal["cpu", "cuda", "auto"] = Field("cpu", description="where the defences' math runs")
    expected_runtime: str | None = Field(None, description="free text, for the reader")
    reference: dict[str, Any] | None = Field(None, description="published numbers to compare with (not used)")


# --- cells -------------------------------------------------------------------------------------------
@dataclass
class Cell:
    """One row of the results table: a defence at one grid point (or the aligned model itself)."""

    label: str
    method: str
    point: dict[str, Any]  # the grid values of this cell
    settings: dict[str, Any]  # all resolved settings (what the key hashes)
    slug: str
    inputs: tuple[str, ...]  # which inputs the output depends on
    defend: DefendConfig | None = None
    train: dict[str, Any] | None = None  # safeinstr: the TrainConfig fields
    key: str = ""
    status: str = ""
    name: str = ""  # the defence's row name (label without the grid values)
    given: dict[str, Any] = field(default_factory=dict)  # options + grid values as written in the config

    def __post_init__(self) -> None:
        self.name = self.name or self.label


@dataclass
class ExperimentResult:
    """What a run did: every cell with its status, which cells were computed and evaluated, the rows."""

    out: Path
    cells: list[Cell]
    computed: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def slugify(text: str) -> str:
    """A directory name from a label: `safemerge (threshold=0.35)` → `safemerge_threshold-0.35`."""
    s = re.sub(r"[=,/ ]+", "-", text.replace(" (", "_").replace("(", "_").replace(")", ""))
    s = re.sub(r"[^A-Za-z0-9._+-]+", "", s)
    return re.sub(r"-+", "-", s).strip("-_.") or "cell"


def _fmt_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "/".join(_fmt_value(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())


def trained_adapter_dir(out: Path, role: str) -> Path:
    return out / "adapters" / role


def train_settings(cfg: ExperimentConfig, fields: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated TrainConfig fields (model = the aligned model) for a recipe; InputError when wrong."""
    from safemerge.train.config import TrainConfig
    from safemerge.train.recipes import RECIPES

    bad = sorted({"model", "out", "force"} & set(fields))
    if bad:
        raise InputError(f"{where}: {', '.join(bad)} are set by the experiment, remove them")
    try:
        tc = TrainConfig(model=cfg.setup.aligned, out=Path(PLACEHOLDER_OUT), **fields)
    except ValidationError as exc:
        raise InputError(f"{where}: {_validation_message(exc)}") from None
    if tc.recipe not in RECIPES and not Path(tc.recipe).is_file():
        raise InputError(f"{where}: recipe {tc.recipe!r} is neither one of {', '.join(RECIPES)} nor a file")
    return tc.model_dump(mode="json", exclude={"out", "force"})


def expand_cells(cfg: ExperimentConfig, out: Path) -> list[Cell]:
    """Every cell of the config, validated (unknown options, empty grids, conflicts) before any work."""
    setup = cfg.setup
    task = setup.task_adapter or str(trained_adapter_dir(out, "task"))
    safety = setup.safety_adapter or (str(trained_adapter_dir(out, "safety")) if setup.safety_train else None)
    cells: list[Cell] = []
    if cfg.evaluation.include_aligned:
        cells.append(Cell("aligned", "aligned", {}, {"method": "aligned"}, "aligned", ("aligned",)))
    for i, spec in enumerate(cfg.defenses):
        where = f"defenses[{i}] ({spec.method})"
        overlap = sorted(set(spec.options) & set(spec.grid))
        if overlap:
            raise InputError(f"{where}: {', '.join(overlap)} given both in options and in grid")
        empty = [k for k, values in spec.grid.items() if not values]
        if empty:
            raise InputError(
                f"{where}: grid key(s) {', '.join(empty)} list no values, so the grid has no cells"
            )
        keys = list(spec.grid)
        for values in itertools.product(*(spec.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            base = spec.name or spec.method
            label = base + (
                f" ({', '.join(f'{k}={_fmt_value(v)}' for k, v in point.items())})" if point else ""
            )
            fields = {**spec.options, **point}
            if spec.method == "safeinstr":
                cells.append(_safeinstr_cell(cfg, label, point, fields, where))
                cells[-1].name, cells[-1].given = base, fields
                continue
            if spec.method in ("safemerge", "merge-all") and safety is None:
                raise InputError(
                    f"{where}: needs a safety adapter: give setup.safety_adapter or setup.safety_train"
                )
            try:
                dc = DefendConfig(
                    method=spec.method,
                    aligned=setup.aligned,
                    unaligned=setup.unaligned,
                    task_adapter=task,
                    out=PLACEHOLDER_OUT,
                    device=cfg.device,
                    **({"safety_adapter": safety} if spec.method in ("safemerge", "merge-all") else {}),
                    **fields,
                )
            except ValidationError as exc:
                raise InputError(f"{where}, cell {label!r}: {_validation_message(exc)}") from None
            except TypeError as exc:
                raise InputError(f"{where}, cell {label!r}: {exc}") from None
            inputs = ("aligned", "unaligned", "task") + (
                ("safety",) if spec.method in ("safemerge", "merge-all") else ()
            )
            cell = Cell(label, spec.method, point, dc.settings(), slugify(label), inputs, defend=dc)
            cell.name, cell.given = base, fields
            cells.append(cell)
    _check_unique(cells)
    return cells


def _safeinstr_cell(
    cfg: ExperimentConfig, label: str, point: dict[str, Any], fields: dict[str, Any], where: str
) -> Cell:
    """SafeInstr: the task recipe (setup.task_train) with `options`/`grid` fields on top (mix_safety > 0)."""
    base = dict(cfg.setup.task_train or {})
    if "recipe" not in base and "recipe" not in fields:
        raise InputError(
            f"{where}: safeinstr trains a task adapter; give setup.task_train or a recipe in options"
        )
    settings = train_settings(cfg, {**base, **fields}, where)
    if settings["mix_safety"] <= 0:
        raise InputError(f"{where}: safeinstr needs mix_safety > 0 (the number of safety examples mixed in)")
    return Cell(
        label,
        "safeinstr",
        point,
        {"method": "safeinstr", **settings},
        slugify(label),
        ("aligned",),
        train=settings,
    )


def _check_unique(cells: list[Cell]) -> None:
    seen: dict[str, str] = {}
    for c in cells:
        ident = _sha(c.settings)
        for what, value in (("settings", ident), ("directory name", c.slug)):
            tag = f"{what}:{value}"
            if tag in seen:
                raise InputError(
                    f"cells {seen[tag]!r} and {c.label!r} have the same {what}; give them distinct names"
                )
            seen[tag] = c.label


# --- validation of inputs ----------------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def check_inputs(cfg: ExperimentConfig) -> None:
    """Local inputs must exist, benchmarks must be known (hub ids are accepted as they are)."""
    from safemerge.evaluate.benchmarks import BENCHMARKS

    s = cfg.setup
    for what, name in (("aligned", s.aligned), ("unaligned", s.unaligned), ("task_adapter", s.task_adapter),
                       ("safety_adapter", s.safety_adapter)):  # fmt: skip
        local = name is not None and name not in ("smollm2", "packaged:smollm2") and _looks_local(name)
        if local and not Path(str(name)).expanduser().is_dir():
            raise InputError(f"setup.{what}: {name} is not a directory (and not a hub id owner/name)")
    for b in cfg.evaluation.benchmarks:
        if b not in BENCHMARKS and not (b.endswith((".jsonl", ".json")) and Path(b).is_file()):
            raise InputError(
                f"evaluation.benchmarks: unknown benchmark {b!r} "
                f"(use {', '.join(BENCHMARKS)} or a .jsonl file)"
            )


def parse_experiment(path: Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"invalid experiment config {path}: {_validation_message(exc)}") from None
    return cfg


def prepare(cfg: ExperimentConfig, out: Path | None = None) -> tuple[Path, list[Cell]]:
    """The output directory and every cell, validated; everything that can fail without work fails here."""
    target = out or (Path(cfg.out) if cfg.out else None)
    if target is None:
        raise InputError(
            f"experiment {cfg.name!r}: no output directory: set `out:` in the config or pass --out"
        )
    if cfg.setup.task_train is not None:
        train_settings(cfg, cfg.setup.task_train, "setup.task_train")
    if cfg.setup.safety_train is not None:
        train_settings(cfg, cfg.setup.safety_train, "setup.safety_train")
    cells = expand_cells(cfg, target)
    check_inputs(cfg)
    return target, cells


def load_experiment(path: Path, out: Path | None = None) -> tuple[ExperimentConfig, Path, list[Cell]]:
    """Parse and validate a config file and expand its cells (no work is done)."""
    cfg = parse_experiment(path)
    target, cells = prepare(cfg, out)
    return cfg, target, cells


# --- fingerprints and keys ---------------------------------------------------------------------------
def model_fingerprint(name: str, allow_download: bool) -> str:
    """Checkpoint fingerprint of a local directory or a hub snapshot (the local cache only in dry runs)."""
    from safemerge.checkpoint import Checkpoint, resolve_local_dir
    from safemerge.packaged import resolve_model

    local = resolve_model(name) if name in ("smollm2", "packaged:smollm2") else name
    if not Path(local).is_dir():
        if not allow_download:
            try:
                from huggingface_hub import snapshot_download

                local = snapshot_download(repo_id=name, local_files_only=True)
            except Exception:
                return f"hub:{name} (not in the local cache)"
        else:
            local = str(resolve_local_dir(name)[0])
    return Checkpoint(Path(local)).fingerprint()


def adapter_fingerprint(path: str, train: dict[str, Any] | None) -> str:
    """Content hash of an adapter; for one still to be trained, the hash of its training settings."""
    from safemerge.evaluate.cache import fingerprint_adapter

    if Path(path, "adapter_model.safetensors").is_file():
        return fingerprint_adapter(path)
    if train is not None:
        return f"train:{_sha(train)}"
    return f"missing:{path}"


def assign_keys(cfg: ExperimentConfig, out: Path, cells: list[Cell], allow_download: bool) -> None:
    s = cfg.setup
    fps = {
        "aligned": model_fingerprint(s.aligned, allow_download),
        "unaligned": model_fingerprint(s.unaligned, allow_download)
        if any("unaligned" in c.inputs for c in cells)
        else "",
        "task": adapter_fingerprint(
            s.task_adapter or str(trained_adapter_dir(out, "task")), _train_of(cfg, "task")
        ),
        "safety": adapter_fingerprint(
            s.safety_adapter or str(trained_adapter_dir(out, "safety")), _train_of(cfg, "safety")
        ),
    }
    for c in cells:
        c.key = _sha({"settings": c.settings, "inputs": {k: fps[k] for k in c.inputs}})


def _train_of(cfg: ExperimentConfig, role: str) -> dict[str, Any] | None:
    fields = cfg.setup.task_train if role == "task" else cfg.setup.safety_train
    return None if fields is None else train_settings(cfg, fields, f"setup.{role}_train")


def eval_key(cfg: ExperimentConfig, cell: Cell) -> str:
    return _sha({"cell": cell.key, "evaluation": cfg.evaluation.key_settings()})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def variant_dir(out: Path, cell: Cell) -> Path:
    return out / "variants" / cell.slug


def eval_dir(cfg: ExperimentConfig, out: Path, cell: Cell) -> Path:
    """One directory per (cell, evaluation settings): switching evaluations back never re-evaluates."""
    return out / "evals" / cell.slug / eval_key(cfg, cell)[:12]


def variant_done(out: Path, cell: Cell) -> bool:
    if cell.method == "aligned":
        return True
    stamp = _read_json(variant_dir(out, cell) / CELL_JSON)
    return stamp is not None and stamp.get("key") == cell.key


def eval_done(cfg: ExperimentConfig, out: Path, cell: Cell) -> bool:
    stamp = _read_json(eval_dir(cfg, out, cell) / EVAL_JSON)
    return (
        stamp is not None
        and stamp.get("key") == eval_key(cfg, cell)
        and (eval_dir(cfg, out, cell) / "metrics.json").is_file()
    )


def set_status(cfg: ExperimentConfig, out: Path, cells: list[Cell]) -> None:
    for c in cells:
        if not variant_done(out, c):
            c.status = "to run"
        elif not eval_done(cfg, out, c):
            c.status = "to evaluate"
        else:
            c.status = "cached"


# --- running -----------------------------------------------------------------------------------------
def train_inputs(cfg: ExperimentConfig, out: Path, progress: bool) -> list[str]:
    """Train the task / safety adapters the setup gives as recipes (skipped when already trained)."""
    from safemerge.train import TrainConfig, train

    done = []
    for role in ("task", "safety"):
        settings = _train_of(cfg, role)
        if settings is None:
            continue
        target = trained_adapter_dir(out, role)
        stamp = _read_json(target / "train.json")
        if (
            stamp is not None
            and stamp.get("key") == _sha(settings)
            and (target / "adapter_model.safetensors").is_file()
        ):
            continue
        console.print(f"training the {role} adapter ({settings['recipe']}) → {target}", highlight=False)
        train(TrainConfig(**{**settings, "out": target, "force": True}))
        (target / "train.json").write_text(
            json.dumps({"key": _sha(settings), "settings": settings}, indent=2) + "\n"
        )
        done.append(role)
    return done


def run_cell(cell: Cell, out: Path, progress: bool) -> None:
    """Compute one cell's variant (defence output, or a SafeInstr adapter) and stamp it with its key."""
    from safemerge.defenses import defend

    target = variant_dir(out, cell)
    if cell.train is not None:
        from safemerge.train import TrainConfig, train

        train(TrainConfig(**{**cell.train, "out": target, "force": True}))
    else:
        assert cell.defend is not None
        defend(cell.defend.model_copy(update={"out": str(target), "force": True}), progress=progress)
    stamp = {"key": cell.key, "label": cell.label, "settings": cell.settings}
    (target / CELL_JSON).write_text(json.dumps(stamp, indent=2) + "\n")


def variant_is_model(out: Path, cell: Cell) -> bool:
    """True when the variant is a full model (RESTA), evaluated on its own rather than as an adapter."""
    return cell.method != "aligned" and (variant_dir(out, cell) / "config.json").is_file()


def evaluate_cells(cfg: ExperimentConfig, out: Path, cells: list[Cell]) -> None:
    """Evaluate cells: adapters on one loaded aligned model (with the aligned row), full models one by one."""
    adapters = [c for c in cells if c.method != "aligned" and not variant_is_model(out, c)]
    aligned = [c for c in cells if c.method == "aligned"]
    if adapters or aligned:
        variants = {str(variant_dir(out, c)): c for c in adapters}
        _evaluate_batch(cfg, out, cfg.setup.aligned, variants, aligned[0] if aligned else None)
    for c in cells:
        if c.method != "aligned" and variant_is_model(out, c):
            _evaluate_batch(cfg, out, str(variant_dir(out, c)), {}, c)


def _evaluate_batch(
    cfg: ExperimentConfig, out: Path, model: str, adapters: dict[str, Cell], base_cell: Cell | None
) -> None:
    from safemerge.evaluate import EvalConfig, evaluate

    ev = cfg.evaluation
    batch = out / "evals" / f".batch-{_sha([model, sorted(adapters)])[:12]}"
    shutil.rmtree(batch, ignore_errors=True)
    ecfg = EvalConfig(
        model=model,
        adapters=list(adapters),
        benchmarks=ev.benchmarks,
        out=batch,
        judge=ev.judge,
        judge_model=ev.judge_model,
        backend=ev.backend,
        limit=ev.limit,
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        include_base=base_cell is not None,
        tensor_parallel_size=ev.tensor_parallel_size,
        gpu_memory_utilization=ev.gpu_memory_utilization,
        dtype=ev.dtype,
        cache_dir=Path(ev.cache_dir) if ev.cache_dir else out / "cache",
        trust_remote_code=ev.trust_remote_code,
    )
    metrics = evaluate(ecfg)
    records = [
        json.loads(line) for line in (batch / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    owners = dict(adapters)
    if base_cell is not None:
        owners[model] = base_cell
    for key, cell in owners.items():
        target = eval_dir(cfg, out, cell)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        with (target / "generations.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                if r["variant"] == key:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (target / "metrics.json").write_text(json.dumps(metrics[key]["benchmarks"], indent=2) + "\n")
        stamp = {
            "key": eval_key(cfg, cell),
            "cell": cell.key,
            "evaluation": ev.key_settings(),
            "label": cell.label,
        }
        (target / EVAL_JSON).write_text(json.dumps(stamp, indent=2) + "\n")
    shutil.rmtree(batch, ignore_errors=True)


def run_experiment(
    config: Path | ExperimentConfig,
    out: Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    limit: int | None = None,
) -> ExperimentResult:
    """Validate the config (a YAML path or an `ExperimentConfig`), then (unless `dry_run`) compute and
    evaluate every cell not yet cached. `limit` overrides `evaluation.limit`."""
    from safemerge.experiment_results import print_cells, write_results

    cfg = config if isinstance(config, ExperimentConfig) else parse_experiment(config)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be positive, got {limit}")
        cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"limit": limit})})
    target, cells = prepare(cfg, out)
    assign_keys(cfg, target, cells, allow_download=not dry_run)
    set_status(cfg, target, cells)
    result = ExperimentResult(target, cells)
    if dry_run:
        print_cells(cells, Console())
        return result
    target.mkdir(parents=True, exist_ok=True)
    (target / "experiment.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    result.trained = train_inputs(cfg, target, progress)
    if result.trained:  # the adapters' content changed: keys depend on it
        assign_keys(cfg, target, cells, allow_download=True)
        set_status(cfg, target, cells)
    for c in cells:
        if not variant_done(target, c):
            console.print(f"computing {c.label}", highlight=False)
            run_cell(c, target, progress)
            result.computed.append(c.label)
    todo = [c for c in cells if not eval_done(cfg, target, c)]
    if todo:
        console.print(
            f"evaluating {len(todo)} variant(s): {', '.join(c.label for c in todo)}", highlight=False
        )
        evaluate_cells(cfg, target, todo)
        result.evaluated = [c.label for c in todo]
    set_status(cfg, target, cells)
    result.rows = write_results(cfg, target, cells)
    return result


# --- CLI ---------------------------------------------------------------------------------------------
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
    from safemerge.cliutils import run_guarded

    def body() -> None:
        result = run_experiment(config, out, dry_run=dry_run, progress=not quiet, limit=limit)
        if not dry_run:
            from safemerge.experiment_results import print_rows

            print_rows(result.rows, Console())
            Console().print(
                f"computed {len(result.computed)} cell(s), evaluated {len(result.evaluated)}; "
                f"results in {result.out}/results.md",
                highlight=False,
            )

    run_guarded(body)


__all__ = [
    "METHODS",
    "Cell",
    "ExperimentConfig",
    "ExperimentResult",
    "expand_cells",
    "experiment_command",
    "load_experiment",
    "parse_experiment",
    "prepare",
    "run_experiment",
]
