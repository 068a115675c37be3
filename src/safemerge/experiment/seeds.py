"""`seeds:` in an experiment config: the whole experiment once per training seed, then pooled.

Seed s shifts the `seed` of every adapter the experiment trains (setup.task_train, setup.safety_train and
SafeInstr's training, which inherits the task recipe) by s; adapters given by path and the defences' own
options (e.g. DARE's `seed`) are the same in every seed (vary those with a `grid:` instead). Seed 0 is
the config as written, so its directory holds exactly what a run without `seeds:` computes.

Layout: `OUT/seed-<s>/` is a complete single-seed experiment (its own results.{md,csv,json});
`OUT/results.{md,csv,json}` pool the rows over seeds × prompts with the prompt as the unit
(`safemerge.common.stats.pooled_rate`) and compare every row with `evaluation.flips_vs` on each harm
benchmark with a paired sign-flip test pooled across seeds (`paired_comparison`); docs/organism.md,
"Statistics over seeds".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError
from safemerge.common.stats import paired_comparison, pooled_rate
from safemerge.experiment.cells import Cell, ExperimentResult
from safemerge.experiment.config import ExperimentConfig
from safemerge.experiment.results import Measure, bench_label, md_table, measures
from safemerge.train import TrainConfig

TRAIN_SEED = TrainConfig.model_fields["seed"].default  # a recipe without `seed` trains with this one


def _shifted(fields: dict[str, Any] | None, seed: int) -> dict[str, Any] | None:
    if fields is None or seed == 0:
        return fields
    return {**fields, "seed": int(fields.get("seed", TRAIN_SEED)) + seed}


def trains_something(cfg: ExperimentConfig) -> bool:
    """Whether any adapter of the experiment is trained by it (so that a seed changes something)."""
    own = any(d.method == "safeinstr" and "adapter" not in d.options for d in cfg.defenses)
    return cfg.setup.task_train is not None or cfg.setup.safety_train is not None or own


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The experiment of training seed `seed`, without `seeds:` (seed 0: `cfg` as written)."""
    if seed == 0:
        return cfg.model_copy(update={"seeds": None})
    setup = cfg.setup.model_copy(
        update={
            "task_train": _shifted(cfg.setup.task_train, seed),
            "safety_train": _shifted(cfg.setup.safety_train, seed),
        }
    )
    defenses = []
    for d in cfg.defenses:
        if d.method == "safeinstr" and "seed" in d.options:
            d = d.model_copy(update={"options": _shifted(d.options, seed)})
        if d.method == "safeinstr" and "seed" in d.grid:
            d = d.model_copy(update={"grid": {**d.grid, "seed": [int(v) + seed for v in d.grid["seed"]]}})
        defenses.append(d)
    return cfg.model_copy(update={"setup": setup, "defenses": defenses, "seeds": None})


def check_seeds(cfg: ExperimentConfig) -> list[int]:
    """The seeds to run; InputError when `seeds:` is given but nothing the experiment trains uses it."""
    seeds = list(cfg.seeds or [])
    if seeds and not trains_something(cfg):
        raise InputError(
            "seeds: every adapter is given by path, so every seed would compute the same thing; train the "
            "adapters in the experiment (setup.task_train / safety_train, a safeinstr recipe) or drop seeds:"
        )
    return seeds


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed-{seed}"


# --- pooling -----------------------------------------------------------------------------------------


def row_key(cfg: ExperimentConfig, cell: Cell) -> str:
    """A row's name in every seed: its label, except the cells a validation choice made (their τ and
    weights may differ between seeds), named by the defence and their role (a random control's draws by
    their index in `random_seeds`)."""
    if cell.role == "chosen":
        return f"{cell.name} (chosen)"
    if cell.control and cell.spec is not None:
        spec = cfg.defenses[cell.spec]
        draw = "" if cell.draw is None else f" {cell.draw}"
        return f"{spec.name or spec.method} {cell.control}{draw}"
    return cell.label


def _rate_columns(b: str, events: list[dict[str, bool]]) -> dict[str, Any]:
    pr = pooled_rate(events)
    r = pr.rate
    return {
        f"{b}_k": r.k, f"{b}_n": r.n, f"{b}_rate": r.p, f"{b}_ci95_lo": r.lo, f"{b}_ci95_hi": r.hi,
        f"{b}_n_eff": pr.n_eff,
    }  # fmt: skip


