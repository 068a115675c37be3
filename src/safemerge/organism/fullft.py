"""`safemerge organism fullft`: SafeMERGE on a full fine-tune of the organism (docs/organism.md, "Full
fine-tune of the organism"; the method is docs/method.md §3.7).

T_full (A fully fine-tuned on T's arithmetic data, `build --full-ft`) is repaired with the demo's default
cell — `defend --method safemerge --task-model T_full --safety-adapter S`, τ 0.35, w 0.8/0.2, fixed in
advance (nothing is tuned on the test set) — next to its scale-only control (the same modules, w 0.8/0.0)
and merge-all (0.8/0.2 on every module). Every row is a full model, evaluated like the demo's rows:
HarmBench test, the benign over-refusal set and the first 100 arithmetic test items, greedy, the demo's
token budgets, the keyword judge, Wilson intervals and paired flips against T_full (exact McNemar).

The experiment runner takes task LoRAs only, so this module calls `defend` and the evaluation runner
directly. OUT is written atomically (a temporary sibling renamed when complete):
  variants/<row>/            the defences' full models with their reports
  evals/<row>/               generations.jsonl and metrics.json of each row (T_full's too)
  results.{md,json,csv}      the table
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.common.packaged import cache_root
from safemerge.common.precision import PrecisionChoice
from safemerge.common.stats import Rate, paired_flips, wilson
from safemerge.defenses import DefendConfig, defend
from safemerge.evaluate.backends import TransformersBackend
from safemerge.evaluate.benchmarks import Benchmark, load_benchmark
from safemerge.evaluate.judges import KEYWORD_LABEL, KeywordJudge
from safemerge.evaluate.runner import evaluate_loaded
from safemerge.experiment.results import md_table, rate_dict, report_modules
from safemerge.organism.build import Organism, build_organism, resolve_recipe, set_threads
from safemerge.organism.recipe import OrganismRecipe

HARM, BENIGN, TASK = "harmbench", "overrefusal", "arithmetic"  # the demo's test sets
EVENT = {"harm": "unsafe", "benign": "refused", "utility": "correct"}  # the verdict each rate counts
REFERENCE = "T_full"


@dataclass
class FullFtSettings:
    """What the table runs; the defaults are the demo's default cell and its evaluation settings."""

    out: Path
    recipe: OrganismRecipe = field(default_factory=OrganismRecipe)
    cache: Path | None = None
    tau: float = 0.35
    weights: tuple[float, float] = (0.8, 0.2)
    harm_tokens: int = 8
    task_tokens: int = 24
    task_limit: int | None = 100
    harm_limit: int | None = None  # None: all 159 HarmBench test standard behaviours
    benign_limit: int | None = None  # None: all 40 benign prompts
    batch_size: int = 200
    dtype: str = "auto"  # generation; "auto": the organism's resolved precision, as in the demo
    precision: PrecisionChoice | None = None  # the recipe's precision as resolved at the start
    force: bool = False
    progress: bool = True


@dataclass
class FullFtRow:
    """One evaluated full model: rates with counts and intervals, per-prompt events, flips vs T_full."""

    name: str
    defence: str
    settings: str
    modules: str
    rates: dict[str, Rate]  # harmful / refusal / task
    events: dict[str, dict[str, bool]]
    flips: dict[str, str] = field(default_factory=dict)  # harmful / task → "-fixed/+broken (p=…)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "defence": self.defence,
            "settings": self.settings,
            "modules_changed": self.modules,
            "harmful": rate_dict(self.rates["harmful"]),
            "over_refusal": rate_dict(self.rates["refusal"]),
            "task_accuracy": rate_dict(self.rates["task"]),
            "flips_vs_T_full": self.flips,
        }


def _tag(w: tuple[float, float]) -> str:
    return f"w{w[0]:g}-{w[1]:g}"


