"""The cells of an experiment (every defence × grid point), their cache keys and their status.

Layout of the output directory:

    adapters/{task,safety}/      adapters trained from recipes (when the setup gives recipes)
    variants/<cell>/             each cell's output: adapter or full model + report + cell.json
    evals/<cell>/<key>/          metrics.json, generations.jsonl (every prompt, response and verdict),
                                 eval.json of each evaluated row; `validation-<key>/` on validation
    results.{csv,md,json}, pareto.png

A cell is keyed by a hash of its resolved settings and the fingerprints of its inputs (`cell.json`);
an evaluation by the cell key and a hash of the evaluation settings (`eval.json`). A rerun recomputes
only cells whose key changed or whose files are missing.

Roles: a `row` is evaluated on the test benchmarks and tabulated; a `candidate` (a grid cell of a
defence with `choose`) is evaluated on validation only until it is `chosen`; `derived` cells (controls
of the chosen cell) are made after the choice and evaluated on test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from safemerge.common.config_io import validation_message
from safemerge.common.errors import InputError
from safemerge.common.packaged import is_packaged_alias, resolve_model
from safemerge.defenses import DefendConfig, get_defense
from safemerge.engine.checkpoint import Checkpoint, resolve_local_dir
from safemerge.evaluate.benchmarks import Benchmark, benchmark_names
from safemerge.evaluate.benchmarks import benchmark_kind as registered_kind
from safemerge.evaluate.cache import fingerprint_adapter
from safemerge.experiment.choice import Choice
from safemerge.experiment.config import (
    BenchmarkSpec,
    DefenseSpec,
    ExperimentConfig,
    entry_name,
)
from safemerge.train.config import ALL_LINEAR, TrainConfig
from safemerge.train.recipes import RECIPES

PLACEHOLDER_OUT = "<variant directory>"
CELL_JSON = "cell.json"
EVAL_JSON = "eval.json"
SELECTION_KEYS = ("threshold", "top_k", "fraction")
ADAPTER_INPUT = "adapter:"  # prefix of an input that is an adapter given by path (a prebuilt SafeInstr)


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
    role: str = "row"  # row | candidate | chosen | derived (module docstring)
    spec: int | None = None  # index of the defence in cfg.defenses (None: aligned / unaligned rows)
    control: str | None = None  # derived cells: which control of the chosen cell
    draw: int | None = None  # the `random` control: which draw (index into choose.random_seeds)
    validates: bool = False  # evaluated on the validation benchmarks too

    def __post_init__(self) -> None:
        self.name = self.name or self.label

    @property
    def tabulated(self) -> bool:
        """Whether the cell is a row of the test table (candidates only once chosen)."""
        return self.role != "candidate"


@dataclass
class ExperimentResult:
    """What a run did: every cell with its status, which cells were computed and evaluated, the rows."""

    out: Path
    cells: list[Cell]
    computed: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    rows: list[dict[str, Any]] = field(default_factory=list)
    plans: dict[str, EvalPlan] = field(default_factory=dict)  # "test" and, with validation, "validation"
    failed: dict[str, str] = field(default_factory=dict)  # label → error of a cell that kept failing (Ray)

    @property
    def table(self) -> list[Cell]:
        """The rows of the test table, in order."""
        return [c for c in self.cells if c.tabulated]


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


def _label(base: str, point: dict[str, Any]) -> str:
    return base + (f" ({', '.join(f'{k}={_fmt_value(v)}' for k, v in point.items())})" if point else "")


def benchmark_kind(name: str) -> str | None:
    """The kind of a benchmark known by name (from the registry; an existing JSONL file is a harm set),
    None when unknown. The one place the experiment asks the registry about a name it has not loaded;
    a loaded benchmark's kind is its `Benchmark.kind`."""
    if name.endswith((".jsonl", ".json")) and Path(name).is_file():
        return "harm"
    return registered_kind(name) if name in benchmark_names() else None


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


def _model_rows(cfg: ExperimentConfig) -> list[Cell]:
    """The rows of the models themselves: the unaligned and the aligned model, when asked for."""
    rows = []
    if cfg.evaluation.include_unaligned:
        rows.append(Cell("unaligned", "unaligned", {}, {"method": "unaligned"}, "unaligned", ("unaligned",)))
    if cfg.evaluation.include_aligned:
        rows.append(Cell("aligned", "aligned", {}, {"method": "aligned"}, "aligned", ("aligned",)))
    return rows


