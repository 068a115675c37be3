"""Running an experiment: train the setup's adapters, compute every cell not yet cached, choose grid
cells on validation, evaluate every row on test, write the results. See `safemerge.experiment.cells`
for the layout of the output directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import yaml
from rich.console import Console

from safemerge.common.errors import InputError
from safemerge.common.outdir import check_incremental_dir, claim_output_dir
from safemerge.common.progress import progress_bars
from safemerge.defenses import DefendConfig, defend
from safemerge.evaluate.backends import free_accelerator_memory
from safemerge.evaluate.benchmarks import Benchmark
from safemerge.evaluate.judge_plugins import preflight_judges
from safemerge.experiment.cells import (
    CELL_JSON,
    Cell,
    EvalPlan,
    ExperimentResult,
    _read_json,
    _sha,
    _train_of,
    assign_keys,
    check_derived,
    derive_cells,
    eval_done,
    eval_plan,
    prepare,
    set_status,
    trained_adapter_dir,
    variant_dir,
    variant_done,
)
from safemerge.experiment.choice import Choice, choose_cell, rule_text
from safemerge.experiment.config import ExperimentConfig, entry_name, parse_experiment
from safemerge.experiment.evaluation import evaluate_cells, load_planned
from safemerge.experiment.results import measures, print_cells, summary, write_results
from safemerge.experiment.seeds import check_seeds, seed_config, seed_dir, write_pooled
from safemerge.train import TrainConfig, train

console = Console(stderr=True)


class Executor(Protocol):
    """Runs the stages of `execute` after the cells are keyed: train the inputs, compute the cells,
    validate and choose, evaluate the table (filling `result`). None in `execute` is the local, in-process
    run below; `safemerge.experiment.executor_ray.RayExecutor` runs them on Ray (docs/distributed.md)."""

    def run(
        self,
        cfg: ExperimentConfig,
        result: ExperimentResult,
        provided: Mapping[str, Benchmark],
        progress: bool,
    ) -> None: ...


def needs_training(cfg: ExperimentConfig, out: Path, role: str) -> bool:
    """Whether the setup's `role` adapter is a recipe without a trained adapter of its current key."""
    settings = _train_of(cfg, role)
    if settings is None:
        return False
    target = trained_adapter_dir(out, role)
    stamp = _read_json(target / "train.json")
    return not (
        stamp is not None
        and stamp.get("key") == _sha(settings)
        and (target / "adapter_model.safetensors").is_file()
    )


def train_input(cfg: ExperimentConfig, out: Path, role: str) -> None:
    """Train the setup's `role` adapter from its recipe and stamp it with the recipe's key."""
    settings = _train_of(cfg, role)
    assert settings is not None
    target = trained_adapter_dir(out, role)
    console.print(f"training the {role} adapter ({settings['recipe']}) → {target}", highlight=False)
    train(TrainConfig(**{**settings, "out": target, "force": True}))
    free_accelerator_memory(f"after training the {role} adapter")  # before any engine starts
    (target / "train.json").write_text(
        json.dumps({"key": _sha(settings), "settings": settings}, indent=2) + "\n"
    )


def train_inputs(cfg: ExperimentConfig, out: Path) -> list[str]:
    """Train the task / safety adapters the setup gives as recipes (skipped when already trained)."""
    done = []
    for role in ("task", "safety"):
        if needs_training(cfg, out, role):
            train_input(cfg, out, role)
            done.append(role)
    return done


def run_cell(cell: Cell, out: Path, progress: bool) -> None:
    """Compute one cell's variant (defence output, or a SafeInstr adapter) and stamp it with its key."""
    target = variant_dir(out, cell)
    if cell.train is not None:
        train(TrainConfig(**{**cell.train, "out": target, "force": True}))
        free_accelerator_memory(f"after training {cell.label}")
    else:
        assert cell.defend is not None
        flat = {**cell.defend.model_dump(), "out": str(target), "force": True}
        defend(DefendConfig.from_flat(**flat), progress=progress)
    stamp = {"key": cell.key, "label": cell.label, "settings": cell.settings}
    (target / CELL_JSON).write_text(json.dumps(stamp, indent=2) + "\n")