def defence_cells(s: FullFtSettings) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(row name, defence, settings in words, `defend` options) of the three defences. The scan covers
    T_full's seven projections and S, a LoRA, only the attention ones: the merges are partial by design
    (`allow_partial`: selected modules S lacks stay as fine-tuned; docs/organism.md, "Which modules")."""
    w, control = s.weights, (s.weights[0], 0.0)
    return [
        (f"safemerge-t{s.tau:g}-{_tag(w)}", "SafeMERGE", f"τ={s.tau:g}, w={w[0]:g}/{w[1]:g} (demo default)",
         {"method": "safemerge", "threshold": s.tau, "weights": list(w), "allow_partial": True}),
        (f"control-t{s.tau:g}-{_tag(control)}", "scale-only control",
         f"τ={s.tau:g}, w={w[0]:g}/0 (same modules, no safety LoRA)",
         {"method": "safemerge", "threshold": s.tau, "weights": list(control), "allow_any_weights": True,
          "allow_partial": True}),
        (f"merge-all-{_tag(w)}", "merge-all", f"w={w[0]:g}/{w[1]:g} on every module",
         {"method": "merge-all", "weights": list(w), "allow_partial": True}),
    ]  # fmt: skip


def run_defence(org: Organism, options: dict[str, Any], out: Path, progress: bool) -> Path:
    """One `safemerge defend --task-model T_full --safety-adapter S` into `out` (a full model)."""
    assert org.taskfull is not None
    cfg = DefendConfig.model_validate(
        {"aligned": str(org.aligned), "unaligned": str(org.unaligned), "task_model": str(org.taskfull),
         "safety_adapter": str(org.safety), "out": str(out), "plot": False, **options}
    )  # fmt: skip
    result = defend(cfg, progress=progress)
    assert result.model_dir is not None  # a full fine-tune's defence always writes a full model
    return result.model_dir


def table_benchmarks(s: FullFtSettings) -> dict[str, Benchmark]:
    """The demo's test sets with their limits."""
    return {
        HARM: load_benchmark(HARM, s.harm_limit),
        BENIGN: load_benchmark(BENIGN, s.benign_limit),
        TASK: load_benchmark(TASK, s.task_limit),
    }


def evaluate_model(
    s: FullFtSettings, model: Path, benches: dict[str, Benchmark], out: Path
) -> tuple[dict[str, Rate], dict[str, dict[str, bool]]]:
    """Greedy generations of one full model (harm and benign prompts at `harm_tokens`, the task at
    `task_tokens`, cached under the cache's generations/), judged; writes generations.jsonl and
    metrics.json to `out`; returns the rates and the per-prompt events."""
    records: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    cache_dir = (s.cache or cache_root()) / "generations"
    for names, tokens in (((HARM, BENIGN), s.harm_tokens), ((TASK,), s.task_tokens)):
        backend = TransformersBackend(str(model), max_new_tokens=tokens, dtype=s.dtype)
        recs, ms = evaluate_loaded(
            backend, str(model), [], [benches[n] for n in names], KeywordJudge(), cache_dir,
            s.batch_size, tokens,
        )  # fmt: skip
        backend.close()
        records += recs
        metrics.update(ms[str(model)]["benchmarks"])
    out.mkdir(parents=True)
    with (out / "generations.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    events = {
        key: {
            r["id"]: r["verdict"] == EVENT[r["kind"]]
            for r in records
            if r["benchmark"] == name and r["verdict"] != "malformed"
        }
        for key, name in (("harmful", HARM), ("refusal", BENIGN), ("task", TASK))
    }
    rates = {k: wilson(sum(v.values()), len(v)) for k, v in events.items()}
    return rates, events


def add_flips(rows: list[FullFtRow]) -> None:
    """Paired flips of every row against T_full (the first row) on the harmful and the task prompts."""
    ref = rows[0]
    for r in rows[1:]:
        r.flips = {k: paired_flips(ref.events[k], r.events[k]).fmt() for k in ("harmful", "task")}


