"""Evaluating cells with the eval harness: the adapters on one loaded aligned model (with the aligned
row), every full model (RESTA, the unaligned row) on its own; each benchmark with its own token budget.

Benchmarks that share a token budget are generated as one prompt stream per variant (the harness sorts
it by length and cuts it into as few equal batches of `batch_size` as possible), so the batches of a
given configuration never change: greedy generation with left padding can depend, in the last bits, on
what else is in the batch. Each evaluated row gets `evals/<cell>/<key>/` with metrics.json,
generations.jsonl (every prompt, response and verdict) and eval.json (its key).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from safemerge.common.progress import SHOW_PROGRESS
from safemerge.evaluate.api import judges_label, make_backend, score
from safemerge.evaluate.backends import Backend, TransformersBackend
from safemerge.evaluate.benchmarks import Benchmark, load_benchmark
from safemerge.evaluate.config import EvalConfig
from safemerge.evaluate.report import print_table
from safemerge.evaluate.runner import Record, Responses, Variant, generate_all
from safemerge.experiment.cells import EVAL_JSON, Cell, EvalPlan, eval_dir, eval_key, variant_dir
from safemerge.experiment.config import ExperimentConfig

Planned = list[tuple[Benchmark, int]]  # each benchmark with its token budget


def load_planned(plan: EvalPlan, provided: Mapping[str, Benchmark]) -> Planned:
    """The plan's benchmarks, loaded (or taken from `provided`, built in code) and cut to their limit."""
    out: Planned = []
    for spec in plan.benchmarks:
        if spec.name in provided:
            bench = provided[spec.name]
            if spec.limit is not None:
                bench = replace(bench, items=bench.items[: spec.limit])  # keeps a subclass's scoring
        else:
            bench = load_benchmark(spec.name, spec.limit)
        assert spec.max_new_tokens is not None  # resolved by EvaluationSpec.planned
        out.append((bench, spec.max_new_tokens))
    return out


def budget_groups(planned: Planned) -> list[tuple[int, list[Benchmark]]]:
    """Benchmarks grouped by token budget, in order of first appearance (one prompt stream per group)."""
    groups: dict[int, list[Benchmark]] = {}
    for bench, tokens in planned:
        groups.setdefault(tokens, []).append(bench)
    return list(groups.items())


def is_full_model(out: Path, cell: Cell) -> bool:
    """True when the row is a full model (RESTA, the unaligned model), evaluated on its own."""
    if cell.method == "unaligned":
        return True
    return cell.method != "aligned" and (variant_dir(out, cell) / "config.json").is_file()


Group = tuple[str, dict[str, Cell], Cell | None]  # a loaded model, its adapter rows, its own row


def evaluate_cells(
    cfg: ExperimentConfig, out: Path, cells: Sequence[Cell], plan: EvalPlan, planned: Planned
) -> None:
    """Evaluate cells: adapters on one loaded aligned model (with the aligned row), full models one by
    one; every model's answers first (one engine at a time), then all of them judged together, so that a
    Llama Guard engine starts at most once (and not at all when every verdict is cached)."""
    adapters = [c for c in cells if c.method != "aligned" and not is_full_model(out, c)]
    aligned = [c for c in cells if c.method == "aligned"]
    groups: list[Group] = []
    if adapters or aligned:
        owners = {str(variant_dir(out, c)): c for c in adapters}
        groups.append((cfg.setup.aligned, owners, aligned[0] if aligned else None))
    for c in cells:
        if is_full_model(out, c):
            model = cfg.setup.unaligned if c.method == "unaligned" else str(variant_dir(out, c))
            groups.append((model, {}, c))
    if groups:
        _evaluate_models(cfg, out, groups, plan, planned)


def _eval_config(
    cfg: ExperimentConfig, out: Path, model: str, adapters: list[str], tokens: int
) -> EvalConfig:
    ev = cfg.evaluation
    return EvalConfig(
        model=model,
        adapters=adapters,
        benchmarks=[b.name for b in ev.planned("test")],
        out=out / "evals",  # never written: the rows' files are written by `_write_rows`
        judge=ev.judge,
        judge_model=ev.judge_model,
        backend=ev.backend,
        max_new_tokens=tokens,
        batch_size=ev.batch_size,
        tensor_parallel_size=ev.tensor_parallel_size,
        gpu_memory_utilization=ev.gpu_memory_utilization,
        dtype=ev.dtype,
        cache_dir=cache_dir(cfg, out),
        trust_remote_code=ev.trust_remote_code,
        warn_truncated=ev.warn_truncated,
    )


def cache_dir(cfg: ExperimentConfig, out: Path) -> Path:
    """Where generations are cached (`evaluation.cache_dir`, default OUT/cache)."""
    return Path(cfg.evaluation.cache_dir) if cfg.evaluation.cache_dir else out / "cache"


def generate(
    cfg: ExperimentConfig, out: Path, model: str, variants: list[Variant], planned: Planned
) -> Responses:
    """Responses of every variant on every benchmark, one stream per token budget (cached generations are
    reused). The transformers backend is loaded once and told each budget; vLLM fixes it at start-up."""
    adapters = [v.adapter for v in variants if v.adapter is not None]
    responses: Responses = {}
    backend: Backend | None = None
    try:
        for tokens, benches in budget_groups(planned):
            if isinstance(backend, TransformersBackend):
                backend.max_new_tokens = tokens
            else:
                if backend is not None:
                    backend.close()
                prompts = [it.prompt for b in benches for it in b.items]  # sizes a vLLM engine
                backend = make_backend(_eval_config(cfg, out, model, adapters, tokens), prompts=prompts)
            responses.update(
                generate_all(
                    backend, model, variants, benches, cache_dir(cfg, out), cfg.evaluation.batch_size, tokens
                )
            )
    finally:
        if backend is not None:
            backend.close()  # before the judge loads: an 8B judge should not sit next to the model
    return responses


def _evaluate_models(
    cfg: ExperimentConfig, out: Path, groups: list[Group], plan: EvalPlan, planned: Planned
) -> None:
    """Generate with each model in turn (its base row and adapters), then judge and score every row at
    once, and write each row."""
    variants: list[Variant] = []
    responses: Responses = {}
    for model, adapters, base_cell in groups:
        mine = ([Variant(model, None)] if base_cell is not None else []) + [Variant(a, a) for a in adapters]
        responses.update(generate(cfg, out, model, mine, planned))
        variants += mine
    ecfg = _eval_config(cfg, out, groups[0][0], [], planned[0][1])
    records, metrics = score(ecfg, variants, [b for b, _ in planned], responses, cache_dir(cfg, out))
    if SHOW_PROGRESS.get():  # each evaluation's own table is progress; `-q` leaves only the results files
        print_table(metrics, judges_label(cfg.evaluation.judge, cfg.evaluation.judge_model))
    for model, adapters, base_cell in groups:
        owners = dict(adapters)
        if base_cell is not None:
            owners[model] = base_cell
        for key, cell in owners.items():
            rows = [r for r in records if r["variant"] == key]
            _write_row(out, cell, plan, rows, metrics[key]["benchmarks"])


def _write_row(
    out: Path, cell: Cell, plan: EvalPlan, records: list[Record], metrics: dict[str, object]
) -> None:
    """One row's evaluation directory: its generations with verdicts, its metrics and its key."""
    target = eval_dir(out, cell, plan)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    with (target / "generations.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    stamp = {"key": eval_key(plan, cell), "cell": cell.key, "evaluation": plan.settings, "label": cell.label}
    (target / EVAL_JSON).write_text(json.dumps(stamp, indent=2) + "\n")