def compute_cells(cells: list[Cell], out: Path, progress: bool, result: ExperimentResult) -> None:
    """Compute every cell whose variant is missing or stale."""
    for c in cells:
        if not variant_done(out, c):
            if progress:  # a progress note: `-q` silences it with the bars
                console.print(f"computing {c.label}", highlight=False)
            run_cell(c, out, progress)
            result.computed.append(c.label)


def _with_limit(cfg: ExperimentConfig, limit: int | None) -> ExperimentConfig:
    if limit is None:
        return cfg
    if limit < 1:
        raise InputError(f"--limit must be positive, got {limit}")
    return cfg.model_copy(update={"evaluation": cfg.evaluation.capped(limit)})


ComputeCells = Callable[[list[Cell], Path, bool, ExperimentResult], None]


def choose(
    cfg: ExperimentConfig,
    result: ExperimentResult,
    i: int,
    progress: bool,
    compute: ComputeCells | None = None,
) -> None:
    """Apply `cfg.defenses[i].choose` to its candidates' validation results, then compute the derived
    controls of the chosen cell (with `compute`, default `compute_cells`) and put them right after the
    defence's candidates. Candidates in `result.failed` are left out of the choice."""
    spec, out, plan = cfg.defenses[i], result.out, result.plans["validation"]
    assert spec.choose is not None
    cands = [
        c for c in result.cells if c.spec == i and c.role == "candidate" and c.label not in result.failed
    ]
    ref = next(c for c in result.cells if c.label == spec.choose.reference)
    summaries = [(c.label, summary(measures(out, c, plan))) for c in cands]
    if any(s.harmful is None for _, s in summaries):
        raise InputError(f"defenses[{i}].choose: evaluation.validation needs a harm benchmark")
    label, met = choose_cell(summaries, summary(measures(out, ref, plan)), spec.choose)
    chosen = next(c for c in cands if c.label == label)
    chosen.role = "chosen"
    derived = derive_cells(cfg, out, chosen)
    check_derived(result.cells, derived)
    assign_keys(cfg, out, derived, allow_download=True)
    at = result.cells.index(cands[-1]) + 1
    result.cells[at:at] = derived
    (compute or compute_cells)(derived, out, progress, result)
    rule = rule_text(spec.choose, met, ref.label)
    result.choices.append(Choice(chosen.name, ref.label, label, met, rule, [c.label for c in cands]))
    console.print(f"{chosen.name}: chose {label} on validation ({rule})", highlight=False)


def validate(
    cfg: ExperimentConfig, result: ExperimentResult, provided: Mapping[str, Benchmark], progress: bool
) -> None:
    """Evaluate the rows that need it on the validation benchmarks, then make every `choose` decision."""
    plan = result.plans["validation"]
    todo = [c for c in result.cells if c.validates and not eval_done(result.out, c, plan)]
    if todo:
        if progress:  # a progress note, like "computing"
            console.print(
                f"validating {len(todo)} variant(s): {', '.join(c.label for c in todo)}", highlight=False
            )
        evaluate_cells(cfg, result.out, todo, plan, load_planned(plan, provided))
        result.validated = [c.label for c in todo]
    for i, spec in enumerate(cfg.defenses):
        if spec.choose is not None:
            choose(cfg, result, i, progress)