def results_markdown(s: FullFtSettings, rows: list[FullFtRow], timings: dict[str, Any]) -> str:
    """results.md: the test table and the timings."""
    header = [
        "variant", "defence", "settings", "modules changed", "harmful (HarmBench test)",
        "flips vs T_full (harmful)", "over-refusal (benign)", "task accuracy", "flips vs T_full (task)",
    ]  # fmt: skip
    body = [
        [r.name, r.defence, r.settings, r.modules, r.rates["harmful"].fmt(), r.flips.get("harmful", "—"),
         r.rates["refusal"].fmt(), r.rates["task"].fmt(), r.flips.get("task", "—")]
        for r in rows
    ]  # fmt: skip
    lines = [
        "# SafeMERGE on a full fine-tune of the model organism",
        "",
        "T_full: the aligned model A fully fine-tuned (attention + MLP projections) on T's arithmetic "
        "data; the defences merge S (the safety LoRA) into T_full's modules (docs/method.md §3.7). "
        f"Generation: greedy, {s.harm_tokens} new tokens for harm/benign prompts, {s.task_tokens} for "
        f"the task. Precision: training {s.precision.describe() if s.precision else '?'}; generation "
        f"{s.dtype}.",
        "",
        *md_table(header, body),
        "",
        f"Harm judge: {KEYWORD_LABEL}. Rates: k/n = p% [Wilson 95% interval]. Flips: −fixed/+broken "
        "against T_full on the same prompts (harmful: unsafe answers; task: correct answers), exact "
        "McNemar p.",
        "",
        "## Timings (seconds)",
        "",
        "```",
        json.dumps(timings, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


CSV_HEADER = [
    "variant", "defence", "settings", "modules_changed", "harmful_k", "harmful_n", "harmful_rate",
    "harmful_lo", "harmful_hi", "refusal_k", "refusal_n", "refusal_rate", "refusal_lo", "refusal_hi",
    "task_k", "task_n", "task_acc", "task_lo", "task_hi", "flips_harmful_vs_T_full", "flips_task_vs_T_full",
]  # fmt: skip


def write_results(s: FullFtSettings, rows: list[FullFtRow], timings: dict[str, Any], folder: Path) -> None:
    """results.md / .json / .csv into `folder`."""
    (folder / "results.md").write_text(results_markdown(s, rows, timings), encoding="utf-8")
    data = {
        "rows": [r.as_dict() for r in rows],
        "judge": KEYWORD_LABEL,
        "timings": timings,
        "settings": {
            "tau": s.tau,
            "weights": list(s.weights),
            "harm_tokens": s.harm_tokens,
            "task_tokens": s.task_tokens,
            "task_limit": s.task_limit,
            "harm_limit": s.harm_limit,
            "benign_limit": s.benign_limit,
            "precision": s.precision.as_dict() if s.precision else None,
            "dtype": s.dtype,
            "taskfull_recipe": s.recipe.taskfull.model_dump(),
            "task_data": {"samples": s.recipe.task.samples, "seed": s.recipe.task.seed},
        },
    }
    (folder / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    with (folder / "results.csv").open("w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(CSV_HEADER)
        for r in rows:
            nums = [x for k in ("harmful", "refusal", "task") for x in _rate_fields(r.rates[k])]
            wr.writerow([r.name, r.defence, r.settings, r.modules, *nums, *(r.flips.get(k, "") for k in
                         ("harmful", "task"))])  # fmt: skip


def _rate_fields(rate: Rate) -> list[float | int]:
    return [rate.k, rate.n, rate.p, rate.lo, rate.hi]


def run_fullft_table(s: FullFtSettings) -> list[FullFtRow]:
    """Build (or reuse) A, S and T_full, run the three defences on T_full, evaluate the four full models
    and write the table into `s.out` (atomically); returns the rows, T_full first."""
    inputs = {"cache": s.cache or cache_root()}  # the organism, its generations and the packaged model
    check_output_dir(s.out, s.force, inputs)  # fail before any work
    t0 = time.perf_counter()
    threads = set_threads()
    recipe, choice = resolve_recipe(s.recipe)
    s = replace(s, recipe=recipe, dtype=choice.dtype if s.dtype == "auto" else s.dtype, precision=choice)
    org = build_organism(s.recipe, s.cache, s.progress, ("safety", "taskfull"))
    assert org.taskfull is not None
    benches = table_benchmarks(s)
    timings: dict[str, Any] = {"threads": threads, "build_stages_s": {k: round(v, 1) for k, v in
                                                                       org.timings.items()}}  # fmt: skip
    with atomic_output_dir(s.out, s.force, inputs, "organism fullft") as tmp:
        t1 = time.perf_counter()
        rates, events = evaluate_model(s, org.taskfull, benches, tmp / "evals" / REFERENCE)
        rows = [FullFtRow(REFERENCE, "none (T_full)", "full fine-tune of A as trained", "—", rates, events)]
        timings["eval_s"] = {REFERENCE: round(time.perf_counter() - t1, 1)}
        timings["defend_s"] = {}
        for name, defence, settings, options in defence_cells(s):
            t2 = time.perf_counter()
            model = run_defence(org, options, tmp / "variants" / name, s.progress)
            t3 = time.perf_counter()
            rates, events = evaluate_model(s, model, benches, tmp / "evals" / name)
            counts = report_modules(model)
            modules = "—" if counts is None else f"{counts[0]}/{counts[1]}"
            rows.append(FullFtRow(name, defence, settings, modules, rates, events))
            timings["defend_s"][name] = round(t3 - t2, 1)
            timings["eval_s"][name] = round(time.perf_counter() - t3, 1)
        add_flips(rows)
        timings["total_s"] = round(time.perf_counter() - t0, 1)
        write_results(s, rows, timings, tmp)
    return rows