def _check_grid(spec: DefenseSpec, where: str) -> None:
    overlap = sorted(set(spec.options) & set(spec.grid))
    if overlap:
        raise InputError(f"{where}: {', '.join(overlap)} given both in options and in grid")
    empty = [k for k, values in spec.grid.items() if not values]
    if empty:
        raise InputError(f"{where}: grid key(s) {', '.join(empty)} list no values, so the grid has no cells")


def _adapters(cfg: ExperimentConfig, out: Path) -> tuple[str, str | None]:
    """The task and safety adapter paths (trained ones live under OUT/adapters)."""
    setup = cfg.setup
    task = setup.task_adapter or str(trained_adapter_dir(out, "task"))
    safety = setup.safety_adapter or (str(trained_adapter_dir(out, "safety")) if setup.safety_train else None)
    return task, safety


def defence_cell(
    cfg: ExperimentConfig, out: Path, method: str, label: str, fields: dict[str, Any], where: str
) -> Cell:
    """A cell computed by `safemerge defend` (every method but safeinstr), validated."""
    task, safety = _adapters(cfg, out)
    merges = "safety_adapter" in get_defense(method).needs
    if merges and safety is None:
        raise InputError(f"{where}: needs a safety adapter: give setup.safety_adapter or setup.safety_train")
    try:
        dc = DefendConfig.from_flat(
            method=method,
            aligned=cfg.setup.aligned,
            unaligned=cfg.setup.unaligned,
            task_adapter=task,
            out=PLACEHOLDER_OUT,
            device=cfg.device,
            **({"safety_adapter": safety} if merges else {}),
            **fields,
        )
    except ValidationError as exc:
        raise InputError(f"{where}, cell {label!r}: {validation_message(exc, DefendConfig)}") from None
    except TypeError as exc:
        raise InputError(f"{where}, cell {label!r}: {exc}") from None
    inputs = ("aligned", "unaligned", "task") + (("safety",) if merges else ())
    return Cell(label, method, {}, dc.settings(), slugify(label), inputs, defend=dc)


def spec_cells(cfg: ExperimentConfig, out: Path, i: int) -> list[Cell]:
    """The cells of `cfg.defenses[i]`: one per grid point (candidates when the defence chooses one)."""
    spec = cfg.defenses[i]
    where = f"defenses[{i}] ({spec.method})"
    _check_grid(spec, where)
    base = spec.name or spec.method
    keys = list(spec.grid)
    cells = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        label, fields = _label(base, point), {**spec.options, **point}
        if spec.method == "safeinstr":
            cell = _safeinstr_cell(cfg, label, fields, where)
        else:
            cell = defence_cell(cfg, out, spec.method, label, fields, where)
        cell.point, cell.name, cell.given, cell.spec = point, base, fields, i
        if spec.choose is not None:
            cell.role, cell.validates = "candidate", True
        cells.append(cell)
    return cells


def expand_cells(cfg: ExperimentConfig, out: Path) -> list[Cell]:
    """Every cell of the config, validated (unknown options, empty grids, conflicts) before any work."""
    cells = _model_rows(cfg)
    for i in range(len(cfg.defenses)):
        cells += spec_cells(cfg, out, i)
    _check_unique(cells)
    _check_row_references(cfg, cells)
    return cells


def derive_cells(cfg: ExperimentConfig, out: Path, chosen: Cell) -> list[Cell]:
    """The controls `choose.controls` asks for, built from the chosen cell's settings.

    `scale-only`: the chosen cell with safety weight 0 (the same modules shrunk, no safety LoRA);
    `merge-all`: the chosen weights (and merge options) on every module; `inverse` and `random`: the
    chosen merge on as many modules as the chosen cell merged, the highest-ρ ones or one seeded uniform
    draw per `choose.random_seeds` (`selection_control_cells`)."""
    assert chosen.spec is not None and chosen.defend is not None
    spec = cfg.defenses[chosen.spec]
    assert spec.choose is not None
    out_cells = []
    for control in spec.choose.controls:
        if control in ("inverse", "random"):
            out_cells += selection_control_cells(cfg, out, chosen, control)
            continue
        where = f"defenses[{chosen.spec}] ({spec.method}), {control} of {chosen.label!r}"
        if control == "scale-only":
            w_task = chosen.defend.model_dump()["weights"][0]  # the resolved weights (flat dump)
            method, fields = "safemerge", {**chosen.given, "weights": [w_task, 0.0]}
            point = {**chosen.point, "weights": fields["weights"]}
        else:
            method = "merge-all"
            fields = {k: v for k, v in chosen.given.items() if k not in SELECTION_KEYS}
            point = {k: v for k, v in chosen.point.items() if k in fields}
        name = f"{chosen.name} {control}"
        # the control's weights (w_task, 0) are not a convex pair: permitted here, not shown in tables
        permit = {"allow_any_weights": True} if control == "scale-only" else {}
        cell = defence_cell(cfg, out, method, _label(name, point), fields | permit, where)
        cell.point, cell.name, cell.given, cell.spec = point, name, fields, chosen.spec
        cell.role, cell.control = "derived", control
        out_cells.append(cell)
    return out_cells


