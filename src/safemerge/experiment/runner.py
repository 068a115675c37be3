"""Running an experiment: train the setup's adapters, compute every cell not yet cached, evaluate every
variant, write the results. See `safemerge.experiment.cells` for the layout of the output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from rich.console import Console

from safemerge.common.errors import InputError
from safemerge.defenses import defend
from safemerge.evaluate import EvalConfig, evaluate
from safemerge.experiment.cells import (
    CELL_JSON,
    EVAL_JSON,
    Cell,
    ExperimentResult,
    _read_json,
    _sha,
    _train_of,
    assign_keys,
    eval_dir,
    eval_done,
    eval_key,
    prepare,
    set_status,
    trained_adapter_dir,
    variant_dir,
    variant_done,
)
from safemerge.experiment.config import ExperimentConfig, parse_experiment
from safemerge.experiment.results import print_cells, write_results
from safemerge.train import TrainConfig, train

console = Console(stderr=True)


def train_inputs(cfg: ExperimentConfig, out: Path, progress: bool) -> list[str]:
    """Train the task / safety adapters the setup gives as recipes (skipped when already trained)."""
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
    target = variant_dir(out, cell)
    if cell.train is not None:
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


