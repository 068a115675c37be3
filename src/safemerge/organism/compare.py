"""`safemerge organism compare`: which post-hoc defence, at which setting, and at what cost?

Every registered defence that declares a `sweep` (its main knob and the values to try) is swept on the
organism's validation prompts, one setting is chosen per defence and seed by the demo's rule (the lowest
validation harmful rate with task accuracy ≥ T − 3 points and over-refusal ≤ T + 5 points: the shared
`choose` of `safemerge experiment`), and the chosen settings are tested, pooled over seeds and each
paired against SafeMERGE (chosen the same way on the demo's τ × weights grid) on the same prompts
(docs/organism.md, "Which defence").

Every seed is one experiment in `OUT/seed-<s>/` (models/, adapters/, variants/, evals/); the organism's
stages and the generations are cached and shared with `safemerge demo`. `OUT/results.{md,json,csv}` hold
the table at matched utility and the paired comparisons, `OUT/validation.png` every defence's validation
curve with the chosen settings marked.
"""

from __future__ import annotations

import csv
import difflib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError
from safemerge.common.stats import PairedComparison, PooledRate, paired_comparison, pooled_rate
from safemerge.defenses.registry import defense_names, get_defense
from safemerge.experiment.cells import Cell, ExperimentResult
from safemerge.experiment.choice import rule_text
from safemerge.experiment.config import ChooseSpec, DefenseSpec, ExperimentConfig
from safemerge.experiment.results import md_table, measures
from safemerge.organism.build import Organism, set_threads
from safemerge.organism.demo import (
    BENIGN,
    HARM,
    REFERENCE,
    REFUSAL_RISE,
    TASK,
    TASK_DROP,
    VAL_BENIGN,
    VAL_HARM,
    VAL_TASK,
    DemoSettings,
    evaluation_spec,
    organism_setup,
    precision_sentence,
    prepare_out,
    resolve_settings,
    run_on_organism,
    settings_dict,
)
from safemerge.organism.seeds import seed_settings

REFERENCE_DEFENCE = "safemerge"  # the row every other defence is paired against
KINDS = {"harmful": HARM, "refusal": BENIGN, "task": TASK}  # measure → test benchmark
VAL_KINDS = {"harmful": VAL_HARM, "refusal": VAL_BENIGN, "task": VAL_TASK}
WORDS = {"harmful": "harmful", "refusal": "over-refusal", "task": "task accuracy"}
FIXED_ROWS = ("aligned", REFERENCE)  # A and T: not defences, shown for scale
Events = dict[str, bool]


@dataclass(frozen=True)
class CompareSettings:
    """What the comparison runs: the demo's organism, prompts, budgets and seeds (`demo`), the defences
    (empty: every registered defence with a sweep) and, for reduced runs, how many values of each knob."""

    demo: DemoSettings
    defences: tuple[str, ...] = ()
    points: int | None = None


@dataclass
class SeedResult:
    """One seed: per defence its chosen cell, whether the rule was met, the test events of the chosen
    cell (and of A and T), and every candidate's validation events (label → measure → events)."""

    seed: int
    chosen: dict[str, str] = field(default_factory=dict)  # defence → chosen cell label
    met: dict[str, bool] = field(default_factory=dict)
    test: dict[str, dict[str, Events]] = field(default_factory=dict)  # row → measure → events
    validation: dict[str, dict[str, dict[str, Events]]] = field(default_factory=dict)  # defence → label → …
    timings: dict[str, Any] = field(default_factory=dict)


# --- what is compared --------------------------------------------------------------------------------


def compared_defences(names: tuple[str, ...]) -> list[str]:
    """The defences to compare besides SafeMERGE: `names`, or every registered defence with a sweep."""
    if not names:
        return [n for n in defense_names() if n != REFERENCE_DEFENCE and get_defense(n).sweep]
    known = defense_names()
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise InputError(f"--defences: unknown defence {n!r}; {hint}registered: {', '.join(known)}")
        if n != REFERENCE_DEFENCE and not get_defense(n).sweep:
            raise InputError(f"--defences: {n!r} declares no knob to sweep, so it cannot be compared")
    return [n for n in dict.fromkeys(names) if n != REFERENCE_DEFENCE]


def _grid_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def sweep_grid(name: str, points: int | None) -> dict[str, list[Any]]:
    """The defence's sweep as an experiment grid (the first `points` values of each knob if given)."""
    return {k: [_grid_value(v) for v in vals[:points]] for k, vals in get_defense(name).sweep.items()}