def chosen_count(out: Path, chosen: Cell) -> int:
    """How many modules the chosen cell merged (its variant's report, written before the choice)."""
    path = variant_dir(out, chosen) / "safemerge_report.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["summary"]["merged"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InputError(f"{chosen.label}: cannot read how many modules it merged from {path}") from None


def selection_control_cells(cfg: ExperimentConfig, out: Path, chosen: Cell, control: str) -> list[Cell]:
    """The selection controls of the chosen cell: its merge (weights and merge options) on k modules,
    k = the number it merged — `inverse`: the k highest-ρ modules (`order: highest`); `random`: one
    uniform draw of k per seed of `choose.random_seeds` (`order: random`). None when it merged nothing
    (the control would be the task adapter itself)."""
    assert chosen.spec is not None
    spec = cfg.defenses[chosen.spec]
    assert spec.choose is not None
    k = chosen_count(out, chosen)
    if k == 0:
        return []
    base = {key: v for key, v in chosen.given.items() if key not in SELECTION_KEYS}
    kept = {key: v for key, v in chosen.point.items() if key not in SELECTION_KEYS}
    draws: list[tuple[int | None, dict[str, Any]]] = (
        [(None, {"order": "highest"})]
        if control == "inverse"
        else [(i, {"order": "random", "order_seed": s}) for i, s in enumerate(spec.choose.random_seeds)]
    )
    cells = []
    for draw, order in draws:
        fields = {**base, "top_k": k, **order}
        point = {"top_k": k, **({"order_seed": order["order_seed"]} if draw is not None else {}), **kept}
        name = f"{chosen.name} {control}"
        where = f"defenses[{chosen.spec}] ({spec.method}), {control} of {chosen.label!r}"
        cell = defence_cell(cfg, out, "safemerge", _label(name, point), fields, where)
        cell.point, cell.name, cell.given, cell.spec = point, name, fields, chosen.spec
        cell.role, cell.control, cell.draw = "derived", control, draw
        cells.append(cell)
    return cells


def _safeinstr_cell(cfg: ExperimentConfig, label: str, fields: dict[str, Any], where: str) -> Cell:
    """SafeInstr: a given adapter (`adapter: PATH`, e.g. trained elsewhere with safety data mixed in), or
    the task recipe (setup.task_train) with `options`/`grid` fields on top (mix_safety > 0)."""
    if "adapter" in fields:
        return _given_safeinstr_cell(cfg, label, fields, where)
    base = dict(cfg.setup.task_train or {})
    if "recipe" not in base and "recipe" not in fields:
        raise InputError(
            f"{where}: safeinstr trains a task adapter; give setup.task_train or a recipe in options "
            "(or a trained adapter as `adapter: PATH`)"
        )
    settings = train_settings(cfg, {**base, **fields}, where)
    if settings["mix_safety"] <= 0:
        raise InputError(f"{where}: safeinstr needs mix_safety > 0 (the number of safety examples mixed in)")
    return Cell(
        label,
        "safeinstr",
        {},
        {"method": "safeinstr", **settings},
        slugify(label),
        ("aligned",),
        train=settings,
    )


def _given_safeinstr_cell(cfg: ExperimentConfig, label: str, fields: dict[str, Any], where: str) -> Cell:
    """A SafeInstr adapter given by path: copied as it is (`defend --method none`, with its ρ report)."""
    extra = sorted(set(fields) - {"adapter"})
    if extra:
        raise InputError(f"{where}: a safeinstr `adapter` is used as given; remove {', '.join(extra)}")
    path = str(fields["adapter"])
    dc = DefendConfig.from_flat(
        method="none",
        aligned=cfg.setup.aligned,
        unaligned=cfg.setup.unaligned,
        task_adapter=path,
        out=PLACEHOLDER_OUT,
        device=cfg.device,
    )
    settings = {"method": "safeinstr", "adapter": path}
    inputs = ("aligned", "unaligned", ADAPTER_INPUT + path)
    return Cell(label, "safeinstr", {}, settings, slugify(label), inputs, defend=dc)


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


