"""The outputs of `safemerge experiment`: results.csv / results.md / results.json and pareto.png.

Rows are the cells (aligned model, then every defence × grid point in config order); columns are the
headline metric of every benchmark (utility: accuracy; harm: harmful rate; benign: refusal rate) with
counts, plus how many modules the defence changed. The Pareto plot puts the mean harmful rate over the
harm benchmarks against the mean accuracy over the utility benchmarks.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from safemerge.experiment.runner import Cell, ExperimentConfig

HEADLINE = {"utility": "accuracy", "harm": "harmful_rate", "benign": "refusal_rate"}
COUNT = {"utility": "n_correct", "harm": "n_unsafe", "benign": "n_refused"}
SHORT = {"utility": "acc", "harm": "harmful", "benign": "refusal"}


def bench_label(name: str) -> str:
    """A benchmark's column name (a JSONL path becomes its file stem)."""
    return Path(name).stem if name.endswith((".jsonl", ".json")) else name


def modules_changed(variant: Path, method: str) -> tuple[int | None, int | None]:
    """(changed, total) from a variant's report: merged/projected modules, or RESTA's edited tensors."""
    if method in ("aligned", "safeinstr"):
        return None, None
    try:
        report = json.loads((variant / "safemerge_report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None, None
    total = report["summary"]["modules"]
    if method == "resta":
        return int(report["options"]["edited_tensors"]), None
    return int(report["summary"]["merged"]), int(total)


def build_rows(cfg: ExperimentConfig, out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """One flat row per cell with its metrics (None where a benchmark has no value)."""
    from safemerge.experiment.runner import eval_dir, variant_dir

    rows = []
    for c in cells:
        metrics = json.loads((eval_dir(cfg, out, c) / "metrics.json").read_text(encoding="utf-8"))
        changed, total = modules_changed(variant_dir(out, c), c.method)
        row: dict[str, Any] = {
            "label": c.label,
            "method": c.method,
            "name": c.name,
            "settings": ", ".join(f"{k}={_plain(v)}" for k, v in c.given.items()),
            "modules_changed": changed,
            "modules_total": total,
        }
        for name in cfg.evaluation.benchmarks:
            m = metrics.get(name, {})
            b = bench_label(name)
            kind = m.get("kind")
            if kind is None:
                continue
            row[f"{b}_kind"] = kind
            row[f"{b}_{HEADLINE[kind]}"] = m.get(HEADLINE[kind])
            row[f"{b}_count"] = m.get(COUNT[kind])
            row[f"{b}_n"] = m.get("n", 0) - m.get("n_malformed", 0)
            if "accuracy_flexible" in m:
                row[f"{b}_accuracy_flexible"] = m["accuracy_flexible"]
        row["utility"] = _mean(row, cfg, "utility")
        row["harm"] = _mean(row, cfg, "harm")
        row["key"] = c.key
        row["variant"] = "" if c.method == "aligned" else str(variant_dir(out, c))
        row["eval"] = str(eval_dir(cfg, out, c))
        rows.append(row)
    for row, front in zip(rows, pareto_front(rows), strict=True):
        row["pareto"] = front
    return rows


def _plain(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "/".join(_plain(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _mean(row: dict[str, Any], cfg: ExperimentConfig, kind: str) -> float | None:
    vals = [
        row[f"{bench_label(n)}_{HEADLINE[kind]}"]
        for n in cfg.evaluation.benchmarks
        if row.get(f"{bench_label(n)}_kind") == kind
        and row.get(f"{bench_label(n)}_{HEADLINE[kind]}") is not None
    ]
    return sum(vals) / len(vals) if vals else None


def pareto_front(rows: list[dict[str, Any]]) -> list[bool]:
    """Rows not dominated in (lower mean harmful rate, higher mean utility); False without both values."""
    pts = [(r["harm"], r["utility"]) for r in rows]
    out = []
    for h, u in pts:
        if h is None or u is None:
            out.append(False)
            continue
        dominated = any(
            h2 is not None and u2 is not None and h2 <= h and u2 >= u and (h2 < h or u2 > u) for h2, u2 in pts
        )
        out.append(not dominated)
    return out


def _pct(x: Any) -> str:
    return "" if x is None else f"{100 * float(x):.1f}"


def columns(cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(benchmark label, metric key, header) for every benchmark, in config order."""
    from safemerge.evaluate.benchmarks import BENIGN, UTILITY

    cols = []
    for name in cfg.evaluation.benchmarks:
        kind = "utility" if name in UTILITY else "benign" if name in BENIGN else "harm"
        b = bench_label(name)
        cols.append((b, f"{b}_{HEADLINE[kind]}", f"{b} {SHORT[kind]} %"))
    return cols


def markdown(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> str:
    ev = cfg.evaluation
    judge = (
        "keyword refusal matching (a proxy, not a safety judge)" if ev.judge == "keyword" else ev.judge_model
    )
    cols = columns(cfg)
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
        "| defence | settings | modules changed | " + " | ".join(h for _, _, h in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for r in rows:
        changed = "" if r["modules_changed"] is None else str(r["modules_changed"])
        if r["modules_total"] is not None:
            changed += f"/{r['modules_total']}"
        elif r["method"] == "resta":
            changed += " tensors"
        cells = []
        for b, key, _ in cols:
            value = r.get(key)
            cells.append(
                "n/a" if value is None else f"{_pct(value)} ({r.get(f'{b}_count')}/{r.get(f'{b}_n')})"
            )
        star = " ★" if r.get("pareto") else ""
        lines.append(
            f"| {r['name']}{star} | {r['settings'] or '—'} | {changed} | " + " | ".join(cells) + " |"
        )
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


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in keys})


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Harmful rate (x) vs utility (y), one marker per row, the Pareto front joined and highlighted."""
    pts = [r for r in rows if r["harm"] is not None and r["utility"] is not None]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in pts))
    for i, m in enumerate(methods):
        group = [r for r in pts if r["method"] == m]
        ax.scatter([100 * r["harm"] for r in group], [100 * r["utility"] for r in group], s=40, color=f"C{i}",
                   label=m, zorder=3)  # fmt: skip
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r["harm"])
    if front:
        ax.plot([100 * r["harm"] for r in front], [100 * r["utility"] for r in front], "-", color="black",
                linewidth=1, zorder=2, label="Pareto front")  # fmt: skip
        ax.scatter([100 * r["harm"] for r in front], [100 * r["utility"] for r in front], s=140,
                   facecolors="none", edgecolors="black", linewidths=1.2, zorder=4)  # fmt: skip
    for r in pts:
        ax.annotate(r["settings"] or r["label"], (100 * r["harm"], 100 * r["utility"]), fontsize=6,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("harmful rate, % (mean over harm benchmarks; lower is better)")
    ax.set_ylabel("utility, % (mean accuracy over utility benchmarks)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def write_results(cfg: ExperimentConfig, out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """results.csv, results.md, results.json and pareto.png (when rows have a harm and a utility value)."""
    rows = build_rows(cfg, out, cells)
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(cfg, rows), encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps(
            {"name": cfg.name, "evaluation": cfg.evaluation.model_dump(mode="json"), "rows": rows}, indent=2
        )
        + "\n",
        encoding="utf-8",
    )
    if not plot_pareto(rows, out / "pareto.png", f"{cfg.name}: harmfulness vs utility"):
        (out / "pareto.png").unlink(missing_ok=True)
    return rows


def print_cells(cells: list[Cell], console: Console) -> None:
    """The dry-run listing: every cell with its settings, key and cache status."""
    table = Table(title=f"{len(cells)} cells")
    for col in ("#", "defence", "method", "settings", "key", "status"):
        table.add_column(col)
    for i, c in enumerate(cells):
        settings = ", ".join(f"{k}={_plain(v)}" for k, v in c.given.items())
        table.add_row(str(i + 1), c.name, c.method, settings or "(defaults)", c.key[:12], c.status)
    console.print(table)


def print_rows(rows: list[dict[str, Any]], console: Console) -> None:
    """The results table on the console (headline metrics only)."""
    table = Table(title="results")
    table.add_column("defence")
    table.add_column("changed", justify="right")
    table.add_column("utility %", justify="right")
    table.add_column("harmful %", justify="right")
    for r in rows:
        table.add_row(
            r["label"] + (" ★" if r.get("pareto") else ""),
            "" if r["modules_changed"] is None else str(r["modules_changed"]),
            _pct(r["utility"]),
            _pct(r["harm"]),
        )
    console.print(table)
