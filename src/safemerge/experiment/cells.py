"""The cells of an experiment (every defence × grid point), their cache keys and their status.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from safemerge.common.errors import InputError
from safemerge.common.packaged import resolve_model
from safemerge.defenses.config import DefendConfig
from safemerge.engine.checkpoint import Checkpoint, resolve_local_dir
from safemerge.evaluate.benchmarks import BENCHMARKS
from safemerge.evaluate.cache import fingerprint_adapter
from safemerge.experiment.config import ExperimentConfig, parse_experiment, validation_message
from safemerge.train.config import TrainConfig
from safemerge.train.recipes import RECIPES

PLACEHOLDER_OUT = "<variant directory>"
CELL_JSON = "cell.json"
EVAL_JSON = "eval.json"


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


def trained_adapter_dir(out: Path, role: str) -> Path:
    return out / "adapters" / role


def train_settings(cfg: ExperimentConfig, fields: dict[str, Any], where: str) -> dict[str, Any]:
    """Validated TrainConfig fields (model = the aligned model) for a recipe; InputError when wrong."""
    bad = sorted({"model", "out", "force"} & set(fields))
    if bad:
        raise InputError(f"{where}: {', '.join(bad)} are set by the experiment, remove them")
    try:
        tc = TrainConfig(model=cfg.setup.aligned, out=Path(PLACEHOLDER_OUT), **fields)
    except ValidationError as exc:
        raise InputError(f"{where}: {validation_message(exc)}") from None
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
                dc = DefendConfig.from_flat(
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
                raise InputError(f"{where}, cell {label!r}: {validation_message(exc)}") from None
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