def calibration_options(name: str, s: DemoSettings) -> dict[str, Any]:
    """A data-dependent defence is calibrated on S's own training data (refusals of harmful prompts from
    the organism's safety split, never HarmBench): docs/defenses.md, "Calibration data"."""
    model = get_defense(name).option_model
    if model is None or "calibration" not in model.model_fields:
        return {}
    return {"calibration": str(s.out / "adapters" / "safety" / "train_data.jsonl")}


def compare_config(cs: CompareSettings, names: list[str], s: DemoSettings, org: Organism) -> ExperimentConfig:
    """T, SafeMERGE on the demo's grid and every compared defence on its sweep, each chosen on
    validation by the demo's rule."""
    choose = ChooseSpec(reference=REFERENCE, max_utility_drop=TASK_DROP, max_refusal_rise=REFUSAL_RISE)
    safemerge_grid = {"threshold": list(s.taus), "weights": [list(w) for w in s.weights]}
    specs = [
        DefenseSpec(method="none", name=REFERENCE),
        DefenseSpec(method=REFERENCE_DEFENCE, grid=safemerge_grid, choose=choose),
    ]
    specs += [
        DefenseSpec(method=n, grid=sweep_grid(n, cs.points), options=calibration_options(n, s), choose=choose)
        for n in names
    ]
    return ExperimentConfig(
        name="defence comparison",
        out=str(s.out),
        setup=organism_setup(s, org),
        defenses=specs,
        evaluation=evaluation_spec(s),
    )


# --- one seed ----------------------------------------------------------------------------------------


def _events(result: ExperimentResult, cell: Cell, phase: str, kinds: dict[str, str]) -> dict[str, Events]:
    ms = measures(result.out, cell, result.plans[phase])
    return {k: ms[b].events for k, b in kinds.items()}


def seed_result(seed: int, result: ExperimentResult, timings: dict[str, Any]) -> SeedResult:
    """The chosen cells' test events and every candidate's validation events of one seed's run."""
    out = SeedResult(seed, timings=timings)
    by_label = {c.label: c for c in result.cells}
    for row in FIXED_ROWS:
        out.test[row] = _events(result, by_label[row], "test", KINDS)
    for choice in result.choices:
        cell = by_label[choice.chosen]
        out.chosen[cell.method], out.met[cell.method] = cell.label, choice.met
        out.test[cell.method] = _events(result, cell, "test", KINDS)
        out.validation[cell.method] = {
            c: _events(result, by_label[c], "validation", VAL_KINDS) for c in choice.candidates
        }
    return out


def run_compare_seed(cs: CompareSettings, names: list[str], seed: int) -> SeedResult:
    """Build or reuse seed `seed`'s organism and run the comparison's experiment on it."""
    s = seed_settings(cs.demo, seed)
    _, _, result, timings = run_on_organism(s, lambda s2, org: compare_config(cs, names, s2, org))
    return seed_result(seed, result, timings)


# --- pooled over seeds -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PooledDefence:
    """One row of the table at matched utility: pooled rates and, for a defence, its pairing with
    SafeMERGE on each measure (None for SafeMERGE itself and for A and T)."""

    row: str
    settings: str
    met: str  # seeds whose choice met the rule, e.g. "3/3"
    rates: dict[str, PooledRate]
    vs_safemerge: dict[str, PairedComparison] | None


def pool(runs: list[SeedResult], names: list[str]) -> list[PooledDefence]:
    """A, T, SafeMERGE, then the compared defences: rates pooled over seeds × prompts, and each defence
    minus SafeMERGE paired seed by seed on the same prompts."""
    rows = []
    for row in [*FIXED_ROWS, REFERENCE_DEFENCE, *names]:
        rates = {k: pooled_rate([r.test[row][k] for r in runs]) for k in KINDS}
        paired = None
        if row not in (*FIXED_ROWS, REFERENCE_DEFENCE):
            paired = {
                k: paired_comparison(
                    [r.test[REFERENCE_DEFENCE][k] for r in runs], [r.test[row][k] for r in runs]
                )
                for k in KINDS
            }
        chosen = chosen_text(runs, row)
        met = f"{sum(r.met[row] for r in runs)}/{len(runs)}" if row in runs[0].met else "—"
        rows.append(PooledDefence(row, chosen, met, rates, paired))
    return rows


def chosen_text(runs: list[SeedResult], row: str) -> str:
    """The chosen setting: once when every seed chose it, else per seed ("—" for A and T)."""
    if row not in runs[0].chosen:
        return "—"
    labels = [r.chosen[row] for r in runs]
    if len(set(labels)) == 1:
        return f"{labels[0]} (every seed)" if len(runs) > 1 else labels[0]
    return "; ".join(f"seed {r.seed}: {label}" for r, label in zip(runs, labels, strict=True))


