"""The outputs of `safemerge experiment` (and the demo's tables): results.csv / .md / .json, pareto.png.

Rows are the cells (the models, then every defence × grid point in config order; a defence with
`choose` contributes its chosen cell and derived controls); columns are the headline metric of every
benchmark (utility: accuracy; harm: harmful rate; benign: refusal rate) with counts and a Wilson 95%
interval, how many modules the defence changed and, with `flips_vs`, the paired flips against that row.
The Pareto plot puts the mean harmful rate over the harm benchmarks against the mean accuracy over the
utility benchmarks. Everything that reads evaluations back, builds tables or draws the front lives here.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from safemerge.common.stats import Flips, Rate, paired_flips, wilson
from safemerge.evaluate.api import judges_label
from safemerge.evaluate.report import other_judges
from safemerge.experiment.cells import Cell, EvalPlan, ExperimentResult, benchmark_kind, eval_dir, variant_dir
from safemerge.experiment.choice import Summary
from safemerge.experiment.config import ExperimentConfig

HEADLINE = {"utility": "accuracy", "harm": "harmful_rate", "benign": "refusal_rate"}
COUNT = {"utility": "n_correct", "harm": "n_unsafe", "benign": "n_refused"}
SHORT = {"utility": "acc", "harm": "harmful", "benign": "refusal"}
EVENT = {"utility": "correct", "harm": "unsafe", "benign": "refused"}  # the verdict each rate counts


def bench_label(name: str) -> str:
    """A benchmark's column name (a JSONL path becomes its file stem)."""
    return Path(name).stem if name.endswith((".jsonl", ".json")) else name