def execute(
    config: Path | ExperimentConfig,
    out: Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    limit: int | None = None,
    benchmarks: Mapping[str, Benchmark] | None = None,
    executor: Executor | None = None,
) -> ExperimentResult:
    """Everything but the results files: validate the config, then (unless `dry_run`) train, compute,
    validate and choose, and evaluate every row not yet cached. `benchmarks` supplies benchmarks built
    in code, by the names the config uses (their content keys the evaluations). `executor` runs those
    stages elsewhere (e.g. on Ray); None runs them here, one after the other."""
    cfg = _with_limit(config if isinstance(config, ExperimentConfig) else parse_experiment(config), limit)
    provided = dict(benchmarks or {})
    target, cells = prepare(cfg, out, provided)
    check_incremental_dir(target)  # reused, never emptied: only when it is empty or safemerge's
    plans = {"test": eval_plan(cfg, "test", provided)}
    if cfg.evaluation.validation:
        plans["validation"] = eval_plan(cfg, "validation", provided)
    preflight(cfg, plans, provided)
    assign_keys(cfg, target, cells, allow_download=not dry_run)
    set_status(target, cells, plans["test"], plans.get("validation"))
    result = ExperimentResult(target, cells, plans=plans)
    if dry_run:
        print_cells(cfg, cells, Console())
        return result
    # `progress` is the one switch for everything below, the evaluation's own bars and tables included
    with progress_bars(progress):
        claim_output_dir(target, "experiment")  # created and marked: later runs resume in it
        unset = {"execution"} if cfg.execution is None else set()  # an older config's file stays as it was
        dumped = cfg.model_dump(mode="json", exclude=unset)
        (target / "experiment.yaml").write_text(yaml.safe_dump(dumped, sort_keys=False))
        if executor is not None:
            executor.run(cfg, result, provided, progress)
            set_status(target, result.cells, plans["test"], plans.get("validation"))
            return result
        start = time.perf_counter()
        result.trained = train_inputs(cfg, target)
        if result.trained:  # the adapters' content changed: keys depend on it
            assign_keys(cfg, target, cells, allow_download=True)
        compute_cells(cells, target, progress, result)
        result.timings["variants_s"] = time.perf_counter() - start
        if "validation" in plans:
            validate(cfg, result, provided, progress)
        result.timings["validation_s"] = time.perf_counter() - start - result.timings["variants_s"]
        evaluate_table(cfg, result, provided)
        result.timings["test_eval_s"] = time.perf_counter() - start - sum(result.timings.values())
        set_status(target, result.cells, plans["test"], plans.get("validation"))
        return result


def preflight(
    cfg: ExperimentConfig, plans: Mapping[str, EvalPlan], provided: Mapping[str, Benchmark]
) -> None:
    """Before any training, defence or engine (and in a dry run): every planned benchmark's items loaded
    and every judge resolved (`preflight_judges`: its model found, its tokenizer and prompt format
    working), so a missing dataset or an unreachable guard fails in seconds, not after the defences.
    InputError (exit 2) naming the benchmark or the judge."""
    harm = False
    for plan in plans.values():
        for spec in plan.benchmarks:
            try:
                bench = load_planned(replace(plan, benchmarks=(spec,)), provided)[0][0]
            except InputError as exc:
                raise InputError(f"benchmark {spec.name} ({plan.phase}): {exc}") from None
            harm = harm or bench.kind == "harm"
    if harm:
        ev = cfg.evaluation
        preflight_judges(ev.judge, ev.judge_model, ev.trust_remote_code)


def evaluate_table(
    cfg: ExperimentConfig, result: ExperimentResult, provided: Mapping[str, Benchmark]
) -> None:
    """Evaluate every row of the table that has no cached test evaluation."""
    plan = result.plans["test"]
    todo = [c for c in result.table if not eval_done(result.out, c, plan)]
    if todo:
        console.print(
            f"evaluating {len(todo)} variant(s): {', '.join(c.label for c in todo)}", highlight=False
        )
        evaluate_cells(cfg, result.out, todo, plan, load_planned(plan, provided))
        result.evaluated = [c.label for c in todo]


