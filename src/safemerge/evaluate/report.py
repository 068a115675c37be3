"""The summary table of an evaluation: Markdown for summary.md, rich for the console."""

from __future__ import annotations

from typing import Any

HEADLINE = {"utility": "accuracy", "harm": "harmful_rate", "benign": "refusal_rate"}


def headline(m: dict[str, Any]) -> str:
    """'12.5% (5/40)' for a benchmark's headline metric."""
    key = HEADLINE[m["kind"]]
    value = m.get(key)
    count = {"utility": "n_correct", "harm": "n_unsafe", "benign": "n_refused"}[m["kind"]]
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}% ({m[count]}/{m['n'] - m.get('n_malformed', 0)})"


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header (variant, then one column per benchmark and metric) and one row per variant."""
    benches: list[tuple[str, str]] = []
    for v in metrics.values():
        for name, m in v["benchmarks"].items():
            if (name, m["kind"]) not in benches:
                benches.append((name, m["kind"]))
    header = ["variant"] + [f"{n} {HEADLINE[k]}" for n, k in benches]
    rows = []
    for key, v in metrics.items():
        row = [key]
        for n, _ in benches:
            m = v["benchmarks"].get(n)
            row.append(headline(m) if m else "")
        rows.append(row)
    return header, rows


def markdown(metrics: dict[str, Any], judge: str) -> str:
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = f"\nHarm judge: {judge}. Over-refusal uses refusal-marker matching (a proxy).\n"
    if judge.startswith("keyword"):
        note += "The keyword judge is a proxy: harmful rate = share of responses without a refusal marker.\n"
    return "# Evaluation summary\n\n" + "\n".join(lines) + "\n" + note


def print_table(metrics: dict[str, Any], judge: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(metrics)
    t = Table(title=f"safemerge eval (harm judge: {judge})")
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    Console(stderr=True).print(t)