# --- reading evaluations back ------------------------------------------------------------------------
def report_modules(variant: Path) -> tuple[int, int] | None:
    """(modules merged or projected, modules in the task LoRA) from a variant's defence report."""
    try:
        summary = json.loads((variant / "safemerge_report.json").read_text(encoding="utf-8"))["summary"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    return int(summary["merged"]), int(summary["modules"])


def modules_changed(variant: Path, method: str) -> tuple[int | None, int | None]:
    """(changed, total) from a variant's report: merged/projected modules, or RESTA's edited tensors."""
    if method in ("aligned", "unaligned"):
        return None, None
    counts = report_modules(variant)
    if counts is None:
        return None, None
    report = json.loads((variant / "safemerge_report.json").read_text(encoding="utf-8"))
    if "edited_tensors" in report["options"]:  # a full-model edit (RESTA) counts tensors, not modules
        return int(report["options"]["edited_tensors"]), None
    return counts


@dataclass(frozen=True)
class Measure:
    """One benchmark's result for one row: the metrics as evaluated, the headline rate with its Wilson
    interval (None when no response could be judged) and the per-prompt events (id → counted or not;
    malformed judge outputs left out), which paired comparisons need."""

    kind: str
    metrics: dict[str, Any]
    rate: Rate | None
    events: dict[str, bool]
    judge_events: dict[str, dict[str, bool]] = field(default_factory=dict)  # further judges, by key


def read_records(out: Path, cell: Cell, plan: EvalPlan) -> list[dict[str, Any]]:
    """Every prompt, response and verdict of one evaluated row."""
    text = (eval_dir(out, cell, plan) / "generations.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def measures(out: Path, cell: Cell, plan: EvalPlan) -> dict[str, Measure]:
    """Benchmark name → Measure for one evaluated row, read from its evaluation directory."""
    metrics = json.loads((eval_dir(out, cell, plan) / "metrics.json").read_text(encoding="utf-8"))
    records = read_records(out, cell, plan)
    result = {}
    for name, m in metrics.items():
        kind = m["kind"]
        n = m.get("n", 0) - m.get("n_malformed", 0)
        rate = wilson(int(m[COUNT[kind]]), n) if n else None
        events = {
            r["id"]: r["verdict"] == EVENT[kind]
            for r in records
            if r["benchmark"] == name and r["verdict"] != "malformed"
        }
        result[name] = Measure(kind, m, rate, events, further_judge_events(records, name))
    return result


def further_judge_events(records: list[dict[str, Any]], bench: str) -> dict[str, dict[str, bool]]:
    """Per further judge (a key of the records' `judges`), prompt id → judged harmful, malformed left
    out: what the pooled tables need to report every judge, not only the headline one."""
    out: dict[str, dict[str, bool]] = {}
    for r in records:
        if r["benchmark"] != bench:
            continue
        for key, j in (r.get("judges") or {}).items():
            if j["verdict"] != "malformed":
                out.setdefault(key, {})[r["id"]] = j["verdict"] == "unsafe"
    return out


def mean_rate(ms: dict[str, Measure], kind: str) -> float | None:
    """Mean headline rate over the benchmarks of one kind (None without any)."""
    rates = [m.rate.p for m in ms.values() if m.kind == kind and m.rate is not None]
    return sum(rates) / len(rates) if rates else None


def summary(ms: dict[str, Measure]) -> Summary:
    """Mean harmful, utility and refusal rates: what a validation choice compares."""
    return Summary(mean_rate(ms, "harm"), mean_rate(ms, "utility"), mean_rate(ms, "benign"))


def flips_vs(reference: Measure, other: Measure) -> Flips:
    """Paired flips of `other` against `reference` on the prompts both could be judged on."""
    common = reference.events.keys() & other.events.keys()
    return paired_flips({i: reference.events[i] for i in common}, {i: other.events[i] for i in common})


# --- the Pareto front --------------------------------------------------------------------------------
def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For (harmful rate, utility) points: True where no other point is at least as good on both and
    better on one (lower harmful rate, higher utility); False for a point missing either value."""
    out = []
    for h, u in points:
        if h is None or u is None:
            out.append(False)
            continue
        dominated = any(
            h2 is not None and u2 is not None and h2 <= h and u2 >= u and (h2 < h or u2 > u)
            for h2, u2 in points
        )
        out.append(not dominated)
    return out


# --- rows of `safemerge experiment` ------------------------------------------------------------------
def _plain(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "/".join(_plain(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _metric_columns(cfg: ExperimentConfig, ms: dict[str, Measure]) -> dict[str, Any]:
    """The per-benchmark columns of one row, as metrics.json has them."""
    row: dict[str, Any] = {}
    for name in (b.name for b in cfg.evaluation.planned("test")):
        if name not in ms:
            continue
        m, b = ms[name].metrics, bench_label(name)
        kind = m["kind"]
        row[f"{b}_kind"] = kind
        row[f"{b}_{HEADLINE[kind]}"] = m.get(HEADLINE[kind])
        row[f"{b}_count"] = m.get(COUNT[kind])
        row[f"{b}_n"] = m.get("n", 0) - m.get("n_malformed", 0)
        if "accuracy_flexible" in m:
            row[f"{b}_accuracy_flexible"] = m["accuracy_flexible"]
        if "n_truncated" in m:  # answers cut off at the token budget (None: the backend did not say)
            row[f"{b}_n_truncated"] = m["n_truncated"]
        for k in other_judges(m) if kind == "harm" else []:  # further judges, beside the headline one
            row[f"{b}_harmful_rate_{k}"] = m.get(f"harmful_rate_{k}")
            row[f"{b}_count_{k}"] = m.get(f"n_unsafe_{k}")
            row[f"{b}_n_{k}"] = m.get("n", 0) - m.get(f"n_malformed_{k}", 0)
    return row


def _interval_columns(ms: dict[str, Measure]) -> dict[str, Any]:
    """Wilson 95% bounds of every benchmark's headline rate (appended after the original columns)."""
    row: dict[str, Any] = {}
    for name, m in ms.items():
        b = bench_label(name)
        row[f"{b}_ci95_lo"] = None if m.rate is None else m.rate.lo
        row[f"{b}_ci95_hi"] = None if m.rate is None else m.rate.hi
    return row


def _flip_columns(reference: dict[str, Measure], ms: dict[str, Measure], same: bool) -> dict[str, Any]:
    """Paired flips on every harm benchmark against the `flips_vs` row (empty for that row itself)."""
    row: dict[str, Any] = {}
    for name, m in ms.items():
        if m.kind != "harm" or name not in reference:
            continue
        f = None if same else flips_vs(reference[name], m)
        b = bench_label(name)
        row[f"{b}_flips_fixed"] = None if f is None else f.fixed
        row[f"{b}_flips_broken"] = None if f is None else f.broken
        row[f"{b}_flips_p"] = None if f is None else f.p_value
    return row


def build_rows(
    cfg: ExperimentConfig, out: Path, result: ExperimentResult, plan: EvalPlan
) -> list[dict[str, Any]]:
    """One flat row per table cell with its metrics (None where a benchmark has no value); a cell that
    failed (`result.failed`) has no row."""
    table = [c for c in result.table if c.label not in result.failed]
    ms = {c.label: measures(out, c, plan) for c in table}
    ref = cfg.evaluation.flips_vs
    roles = any(c.role != "row" for c in table)
    rows = []
    for c in table:
        changed, total = modules_changed(variant_dir(out, c), c.method)
        row: dict[str, Any] = {
            "label": c.label,
            "method": c.method,
            "name": c.name,
            "settings": ", ".join(f"{k}={_plain(v)}" for k, v in c.given.items()),
            "modules_changed": changed,
            "modules_total": total,
            **_metric_columns(cfg, ms[c.label]),
        }
        row["utility"] = mean_rate(ms[c.label], "utility")
        row["harm"] = mean_rate(ms[c.label], "harm")
        row["key"] = c.key
        row["variant"] = "" if c.method in ("aligned", "unaligned") else str(variant_dir(out, c))
        row["eval"] = str(eval_dir(out, c, plan))
        rows.append(row)
    for row, c, front in zip(
        rows, table, pareto_front([(r["harm"], r["utility"]) for r in rows]), strict=True
    ):
        row["pareto"] = front
        row.update(_interval_columns(ms[c.label]))
        if ref is not None and ref in ms:  # the reference row may have failed
            row.update(_flip_columns(ms[ref], ms[c.label], c.label == ref))
        if roles:
            row["role"] = c.role
    return rows


# --- tables ------------------------------------------------------------------------------------------
def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """A Markdown table as lines; `align` has one character per column (`l` or `r`, default all `l`)."""
    spec = align or "l" * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if a == "r" else "---|" for a in spec)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * float(x):.1f}"


