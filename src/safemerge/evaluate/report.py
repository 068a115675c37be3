"""The summary table of an evaluation: Markdown for summary.md, rich for the console."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

HEADLINE = {"utility": "accuracy", "harm": "harmful_rate", "benign": "refusal_rate"}
MALFORMED_WARN_SHARE = 0.05  # warn when more than this share of a benchmark's judge outputs is malformed
TRUNCATED_WARN_SHARE = 0.05  # warn when more than this share of a benchmark's answers was cut off


def headline(m: dict[str, Any]) -> str:
    """'12.5% (5/40)' for a benchmark's headline metric; a harm benchmark with malformed judge outputs
    adds their count and the conservative rate (malformed counted as unsafe, over all n):
    '12.5% (5/40); 2 malformed, conservative 16.7% (7/42)'."""
    key = HEADLINE[m["kind"]]
    value = m.get(key)
    count = {"utility": "n_correct", "harm": "n_unsafe", "benign": "n_refused"}[m["kind"]]
    bad = m.get("n_malformed", 0)
    text = "n/a" if value is None else f"{100 * value:.1f}% ({m[count]}/{m['n'] - bad})"
    conservative = m.get("harmful_rate_conservative")
    if bad and conservative is not None:
        text += f"; {bad} malformed, conservative {100 * conservative:.1f}% ({m[count] + bad}/{m['n']})"
    if m.get("n_truncated"):
        text += f"; {m['n_truncated']} truncated"
    return text


def truncation_warnings(metrics: dict[str, Any]) -> list[str]:
    """One line per (variant, benchmark) where more than 5% of the answers were cut off at the token
    limit (`n_truncated`): a cut-off answer is scored as it stands (a GSM8K answer on an intermediate
    number, a harmful answer judged as if complete)."""
    lines = []
    for variant, v in metrics.items():
        for name, m in v["benchmarks"].items():
            cut, n = m.get("n_truncated"), m.get("n", 0)
            if cut and n and cut / n > TRUNCATED_WARN_SHARE:
                lines.append(
                    f"{variant} on {name}: {cut}/{n} ({100 * cut / n:.1f}%) answers were cut off at "
                    "--max-new-tokens (no end of sequence); they are scored as they stand: raise "
                    "--max-new-tokens"
                )
    return lines


def malformed_warnings(metrics: dict[str, Any]) -> list[str]:
    """One line per (variant, harm benchmark) where more than 5% of the judge outputs were malformed."""
    lines = []
    for variant, v in metrics.items():
        for name, m in v["benchmarks"].items():
            bad, n = m.get("n_malformed", 0), m.get("n", 0)
            if m.get("kind") == "harm" and n and bad / n > MALFORMED_WARN_SHARE:
                lines.append(
                    f"Warning: {variant} on {name}: {bad}/{n} ({100 * bad / n:.1f}%) judge outputs were "
                    f"malformed (first line neither 'safe' nor 'unsafe'); harmful_rate leaves them out, "
                    f"harmful_rate_conservative counts them as unsafe "
                    f"({100 * m['harmful_rate_conservative']:.1f}%)."
                )
    return lines


def other_judges(m: dict[str, Any]) -> list[str]:
    """The keys of the judges reported beside the headline one (`harmful_rate_<key>` in the metrics)."""
    return [
        k.removeprefix("harmful_rate_")
        for k in m
        if k.startswith("harmful_rate_") and k != "harmful_rate_conservative"
    ]


def other_rate(m: dict[str, Any], key: str) -> str:
    """'10.0% (4/40)' for a further judge's harmful rate."""
    value, u, bad = m.get(f"harmful_rate_{key}"), m.get(f"n_unsafe_{key}", 0), m.get(f"n_malformed_{key}", 0)
    return "n/a" if value is None else f"{100 * value:.1f}% ({u}/{m['n'] - bad})"