def check_derived(cells: list[Cell], derived: list[Cell]) -> None:
    """Derived cells may repeat another cell's settings (a merge-all row, say), not its directory."""
    slugs = {c.slug: c.label for c in cells}
    for d in derived:
        if d.slug in slugs:
            raise InputError(
                f"derived cell {d.label!r} has the directory name of {slugs[d.slug]!r}; rename one"
            )


def _check_row_references(cfg: ExperimentConfig, cells: list[Cell]) -> None:
    """`choose.reference`, `validate_also` and `flips_vs` must name rows (not candidates); mark them."""
    rows = {c.label: c for c in cells if c.role == "row"}
    ev = cfg.evaluation
    named = [(f"defenses[{i}].choose.reference", d.choose.reference) for i, d in enumerate(cfg.defenses)
             if d.choose is not None]  # fmt: skip
    named += [("evaluation.validate_also", label) for label in ev.validate_also]
    for where, label in named:
        if label not in rows:
            raise InputError(f"{where}: no row is labelled {label!r} (rows: {', '.join(rows)})")
        rows[label].validates = True
    if ev.flips_vs is not None and ev.flips_vs not in rows:
        raise InputError(f"evaluation.flips_vs: no row is labelled {ev.flips_vs!r} (rows: {', '.join(rows)})")


# --- validation of inputs ----------------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def check_inputs(cfg: ExperimentConfig, cells: list[Cell], provided: Mapping[str, Benchmark]) -> None:
    """Local inputs must exist, benchmarks must be known (hub ids are accepted as they are)."""
    s = cfg.setup
    given = [(f"setup.{what}", name) for what, name in (("aligned", s.aligned), ("unaligned", s.unaligned),
             ("task_adapter", s.task_adapter), ("safety_adapter", s.safety_adapter))]  # fmt: skip
    given += [(f"{c.label}: adapter", i[len(ADAPTER_INPUT) :]) for c in cells for i in c.inputs
              if i.startswith(ADAPTER_INPUT)]  # fmt: skip
    for where, name in given:
        local = name is not None and not is_packaged_alias(name) and _looks_local(name)
        if local and not Path(str(name)).expanduser().is_dir():
            raise InputError(f"{where}: {name} is not a directory (and not a hub id owner/name)")
    ev = cfg.evaluation
    for what, entries in (("benchmarks", ev.benchmarks), ("validation", ev.validation)):
        for b in map(entry_name, entries):
            if b not in provided and benchmark_kind(b) is None:
                raise InputError(
                    f"evaluation.{what}: unknown benchmark {b!r} "
                    f"(use {', '.join(benchmark_names())} or a .jsonl file)"
                )


def prepare(
    cfg: ExperimentConfig, out: Path | None = None, provided: Mapping[str, Benchmark] | None = None
) -> tuple[Path, list[Cell]]:
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
    check_safety_targets(cfg, cells)
    check_inputs(cfg, cells, provided or {})
    return target, cells


def check_safety_targets(cfg: ExperimentConfig, cells: list[Cell]) -> None:
    """A merge refuses selected modules the safety adapter lacks (docs/engine.md, "Partial merges"): when
    the setup trains both adapters, the safety recipe must target every module type the task recipe does,
    unless each merging cell sets `allow_partial` — checked here, before any adapter is trained."""
    task, safety = cfg.setup.task_train, cfg.setup.safety_train
    if task is None or safety is None:
        return
    t = train_settings(cfg, task, "setup.task_train")["target_modules"]
    s = train_settings(cfg, safety, "setup.safety_train")["target_modules"]
    if ALL_LINEAR in (t, s) or safety.get("like"):
        return  # what all-linear covers depends on the model; the merge itself checks
    missing = [m for m in t if m not in s]
    merges = [
        c.label
        for c in cells
        if c.defend is not None and c.defend.safety_adapter is not None and not c.defend.merge.allow_partial
    ]
    if missing and merges:
        raise InputError(
            f"setup.task_train targets {', '.join(missing)}, which setup.safety_train does not "
            f"({', '.join(s)}): the merges of {', '.join(merges[:3])}{' ...' if len(merges) > 3 else ''} "
            "would be refused (a selected module needs a safety counterpart; docs/engine.md, Partial "
            "merges). Give setup.safety_train the task's target_modules, or allow_partial: true in "
            "those defences' options"
        )