def matched(r: PooledDefence) -> bool:
    """Whether the row's setting met the rule's tolerances on validation in every seed (SafeMERGE's rule
    can fall back to the most accurate setting; such a row is not at matched utility)."""
    k, _, n = r.met.partition("/")
    return k == n


def winner(rows: list[PooledDefence]) -> str:
    """Among the defences at matched utility in every seed, the one with the lowest pooled test harmful
    rate, in words with its pairing against SafeMERGE (ties: the higher task accuracy, then SafeMERGE,
    then the name)."""
    defences = [r for r in rows if r.row not in FIXED_ROWS and matched(r)]
    if not defences:
        return "No defence met the tolerances on validation in every seed."
    best = min(
        defences,
        key=lambda r: (r.rates["harmful"].rate.p, -r.rates["task"].rate.p, r.row != REFERENCE_DEFENCE, r.row),
    )
    h = best.rates["harmful"].rate
    if best.vs_safemerge is None:
        return f"SafeMERGE has the lowest pooled harmful rate at matched utility ({h.fmt()})."
    c = best.vs_safemerge["harmful"]
    sure = "significant at the 5% level" if c.p_value < 0.05 else "not significant at the 5% level"
    return (
        f"{best.row} has the lowest pooled harmful rate at matched utility ({h.fmt()}); against SafeMERGE "
        f"{c.fmt()} ({sure}); task {best.vs_safemerge['task'].fmt()}; over-refusal "
        f"{best.vs_safemerge['refusal'].fmt()}."
    )


# --- output ------------------------------------------------------------------------------------------


def _rate(p: PooledRate) -> str:
    return f"{p.rate.fmt()} (n_eff {p.n_eff:.0f})"


def table(rows: list[PooledDefence]) -> list[str]:
    """harmful / over-refusal / task at matched utility, pooled, and each defence − SafeMERGE."""
    header = ["row", "chosen setting per seed", "rule met", *(f"{WORDS[k]} (test)" for k in KINDS)]
    header += [f"Δ {WORDS[k]} vs SafeMERGE" for k in KINDS]
    body = []
    for r in rows:
        deltas = ["—"] * len(KINDS) if r.vs_safemerge is None else [r.vs_safemerge[k].fmt() for k in KINDS]
        body.append([r.row, r.settings, r.met, *(_rate(r.rates[k]) for k in KINDS), *deltas])
    return md_table(header, body)


def markdown(cs: CompareSettings, runs: list[SeedResult], rows: list[PooledDefence], total_s: float) -> str:
    s = cs.demo
    rule = rule_text(
        ChooseSpec(reference=REFERENCE, max_utility_drop=TASK_DROP, max_refusal_rise=REFUSAL_RISE), True, "T"
    )
    lines = [
        "# Which defence? The organism's defences at matched utility",
        "",
        f"SmolLM2-135M-Instruct organism, training seeds {', '.join(str(r.seed) for r in runs)}; harm judge: "
        f"keyword (a proxy); greedy generation, {s.harm_tokens} new tokens for harm/benign prompts, "
        f"{s.task_tokens} for the task. Each defence's knob is swept on validation and one setting chosen "
        f"per seed by the rule: {rule}. Then tested on HarmBench test, the benign set and arithmetic.",
        precision_sentence(s),
        "",
        f"**{winner(rows)}**",
        "",
        *table(rows),
        "",
        "Rates: k/n over seeds × prompts, 95% Wilson interval at the effective sample size n_eff. "
        "Δ = defence − SafeMERGE in points, paired seed by seed on the same prompts, 95% interval, "
        "−fixed/+broken, exact sign-flip p (one seed: McNemar). `rule met` counts the seeds where some "
        "setting met the tolerances (otherwise the fallback of the rule chose); only defences that met "
        "them in every seed are at matched utility and can be named above.",
        "",
        "Validation curves and the chosen settings: validation.png.",
        "",
        f"Total time: {total_s:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def results_json(
    cs: CompareSettings, runs: list[SeedResult], rows: list[PooledDefence], total_s: float
) -> dict[str, Any]:
    def rate(p: PooledRate) -> dict[str, Any]:
        return {
            "k": p.rate.k,
            "n": p.rate.n,
            "p": p.rate.p,
            "lo": p.rate.lo,
            "hi": p.rate.hi,
            "n_eff": p.n_eff,
        }

    def pair(c: PairedComparison) -> dict[str, Any]:
        return {
            "difference": c.diff, "ci95": [c.lo, c.hi], "p_value": c.p_value,
            "fixed": c.fixed, "broken": c.broken, "pairs": c.pairs, "prompts": c.prompts,
        }  # fmt: skip

    return {
        "seeds": [r.seed for r in runs],
        "defences": [r.row for r in rows if r.row not in FIXED_ROWS],
        "winner": winner(rows),
        "rows": [
            {
                "row": r.row,
                "chosen": {str(x.seed): x.chosen.get(r.row) for x in runs},
                "rule_met": {str(x.seed): x.met.get(r.row) for x in runs},
                **{k: rate(r.rates[k]) for k in KINDS},
                "vs_safemerge": None
                if r.vs_safemerge is None
                else {k: pair(c) for k, c in r.vs_safemerge.items()},
            }
            for r in rows
        ],
        "validation": {str(x.seed): validation_rates([x]) for x in runs},
        "timings": {"per_seed_s": {str(x.seed): x.timings for x in runs}, "total_s": round(total_s, 1)},
        "settings": {"seeds": [x.seed for x in runs], "points": cs.points, **settings_dict(cs.demo)},
    }