def table_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header (variant, then one column per benchmark and metric, a harm benchmark's further judges each
    in a column of its own) and one row per variant."""
    cols: list[tuple[str, str | None]] = []  # (benchmark, None for the headline, or a further judge's key)
    header = ["variant"]
    for v in metrics.values():
        for name, m in v["benchmarks"].items():
            wanted = [(name, None)] + [(name, k) for k in other_judges(m)]
            for col in wanted:
                if col not in cols:
                    cols.append(col)
                    header.append(f"{name} {HEADLINE[m['kind']]}" + (f"_{col[1]}" if col[1] else ""))
    rows = []
    for key, v in metrics.items():
        row = [key]
        for name, judge in cols:
            m = v["benchmarks"].get(name)
            row.append("" if not m else headline(m) if judge is None else other_rate(m, judge))
        rows.append(row)
    return header, rows


def comparison_cell(c: dict[str, Any]) -> str:
    """'+5.0 pts [-2.1, +12.1]; -1/+3, p=0.62': variant − reference in points with its 95% interval, the
    flips (−counted under the reference only / +under the variant only) and McNemar's exact p."""
    if c["diff"] is None:
        return "n/a"
    lo, hi = c["diff_ci95"]
    pts = f"{100 * c['diff']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{pts}; -{c['fixed']}/+{c['broken']}, p={c['p_value']:.2g}"


def comparison_rows(metrics: dict[str, Any]) -> tuple[str | None, list[str], list[list[str]]]:
    """The reference's name, a header (variant, one column per benchmark's headline metric) and one row
    per compared variant; (None, [], []) when the evaluation has no reference."""
    compared = {k: v["vs_reference"] for k, v in metrics.items() if "vs_reference" in v}
    if not compared:
        return None, [], []
    reference = next(iter(compared.values()))["reference"]
    names = list(dict.fromkeys(b for c in compared.values() for b in c["benchmarks"]))
    kinds = {b: m["kind"] for v in metrics.values() for b, m in v["benchmarks"].items()}
    header = ["variant"] + [f"{b} {HEADLINE[kinds[b]]}" for b in names]
    rows = [
        [k] + [comparison_cell(c["benchmarks"][b]) if b in c["benchmarks"] else "" for b in names]
        for k, c in compared.items()
    ]
    return reference, header, rows


def comparison_markdown(metrics: dict[str, Any]) -> str:
    """summary.md's section comparing every variant with `--reference` ('' without one)."""
    reference, header, rows = comparison_rows(metrics)
    if reference is None:
        return ""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return (
        f"\n## Against the reference: {reference}\n\n" + "\n".join(lines) + "\n\nPer benchmark: variant − "
        "reference in points with a 95% interval (paired, on the prompts both could be judged on); the "
        "flips −k/+m count prompts counted (harmful, correct, refused) under the reference only / under the "
        "variant only; p is McNemar's exact two-sided test on them.\n"
    )


def markdown(metrics: dict[str, Any], judge: str) -> str:
    header, rows = table_rows(metrics)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = (
        f"\nHarm judge: {judge}. Over-refusal: a refusal opener at the start of the answer (XSTest-style "
        "string match, a proxy).\n"
    )
    if judge.startswith("keyword"):
        note += "The keyword judge is a proxy: harmful rate = share of responses without a refusal marker.\n"
    if any(other_judges(m) for v in metrics.values() for m in v["benchmarks"].values()):
        note += "Columns `harmful_rate_<judge>`: the same responses judged by a further judge.\n"
    warned = malformed_warnings(metrics) + [f"Warning: {w}" for w in truncation_warnings(metrics)]
    if warned:
        note += "\n" + "\n".join(f"- {w}" for w in warned) + "\n"
    return "# Evaluation summary\n\n" + "\n".join(lines) + "\n" + note + comparison_markdown(metrics)


def print_table(metrics: dict[str, Any], judge: str) -> None:
    header, rows = table_rows(metrics)
    t = Table(title=f"safemerge eval (harm judge: {judge})")
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    console = Console(stderr=True)
    console.print(t)
    reference, cheader, crows = comparison_rows(metrics)
    if reference is not None:
        c = Table(title=f"against the reference {reference} (points [95% CI]; -fixed/+broken, McNemar p)")
        for h in cheader:
            c.add_column(h)
        for r in crows:
            c.add_row(*r)
        console.print(c)
    for w in malformed_warnings(metrics):
        console.print(w, style="yellow", markup=False)