# --- fingerprints and keys ---------------------------------------------------------------------------
def model_fingerprint(name: str, allow_download: bool) -> str:
    """Checkpoint fingerprint of a local directory or a hub snapshot (the local cache only in dry runs)."""
    local = resolve_model(name) if is_packaged_alias(name) else name
    if not Path(local).is_dir():
        if not allow_download:
            try:
                from huggingface_hub import snapshot_download  # lazy: only hub ids in dry runs need it

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
    needs = {i for c in cells for i in c.inputs}
    fps = {
        "aligned": model_fingerprint(s.aligned, allow_download),
        "unaligned": model_fingerprint(s.unaligned, allow_download) if "unaligned" in needs else "",
        "task": adapter_fingerprint(
            s.task_adapter or str(trained_adapter_dir(out, "task")), _train_of(cfg, "task")
        ),
        "safety": adapter_fingerprint(
            s.safety_adapter or str(trained_adapter_dir(out, "safety")), _train_of(cfg, "safety")
        ),
    }
    for name in needs:
        if name.startswith(ADAPTER_INPUT):
            fps[name] = adapter_fingerprint(name[len(ADAPTER_INPUT) :], None)
    for c in cells:
        c.key = _sha({"settings": c.settings, "inputs": {k: fps[k] for k in c.inputs}})


def _train_of(cfg: ExperimentConfig, role: str) -> dict[str, Any] | None:
    fields = cfg.setup.task_train if role == "task" else cfg.setup.safety_train
    return None if fields is None else train_settings(cfg, fields, f"setup.{role}_train")


# --- evaluations -------------------------------------------------------------------------------------
def benchmark_fingerprint(bench: Benchmark) -> str:
    """Content hash of a benchmark built in code (its kind and every item)."""
    return _sha([bench.kind, [[it.id, it.prompt, it.reference] for it in bench.items]])


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation of a cell — the test or the validation benchmarks — and what keys it."""

    phase: str  # "test" | "validation"
    benchmarks: tuple[BenchmarkSpec, ...]  # token budget and limit resolved
    settings: dict[str, Any]  # what changes the numbers (hashed into the evaluation key)

    @property
    def prefix(self) -> str:
        return "" if self.phase == "test" else f"{self.phase}-"


def eval_plan(cfg: ExperimentConfig, phase: str, provided: Mapping[str, Benchmark] | None = None) -> EvalPlan:
    """The plan of `phase`; benchmarks built in code add their content hash to the key."""
    ev = cfg.evaluation
    settings = ev.key_settings() if phase == "test" else ev.validation_key_settings()
    benchmarks = tuple(ev.planned(phase))
    used = sorted({b.name for b in benchmarks} & set(provided or {}))
    if used:
        assert provided is not None
        settings = {**settings, "provided": {n: benchmark_fingerprint(provided[n]) for n in used}}
    return EvalPlan(phase, benchmarks, settings)


def eval_key(plan: EvalPlan, cell: Cell) -> str:
    return _sha({"cell": cell.key, "evaluation": plan.settings})


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def variant_dir(out: Path, cell: Cell) -> Path:
    return out / "variants" / cell.slug


def eval_dir(out: Path, cell: Cell, plan: EvalPlan) -> Path:
    """One directory per (cell, evaluation settings): switching evaluations back never re-evaluates."""
    return out / "evals" / cell.slug / (plan.prefix + eval_key(plan, cell)[:12])


def variant_done(out: Path, cell: Cell) -> bool:
    if cell.method in ("aligned", "unaligned"):
        return True
    stamp = _read_json(variant_dir(out, cell) / CELL_JSON)
    return stamp is not None and stamp.get("key") == cell.key


def eval_done(out: Path, cell: Cell, plan: EvalPlan) -> bool:
    folder = eval_dir(out, cell, plan)
    stamp = _read_json(folder / EVAL_JSON)
    return (
        stamp is not None and stamp.get("key") == eval_key(plan, cell) and (folder / "metrics.json").is_file()
    )


def set_status(out: Path, cells: list[Cell], test: EvalPlan, validation: EvalPlan | None) -> None:
    """`to run` (no variant yet), `to validate`, `to evaluate` (on test) or `cached`."""
    for c in cells:
        if not variant_done(out, c):
            c.status = "to run"
        elif validation is not None and c.validates and not eval_done(out, c, validation):
            c.status = "to validate"
        elif c.tabulated and not eval_done(out, c, test):
            c.status = "to evaluate"
        else:
            c.status = "cached"