def columns(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(benchmark label, metric key, header) for every test benchmark, in config order."""
    cols = []
    for name in (b.name for b in cfg.evaluation.planned("test")):
        b = bench_label(name)
        kind = (
            next((r[f"{b}_kind"] for r in rows if r.get(f"{b}_kind")), None) or benchmark_kind(name) or "harm"
        )
        cols.append((b, f"{b}_{HEADLINE[kind]}", f"{b} {SHORT[kind]} %"))
        prefix = f"{b}_harmful_rate_"
        others = dict.fromkeys(k.removeprefix(prefix) for r in rows for k in r if k.startswith(prefix))
        cols += [(b, f"{prefix}{k}", f"{b} {SHORT['harm']} % ({k})") for k in others]
    return cols


def _counts(b: str, key: str) -> tuple[str, str]:
    """The count and n columns of a rate column: the headline's, or a further judge's (suffixed)."""
    judge = key.removeprefix(f"{b}_harmful_rate_") if key.startswith(f"{b}_harmful_rate_") else ""
    return (f"{b}_count_{judge}", f"{b}_n_{judge}") if judge else (f"{b}_count", f"{b}_n")


def _changed(r: dict[str, Any]) -> str:
    changed = "" if r["modules_changed"] is None else str(r["modules_changed"])
    if r["modules_total"] is not None:
        changed += f"/{r['modules_total']}"
    elif r["modules_changed"] is not None:  # tensors of a full-model edit (RESTA)
        changed += " tensors"
    return changed


def _interval(r: dict[str, Any], b: str) -> str:
    lo, hi = r.get(f"{b}_ci95_lo"), r.get(f"{b}_ci95_hi")
    return "n/a" if lo is None or hi is None else f"[{_pct(lo)}, {_pct(hi)}]"


def _flips_cell(r: dict[str, Any], b: str) -> str:
    if r.get(f"{b}_flips_p") is None:
        return "—"
    return Flips(r[f"{b}_flips_fixed"], r[f"{b}_flips_broken"], 0, 0).fmt()


def main_table(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> list[str]:
    """The results table: defence, settings, modules changed, every headline rate (count), then the
    Wilson intervals and, with `flips_vs`, the paired flips on each harm benchmark."""
    cols = columns(cfg, rows)
    flip_cols = [
        b for b in dict.fromkeys(b for b, _, _ in cols) if any(f"{b}_flips_fixed" in r for r in rows)
    ]
    header = ["defence", "settings", "modules changed", *(h for _, _, h in cols)]
    heads = list(dict.fromkeys(b for b, _, _ in cols))  # one interval per benchmark: the headline's
    header += [f"{b} 95% CI" for b in heads]
    header += [f"{b} flips vs {cfg.evaluation.flips_vs} (−fixed/+broken, McNemar p)" for b in flip_cols]
    body = []
    for r in rows:
        cells = [
            "n/a"
            if r.get(key) is None
            else f"{_pct(r[key])} ({r.get(_counts(b, key)[0])}/{r.get(_counts(b, key)[1])})"
            for b, key, _ in cols
        ]
        star = " ★" if r.get("pareto") else ""
        body.append(
            [f"{r['name']}{star}", r["settings"] or "—", _changed(r), *cells]
            + [_interval(r, b) for b in heads]
            + [_flips_cell(r, b) for b in flip_cols]
        )
    return md_table(header, body, "llr" + "r" * (len(header) - 3))


def validation_table(
    names: Sequence[str], rates: Sequence[dict[str, Rate | None]], chosen: set[str]
) -> list[str]:
    """Rows evaluated on validation: one column per validation benchmark (k/n = p% [Wilson 95%])."""
    benches = list(dict.fromkeys(b for r in rates for b in r))
    body = [
        [n + (" **(chosen)**" if n in chosen else ""), *(_fmt_rate(r.get(b)) for b in benches)]
        for n, r in zip(names, rates, strict=True)
    ]
    return md_table(["variant", *benches], body)


def _fmt_rate(r: Rate | None) -> str:
    return "n/a" if r is None else r.fmt()


def markdown(
    cfg: ExperimentConfig, rows: list[dict[str, Any]], result: ExperimentResult, val_plan: EvalPlan | None
) -> str:
    """results.md: the settings, the table, the validation choices, the reference numbers."""
    ev = cfg.evaluation
    judge = (
        "keyword refusal matching (a proxy, not a safety judge)" if ev.judge == "keyword" else ev.judge_model
    )
    if not isinstance(ev.judge, str) or "harmful_rate_" in " ".join(k for r in rows for k in r):
        judge = judges_label(ev.judge, ev.judge_model) + "; `(judge)` columns: a further judge's rate"
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        f"- aligned: `{cfg.setup.aligned}`; unaligned: `{cfg.setup.unaligned}`",
        f"- harm judge: {judge}; backend {ev.backend}; max_new_tokens {ev.max_new_tokens}"
        + (f"; first {ev.limit} prompts per benchmark" if ev.limit else ""),
        "- utility columns: accuracy; harm columns: share of responses judged harmful (lower is better);"
        " refusal: share of benign prompts refused. Counts in parentheses. ★ = on the Pareto front"
        " (mean harmful rate vs mean utility).",
        "",
        *main_table(cfg, rows),
    ]
    if result.choices and val_plan is not None:
        lines += validation_section(cfg.evaluation.validate_also, result, val_plan)
    if result.failed:
        lines += failed_section(result.failed)
    if cfg.reference:
        lines += [
            "",
            "## Reference numbers (third-party digests of the paper, not verified against the PDF)",
            "",
            "```yaml",
            yaml.safe_dump(cfg.reference, sort_keys=False).rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def validation_rates(
    out: Path, cells: Sequence[Cell], plan: EvalPlan, failed: Collection[str] = ()
) -> dict[str, dict[str, Rate | None]]:
    """Row label → validation benchmark → rate, for the rows evaluated on validation (not `failed`)."""
    return {
        c.label: {b: m.rate for b, m in measures(out, c, plan).items()}
        for c in cells
        if c.validates and c.label not in failed
    }


def failed_section(failed: Mapping[str, str]) -> list[str]:
    """The cells that kept failing (their rows are missing from the table), each with its last error."""
    lines = ["", "## Failed cells (not in the table; rerun to retry them)", ""]
    return lines + [f"- {label}: {' '.join(error.split())}" for label, error in failed.items()]


def validation_section(also: Sequence[str], result: ExperimentResult, plan: EvalPlan) -> list[str]:
    """The choices made on validation and the table of every row evaluated there."""
    rates = validation_rates(result.out, result.cells, plan, result.failed)
    chosen = {ch.chosen for ch in result.choices}
    lines = ["", "## Validation (chooses one grid cell; not the test set)", ""]
    for ch in result.choices:
        lines.append(f"- {ch.defence}: rule: {ch.rule}. Chosen: **{ch.chosen}**.")
    if also:
        lines.append(f"- also evaluated here (informative only): {', '.join(also)}")
    return [*lines, "", *validation_table(list(rates), list(rates.values()), chosen)]


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in keys})


# --- the plot ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlotPoint:
    """One row in the harmful-rate / utility plane, in percent; `xerr`/`yerr` are interval bounds."""

    label: str
    group: str  # one colour per group (the method or defence)
    x: float
    y: float
    front: bool
    xerr: tuple[float, float] | None = None
    yerr: tuple[float, float] | None = None


def _label_groups(points: Sequence[PlotPoint]) -> dict[tuple[float, float], list[str]]:
    """Labels by plotted position: rows at the same point share one annotation."""
    groups: dict[tuple[float, float], list[str]] = {}
    for p in points:
        groups.setdefault((p.x, p.y), []).append(p.label)
    return groups


def _draw_points(ax: Any, points: Sequence[PlotPoint]) -> None:
    """Markers coloured by group (with interval bars when given), one legend entry per group."""
    groups = list(dict.fromkeys(p.group for p in points))
    for i, g in enumerate(groups):
        mine = [p for p in points if p.group == g]
        xs, ys = [p.x for p in mine], [p.y for p in mine]
        if all(p.xerr and p.yerr for p in mine):
            xerr = [
                [max(0.0, p.x - p.xerr[0]) for p in mine if p.xerr],
                [max(0.0, p.xerr[1] - p.x) for p in mine if p.xerr],
            ]
            yerr = [
                [max(0.0, p.y - p.yerr[0]) for p in mine if p.yerr],
                [max(0.0, p.yerr[1] - p.y) for p in mine if p.yerr],
            ]
            ax.errorbar(
                xs,
                ys,
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                ms=6,
                capsize=3,
                color=f"C{i}",
                label=g,
                zorder=3,
                alpha=0.8,
            )
        else:
            ax.scatter(xs, ys, s=40, color=f"C{i}", label=g, zorder=3)


def plot_front(points: Sequence[PlotPoint], path: Path, title: str, xlabel: str, ylabel: str) -> None:
    """Harmful rate (x, lower is better) vs utility (y, higher is better): every row, the Pareto front
    joined and circled, rows at the same point labelled once, nearby labels staggered."""
    import matplotlib  # heavy and optional at import time: only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    _draw_points(ax, points)
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    if front:
        ax.plot(
            [p.x for p in front],
            [p.y for p in front],
            "-",
            color="black",
            linewidth=1,
            zorder=2,
            label="Pareto front",
        )
        ax.scatter([p.x for p in front], [p.y for p in front], s=140, facecolors="none", edgecolors="black",
                   linewidths=1.2, zorder=4)  # fmt: skip
    placed: list[tuple[float, float]] = []
    for (x, y), names in _label_groups(points).items():
        near = sum(abs(x - px) < 4 and abs(y - py) < 2 for px, py in placed)  # stagger close labels
        placed.append((x, y))
        ax.annotate(
            ", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5 - 11 * near), fontsize=7
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """The experiment's plot (mean harmful rate vs mean utility); False when no row has both values."""
    pts = [
        PlotPoint(
            r["settings"] or r["label"],
            r["method"],
            100 * r["harm"],
            100 * r["utility"],
            bool(r.get("pareto")),
        )
        for r in rows
        if r["harm"] is not None and r["utility"] is not None
    ]
    if not pts:
        return False
    plot_front(
        pts,
        path,
        title,
        "harmful rate, % (mean over harm benchmarks; lower is better)",
        "utility, % (mean accuracy over utility benchmarks)",
    )
    return True


# --- writing -----------------------------------------------------------------------------------------
def rate_dict(r: Rate | None) -> dict[str, Any] | None:
    """A rate for JSON: k, n, rate, ci95."""
    return None if r is None else {"k": r.k, "n": r.n, "rate": r.p, "ci95": [r.lo, r.hi]}


def write_results(
    cfg: ExperimentConfig, out: Path, result: ExperimentResult, plan: EvalPlan, val_plan: EvalPlan | None
) -> list[dict[str, Any]]:
    """results.csv, results.md, results.json and pareto.png (when rows have a harm and a utility value)."""
    rows = build_rows(cfg, out, result, plan)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(cfg, rows, result, val_plan), encoding="utf-8")
    data: dict[str, Any] = {
        "name": cfg.name,
        "evaluation": cfg.evaluation.model_dump(mode="json"),
        "rows": rows,
    }
    if result.choices and val_plan is not None:
        rates = validation_rates(out, result.cells, val_plan, result.failed)
        data["validation"] = {n: {b: rate_dict(r) for b, r in rs.items()} for n, rs in rates.items()}
        data["choices"] = [vars(ch) for ch in result.choices]
    if result.failed:
        data["failed"] = dict(result.failed)
    (out / "results.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    if not plot_pareto(rows, out / "pareto.png", f"{cfg.name}: harmfulness vs utility"):
        (out / "pareto.png").unlink(missing_ok=True)
    return rows


def print_cells(cfg: ExperimentConfig, cells: list[Cell], console: Console) -> None:
    """The dry-run listing: every cell with its settings, key and cache status."""
    table = Table(title=f"{len(cells)} cells")
    for col in ("#", "defence", "method", "settings", "key", "status"):
        table.add_column(col)
    for i, c in enumerate(cells):
        settings = ", ".join(f"{k}={_plain(v)}" for k, v in c.given.items())
        status = c.status + (" (candidate)" if c.role == "candidate" else "")
        table.add_row(str(i + 1), c.name, c.method, settings or "(defaults)", c.key[:12], status)
    console.print(table)
    for d in cfg.defenses:
        if d.choose is not None:
            controls = f", then {' and '.join(d.choose.controls)} of it" if d.choose.controls else ""
            console.print(
                f"{d.name or d.method}: one candidate is chosen on validation{controls}", highlight=False
            )


def print_rows(rows: list[dict[str, Any]], console: Console) -> None:
    """The results table on the console: the mean headline rates and, with several judges, each further
    judge's mean harmful rate in a column of its own (`harmful % (judge)`, as results.md names them)."""
    judges = further_judges(rows)
    table = Table(title="results")
    table.add_column("defence")
    table.add_column("changed", justify="right")
    table.add_column("utility %", justify="right")
    table.add_column("harmful %", justify="right")
    for k in judges:
        table.add_column(f"harmful % ({k})", justify="right")
    for r in rows:
        table.add_row(
            r["label"] + (" ★" if r.get("pareto") else ""),
            "" if r["modules_changed"] is None else str(r["modules_changed"]),
            _pct(r["utility"]),
            _pct(r["harm"]),
            *(_pct(judge_mean(r, k)) for k in judges),
        )
    console.print(table)


def further_judges(rows: list[dict[str, Any]]) -> list[str]:
    """The further judges of the table's rows (keys of their `<bench>_harmful_rate_<judge>` columns)."""
    marker = "_harmful_rate_"
    return list(dict.fromkeys(k.split(marker, 1)[1] for r in rows for k in r if marker in k))


def judge_mean(row: dict[str, Any], judge: str) -> float | None:
    """A further judge's harmful rate averaged over the harm benchmarks it judged (None without any):
    the `harmful %` column's mean, by that judge."""
    rates = [v for k, v in row.items() if k.endswith(f"_harmful_rate_{judge}") and v is not None]
    return sum(rates) / len(rates) if rates else None