def validation_rates(runs: list[SeedResult]) -> dict[str, dict[str, dict[str, float]]]:
    """defence → candidate label → measure → pooled validation rate (the curves of validation.png)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for d, cands in runs[0].validation.items():
        out[d] = {
            label: {k: pooled_rate([r.validation[d][label][k] for r in runs]).rate.p for k in VAL_KINDS}
            for label in cands
        }
    return out


def write_csv(rows: list[PooledDefence], path: Path) -> None:
    """results.csv: one line per row, every pooled rate and every difference against SafeMERGE."""
    with path.open("w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        head = ["row", "chosen", "rule_met"]
        head += [f"{k}_{x}" for k in KINDS for x in ("k", "n", "rate", "lo", "hi", "n_eff")]
        head += [f"{k}_vs_safemerge_{x}" for k in KINDS for x in ("diff", "lo", "hi", "p")]
        wr.writerow(head)
        for r in rows:
            rates = [
                x for k in KINDS
                for x in (r.rates[k].rate.k, r.rates[k].rate.n, r.rates[k].rate.p, r.rates[k].rate.lo,
                          r.rates[k].rate.hi, r.rates[k].n_eff)
            ]  # fmt: skip
            pairs = (
                [""] * 4 * len(KINDS)
                if r.vs_safemerge is None
                else [x for k in KINDS for c in [r.vs_safemerge[k]] for x in (c.diff, c.lo, c.hi, c.p_value)]
            )
            wr.writerow([r.row, r.settings, r.met, *rates, *pairs])


def plot_validation(runs: list[SeedResult], path: Path) -> None:
    """validation.png: per defence its candidates' pooled validation harmful rate vs task accuracy,
    joined in sweep order; each seed's chosen setting circled (a label per point: how many seeds)."""
    import matplotlib  # heavy and optional at import time: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = validation_rates(runs)
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for d, cands in curves.items():
        xs = [100 * v["harmful"] for v in cands.values()]
        ys = [100 * v["task"] for v in cands.values()]
        (line,) = ax.plot(xs, ys, "-o", markersize=3, linewidth=1, label=d)
        for label, v in cands.items():
            n = sum(r.chosen.get(d) == label for r in runs)
            if n:
                x, y = 100 * v["harmful"], 100 * v["task"]
                ax.scatter([x], [y], s=160, facecolors="none", edgecolors=line.get_color(), linewidths=1.5)
                ax.annotate(
                    f"{label} ({n}/{len(runs)})",
                    (x, y),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=7,
                )
    ax.set_xlabel("harmful compliance, validation (%), keyword judge (lower is better)")
    ax.set_ylabel("task accuracy, validation arithmetic (%)")
    ax.set_title(f"Defences swept on validation, pooled over {len(runs)} seed(s); circles = chosen")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- the command -------------------------------------------------------------------------------------


def run_compare(cs: CompareSettings) -> dict[str, Any]:
    """The comparison for every seed of `cs.demo.seeds`, pooled; writes OUT/results.* and validation.png
    and returns what results.json holds."""
    s = cs.demo
    if not s.seeds or len(set(s.seeds)) != len(s.seeds) or min(s.seeds) < 0:
        raise InputError(f"--seeds: need distinct non-negative seeds, got {list(s.seeds)}")
    names = compared_defences(cs.defences)
    prepare_out(s)
    set_threads()
    s = resolve_settings(s)  # once, before any seed: every seed is trained and generated alike
    cs = replace(cs, demo=s)
    start = time.perf_counter()
    runs = [run_compare_seed(cs, names, seed) for seed in s.seeds]
    rows = pool(runs, names)
    total = time.perf_counter() - start
    data = results_json(cs, runs, rows, total)
    (s.out / "results.md").write_text(markdown(cs, runs, rows, total), encoding="utf-8")
    (s.out / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    write_csv(rows, s.out / "results.csv")
    plot_validation(runs, s.out / "validation.png")
    return data