def experiment_inputs(cfg: ExperimentConfig, config_file: Path | None) -> dict[str, Any]:
    """What an experiment reads, by label (local paths; hub ids are skipped by the check): its output
    directory must not overlap any of it."""
    s = cfg.setup
    path_options = ("aligned", "unaligned", "task_adapter", "task_model", "subspace", "safety_adapter",
                    "safety_model")  # fmt: skip
    options = [
        v
        for d in cfg.defenses
        for k, v in [*d.options.items(), *((k, x) for k, xs in d.grid.items() for x in xs)]
        if k in path_options and isinstance(v, str)
    ]
    trained = [t.get("recipe") for t in (s.task_train, s.safety_train) if t]
    benchmarks = [entry_name(e) for e in (*cfg.evaluation.benchmarks, *cfg.evaluation.validation)]
    return {
        "experiment config": config_file,
        "aligned model": s.aligned,
        "unaligned model": s.unaligned,
        "task adapter": s.task_adapter,
        "safety adapter": s.safety_adapter,
        "training data file": [str(r) for r in trained if r and Path(str(r)).is_file()],
        "benchmark file": [b for b in benchmarks if Path(b).is_file()],
        "defence input": options,
    }


def run_experiment(
    config: Path | ExperimentConfig,
    out: Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    limit: int | None = None,
    executor: Executor | None = None,
    source: Path | None = None,
) -> ExperimentResult:
    """Validate the config (a YAML path or an `ExperimentConfig`), then (unless `dry_run`) compute and
    evaluate every cell not yet cached and write the results files. `limit` overrides `evaluation.limit`
    (and caps every benchmark's own limit); `executor` as in `execute`; `source`: the YAML file an
    `ExperimentConfig` was read from (an input: the output directory must not overlap it)."""
    cfg = _with_limit(config if isinstance(config, ExperimentConfig) else parse_experiment(config), limit)
    root = out or (Path(cfg.out) if cfg.out else None)
    if not isinstance(config, ExperimentConfig):
        source = config
    if root is not None:  # prepare() refuses a missing one
        check_incremental_dir(root, experiment_inputs(cfg, source))  # before any work, dry runs too
    if cfg.seeds:
        return run_seeds(cfg, out, dry_run, progress, executor)
    result = execute(cfg, out, dry_run, progress, executor=executor)
    if not dry_run:
        result.rows = write_results(
            cfg, result.out, result, result.plans["test"], result.plans.get("validation")
        )
    return result


def run_seeds(
    cfg: ExperimentConfig, out: Path | None, dry_run: bool, progress: bool, executor: Executor | None
) -> ExperimentResult:
    """`seeds:`: the whole experiment once per seed in OUT/seed-<s>/ (`experiment.seeds`), then the
    pooled results in OUT. The returned result lists every seed's work and rows, labelled by seed."""
    seeds = check_seeds(cfg)
    root = out or (Path(cfg.out) if cfg.out else None)
    if root is None:
        raise InputError(
            f"experiment {cfg.name!r}: no output directory: set `out:` in the config or pass --out"
        )
    if not dry_run:
        prepare(seed_config(cfg, seeds[0]), seed_dir(root, seeds[0]))  # a bad config fails before OUT exists
        claim_output_dir(root, "experiment")
    runs = []
    for s in seeds:
        console.print(f"seed {s} → {seed_dir(root, s)}", highlight=False)
        runs.append(
            (s, run_experiment(seed_config(cfg, s), seed_dir(root, s), dry_run, progress, executor=executor))
        )
    first = runs[0][1]
    merged = ExperimentResult(root, first.cells, plans=first.plans)
    for s, r in runs:
        for name in ("computed", "evaluated", "validated", "trained"):
            getattr(merged, name).extend(f"seed {s}: {x}" for x in getattr(r, name))
        merged.failed.update({f"seed {s}: {k}": v for k, v in r.failed.items()})
        merged.rows += [{**row, "label": f"seed {s}: {row['label']}"} for row in r.rows]
    if not dry_run:
        write_pooled(cfg, root, runs)
    return merged