def _comparison_columns(b: str, ref: list[dict[str, bool]], var: list[dict[str, bool]]) -> dict[str, Any]:
    c = paired_comparison(ref, var)
    return {
        f"{b}_diff_vs_ref": c.diff, f"{b}_diff_lo": c.lo, f"{b}_diff_hi": c.hi, f"{b}_fixed": c.fixed,
        f"{b}_broken": c.broken, f"{b}_p_value": c.p_value,
    }  # fmt: skip


def pooled_rows(cfg: ExperimentConfig, runs: list[tuple[int, ExperimentResult]]) -> list[dict[str, Any]]:
    """One row per row key present in every seed: each test benchmark's pooled rate (k, n, rate, 95%
    interval, n_eff) and, with `flips_vs`, the pooled paired comparison on each harm benchmark."""
    per_seed: list[dict[str, dict[str, Measure]]] = []
    for _, res in runs:
        table = [c for c in res.table if c.label not in res.failed]
        per_seed.append({row_key(cfg, c): measures(res.out, c, res.plans["test"]) for c in table})
    ref = cfg.evaluation.flips_vs
    rows = []
    for key in per_seed[0]:
        if not all(key in s for s in per_seed):
            continue
        row: dict[str, Any] = {"row": key}
        for bench, m in per_seed[0][key].items():
            b, events = bench_label(bench), [s[key][bench].events for s in per_seed]
            row.update(_rate_columns(b, events))
            for judge in m.judge_events:  # every further judge's pooled rate beside the headline one
                row.update(
                    _rate_columns(f"{b}_judge_{judge}", [s[key][bench].judge_events[judge] for s in per_seed])
                )
            if ref is not None and key != ref and m.kind == "harm" and ref in per_seed[0]:
                row.update(_comparison_columns(b, [s[ref][bench].events for s in per_seed], events))
        rows.append(row)
    return rows


def _benchmarks(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k[: -len("_rate")] for r in rows for k in r if k.endswith("_rate")))


def _rate_cell(r: dict[str, Any], b: str) -> str:
    if r.get(f"{b}_n") in (None, 0):
        return "n/a"
    pct = f"{100 * r[f'{b}_rate']:.1f}"
    return (
        f"{r[f'{b}_k']}/{r[f'{b}_n']} = {pct}% [{100 * r[f'{b}_ci95_lo']:.1f}, {100 * r[f'{b}_ci95_hi']:.1f}]"
    )


def _diff_cell(r: dict[str, Any], b: str) -> str:
    if f"{b}_p_value" not in r:
        return "—"
    d, lo, hi = (100 * r[f"{b}_{x}"] for x in ("diff_vs_ref", "diff_lo", "diff_hi"))
    flips = f"-{r[f'{b}_fixed']}/+{r[f'{b}_broken']}"
    return f"{d:+.1f} pts [{lo:+.1f}, {hi:+.1f}], {flips}, p={r[f'{b}_p_value']:.2g}"


def pooled_markdown(cfg: ExperimentConfig, seeds: list[int], rows: list[dict[str, Any]]) -> str:
    """results.md at the top of OUT: the pooled table and, with flips_vs, the paired comparisons."""
    benches = _benchmarks(rows)
    harm = [b for b in benches if any(f"{b}_p_value" in r for r in rows)]
    header = ["row", *benches, *(f"{b} vs {cfg.evaluation.flips_vs}" for b in harm)]
    body = [[r["row"], *(_rate_cell(r, b) for b in benches), *(_diff_cell(r, b) for b in harm)] for r in rows]
    lines = [
        f"# Experiment `{cfg.name}`, pooled over seeds {', '.join(map(str, seeds))}",
        "",
        "Rates: k/n over seeds × prompts with a 95% Wilson interval at the effective sample size of the "
        "clustered design (the prompt is the unit). Comparisons: variant − reference in points, paired on "
        "the same prompts within each seed, 95% interval and exact sign-flip p-value pooled across seeds. "
        "Every seed's own table: seed-<s>/results.md.",
        "",
        *md_table(header, body),
        "",
    ]
    return "\n".join(lines)


def write_pooled(
    cfg: ExperimentConfig, out: Path, runs: list[tuple[int, ExperimentResult]]
) -> list[dict[str, Any]]:
    """OUT/results.{md,csv,json} of a run over seeds; returns the pooled rows."""
    seeds = [s for s, _ in runs]
    rows = pooled_rows(cfg, runs)
    (out / "results.md").write_text(pooled_markdown(cfg, seeds, rows), encoding="utf-8")
    data = {"seeds": seeds, "pooled": rows, "per_seed": {str(s): r.rows for s, r in runs}}
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(rows)
    return rows
