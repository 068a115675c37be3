"""Reports of a scan or merge: the `Report` and `ModuleRecord` records, and their files
(`safemerge_report.json`, `safemerge_report.md`, `similarity.png`), the merged adapter's model card and
the console summary."""

from __future__ import annotations

import html
import json
import os
import platform
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.segment import Segment
from rich.table import Table

from safemerge import __version__
from safemerge.engine.hub import Kind, card_base, card_metadata, display_name, render_card

if TYPE_CHECKING:
    import pandas as pd

REPORT_JSON = "safemerge_report.json"
REPORT_MD = "safemerge_report.md"
PLOT_PNG = "similarity.png"
WIDEST_TABLE = 1000  # characters: the widest console table printed to a log (module names are long)
NO_COUNTERPART = "no-safety-counterpart"  # the flag of a selected module the safety update lacks
THIS_DIRECTORY = "PATH_TO_THIS_DIRECTORY"  # the cards' name for their own folder (`push` puts the repo id)


@dataclass
class ModuleRecord:
    """One row of the report: a module, its ρ, the decision and what the merge did.

    `rank_task` is None for a full fine-tune; the optional fields at the end are left out of the JSON
    when None (`OPTIONAL_FIELDS`), so a LoRA report is unchanged by their existence."""

    name: str
    layer: int | None
    module_type: str
    shape: tuple[int, int]
    rank_task: int | None
    rho: float
    rho_rounded: float
    selected: bool
    delta_norm_in: float
    flags: list[str] = field(default_factory=list)
    rank_safety: int | None = None
    merged: bool = False
    w_task: float = 1.0
    w_safety: float = 0.0
    delta_norm_out: float | None = None
    svd_rel_error: float | None = None
    route: str | None = None  # full fine-tunes: the association of V Vᵀ ΔW (criterion.update_route)
    sketch_energy: float | None = None  # ρ from a rank-K sketch: the share of ‖V‖_F² it holds


# Fields of `ModuleRecord` written to the JSON only when set.
OPTIONAL_FIELDS = ("route", "sketch_energy")


def record_dict(record: ModuleRecord) -> dict[str, Any]:
    """A module's JSON form: every field, minus the optional ones that are None."""
    return {k: v for k, v in asdict(record).items() if k not in OPTIONAL_FIELDS or v is not None}


@dataclass
class Report:
    """What `scan` or `merge` computed: inputs, resolved options, versions, and one record per module."""

    command: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    modules: list[ModuleRecord]
    versions: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, Any]:
        sel = [m for m in self.modules if m.selected]
        rhos = [m.rho for m in self.modules]
        return {
            "modules": len(self.modules),
            "selected": len(sel),
            "merged": sum(m.merged for m in self.modules),
            "flagged": sum(bool(m.flags) for m in self.modules),
            "rho_min": min(rhos) if rhos else None,
            "rho_max": max(rhos) if rhos else None,
            "rho_mean": sum(rhos) / len(rhos) if rhos else None,
        }

    def to_pandas(self) -> pd.DataFrame:
        """One row per module, the columns of the JSON report's `modules` (name, layer, module_type, rho,
        selected, merged, ...; a column an optional field has only when some module sets it)."""
        import pandas as pd  # lazy: pandas adds ~0.5 s to an import; only notebooks need it

        columns = [f.name for f in fields(ModuleRecord) if f.name not in OPTIONAL_FIELDS]
        return pd.DataFrame([record_dict(m) for m in self.modules], columns=None if self.modules else columns)

    def _repr_html_(self) -> str:
        """The notebook view: the headline and ρ range, the warnings, and one table row per module."""
        return html_table(self)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the result (read from metadata: no slow imports)."""

    libs = {name: version(name) for name in ("transformers", "peft", "safetensors")}
    return {"safemerge": __version__, "python": platform.python_version(), "torch": torch.__version__, **libs}


def report_dict(report: Report) -> dict[str, Any]:
    """The JSON form of a report (stable key order; floats unrounded)."""
    return {
        "command": report.command,
        "summary": report.summary,
        "inputs": report.inputs,
        "options": report.options,
        "versions": report.versions,
        "warnings": report.warnings,
        "outputs": report.outputs,
        "modules": [record_dict(m) for m in report.modules],
    }


def write_report(report: Report, directory: Path, plot: bool = True) -> None:
    """Write the JSON and Markdown reports (and the ρ plot) into `directory`."""
    (directory / REPORT_JSON).write_text(json.dumps(report_dict(report), indent=2) + "\n")
    (directory / REPORT_MD).write_text(markdown(report))
    if plot and report.modules:
        plot_similarity(report, directory / PLOT_PNG)


def _threshold(report: Report) -> float | None:
    t = report.options.get("threshold")
    return float(t) if t is not None else None


def _has_merge(report: Report) -> bool:
    """Whether the report carries merge results (merge and the adapter-writing defences)."""
    return any(m.delta_norm_out is not None for m in report.modules)


def headline(report: Report) -> str:
    """ "N of T modules selected, M merged" — both numbers whenever the report carries merge results, and
    how many selected modules were kept as fine-tuned (no safety counterpart: `allow_partial`)."""
    s = report.summary
    text = f"{s['selected']} of {s['modules']} modules selected"
    if not _has_merge(report):
        return text
    text += f", {s['merged']} {'merged' if report.command == 'merge' else 'changed'}"
    kept = kept_as_fine_tuned(report)
    if kept:
        text += f" ({kept} kept as fine-tuned: no safety counterpart)"
    return text


def kept_as_fine_tuned(report: Report) -> int:
    """Selected modules that a partial merge (`allow_partial`) kept as fine-tuned."""
    return sum(m.selected and NO_COUNTERPART in m.flags for m in report.modules)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


# The inputs a report lists, in order: (key in `Report.inputs`, label).
INPUT_LABELS = (
    ("aligned", "aligned"),
    ("unaligned", "unaligned"),
    ("subspace", "subspace sketch"),
    ("task_adapter", "task adapter"),
    ("task_model", "task model"),
)
SAFETY_LABELS = (("safety_adapter", "safety adapter"), ("safety_model", "safety model"))


def input_lines(report: Report, with_safety: bool) -> list[str]:
    """`- label: `path`` for every input the report names (the safety input only `with_safety`)."""
    labels = INPUT_LABELS + (SAFETY_LABELS if with_safety else ())
    return [f"- {label}: `{report.inputs[k]['path']}`" for k, label in labels if k in report.inputs]


def markdown(report: Report) -> str:
    """A human-readable report: inputs, options, summary, and the per-module table."""
    s = report.summary
    lines = [f"# SafeMERGE {report.command} report", "", *input_lines(report, with_safety=True)]
    lines += [
        f"- selection: {report.options.get('selection_policy')}",
    ]
    if report.command == "merge":
        o = report.options
        output = f"output rank {o.get('output_rank')}" if "output_rank" in o else "output: a full model"
        lines.append(
            f"- merge: mode `{o['mode']}`, method `{o['method']}`, weights {tuple(o['weights'])}, {output}"
        )
    lines += [
        "",
        f"**{headline(report)}**"
        + f"; ρ from {_fmt(s['rho_min'])} to {_fmt(s['rho_max'])} (mean {_fmt(s['rho_mean'])}).",
        "",
    ]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    header = "| module | ρ | selected |"
    rule = "|---|---:|:---:|"
    if _has_merge(report):
        header += " merged | w_task | w_safety | ‖ΔW‖ in | ‖ΔW‖ out | SVD error |"
        rule += ":---:|---:|---:|---:|---:|---:|"
    header += " flags |"
    rule += "---|"
    lines += ["## Modules", "", header, rule]
    for m in report.modules:
        row = f"| `{m.name}` | {m.rho:.5f} | {'yes' if m.selected else ''} |"
        if _has_merge(report):
            row += (
                f" {'yes' if m.merged else ''} | {m.w_task:g} | {m.w_safety:g} | {_fmt(m.delta_norm_in)} |"
                f" {_fmt(m.delta_norm_out)} | {_fmt(m.svd_rel_error)} |"
            )
        row += f" {', '.join(m.flags)} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def html_table(report: Report) -> str:
    """The report as HTML for a notebook: a summary line, the warnings, and the per-module table (the
    columns of the Markdown report); every name and message is escaped."""
    s = report.summary
    merge = _has_merge(report)
    head = ["module", "layer", "type", "ρ", "selected"]
    head += ["merged", "‖ΔW‖ in", "‖ΔW‖ out"] if merge else ["‖ΔW‖"]
    head.append("flags")
    rows = []
    for m in report.modules:
        cells = [f"<code>{html.escape(m.name)}</code>", "" if m.layer is None else str(m.layer)]
        cells += [html.escape(m.module_type), f"{m.rho:.5f}", "✔" if m.selected else ""]
        if merge:
            cells += ["✔" if m.merged else "", _fmt(m.delta_norm_in), _fmt(m.delta_norm_out)]
        else:
            cells.append(_fmt(m.delta_norm_in))
        cells.append(html.escape(", ".join(m.flags)))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    summary = (
        f"<p><b>SafeMERGE {html.escape(report.command)}: {html.escape(headline(report))}</b>; "
        f"selection: {html.escape(str(report.options.get('selection_policy')))}; ρ from "
        f"{_fmt(s['rho_min'])} to {_fmt(s['rho_max'])} (mean {_fmt(s['rho_mean'])}).</p>"
    )
    warns = "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings)
    return (
        summary
        + (f"<p>{len(report.warnings)} warning(s):</p><ul>{warns}</ul>" if warns else "")
        + "<table><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def plot_similarity(report: Report, path: Path) -> None:
    """ρ per layer for each module type, τ drawn, selected modules marked."""
    import matplotlib  # lazy: matplotlib adds ~0.6 s; only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    groups: dict[str, list[ModuleRecord]] = {}
    for m in report.modules:
        groups.setdefault(m.module_type, []).append(m)
    for i, (mtype, mods) in enumerate(sorted(groups.items())):
        xs = [m.layer if m.layer is not None else k for k, m in enumerate(mods)]
        color = f"C{i}"
        ax.plot(xs, [m.rho for m in mods], "-", color=color, alpha=0.6, label=mtype)
        sel = [(x, m.rho) for x, m in zip(xs, mods, strict=True) if m.selected]
        rest = [(x, m.rho) for x, m in zip(xs, mods, strict=True) if not m.selected]
        if rest:
            ax.scatter([x for x, _ in rest], [y for _, y in rest], color=color, s=18, marker="o")
        if sel:
            sx, sy = [x for x, _ in sel], [y for _, y in sel]
            ax.scatter(sx, sy, color=color, s=60, marker="X", edgecolors="black", linewidths=0.5)
    tau = _threshold(report)
    if tau is not None:
        ax.axhline(tau, color="red", linestyle="--", linewidth=1, label=f"τ = {tau:g}")
    ax.scatter([], [], color="gray", s=60, marker="X", edgecolors="black", label="selected")
    ax.set_xlabel("layer")
    ax.set_ylabel("ρ (similarity to the safety subspace)")
    ax.set_title(f"SafeMERGE: {headline(report)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def model_card(report: Report, base: str | None, options_in: str = "`safemerge.yaml`") -> str:
    """README.md of a merged adapter: the Hub's front matter (engine/hub.py), then what was done. `base`
    is the base model the adapter loads on as given: the aligned model, or (merging with a sketch and no
    aligned model) the task adapter's `base_model_name_or_path`. The card names the base by its hub id
    (a local aligned model's `_name_or_path` when that is one), never by a local path; unknown, it leaves
    the Hub's `base_model` out rather than write a path. `options_in`: where the card says the resolved
    options are (an adapter saved from memory has no rerunnable `safemerge.yaml`)."""
    o = report.options
    hub_base, license_fields = card_base(report.inputs, base)
    name = hub_base or "BASE_MODEL"
    body = f"""
# SafeMERGE adapter

A LoRA adapter for `{name}`{_revision_note(report)} produced by [safemerge](https://arxiv.org/abs/2503.17239)
from the task adapter `{display_name(report.inputs["task_adapter"])}`:
{_selection_sentence(report)} merged with the safety adapter
`{display_name(report.inputs["safety_adapter"])}` (weights {tuple(o["weights"])}, mode `{o["mode"]}`, method
`{o["method"]}`).{_kept_sentence(report, "the task adapter's")}
All other modules are the task adapter's, unchanged.

{load_snippet("adapter", name)}
The per-module similarities and decisions are in `safemerge_report.md`; the resolved options in
{options_in}.
"""
    return render_card(card_metadata("adapter", hub_base, license_fields), body)


def _revision_note(report: Report) -> str:
    """` (revision <commit>)` when the aligned model came from the hub (the commit it resolved to)."""
    revision = (report.inputs.get("aligned") or {}).get("revision")
    return f" (revision `{revision}`)" if revision else ""


def load_snippet(kind: Kind, base_name: str) -> str:
    """The card's "Load it with" block for an adapter (on `base_name`) or a full model."""
    if kind == "adapter":
        code = f"""from transformers import AutoModelForCausalLM
from peft import PeftModel

model = AutoModelForCausalLM.from_pretrained("{base_name}")
model = PeftModel.from_pretrained(model, "{THIS_DIRECTORY}")"""
    else:
        code = f"""from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{THIS_DIRECTORY}")"""
    return f"Load it with:\n\n```python\n{code}\n```\n"


def merged_model_card(
    report: Report, base: str | None, adapter: str = "the adapter of the parent directory"
) -> str:
    """README.md of `full_model/` (`merge_into_base`): the base with `adapter` merged into its weights."""
    hub_base, license_fields = card_base(report.inputs, base)
    name = hub_base or "BASE_MODEL"
    body = f"""
# SafeMERGE model (adapter merged into the base)

`{name}`{_revision_note(report)} with {adapter} added to its weights (W + s·B·A on every
adapted module, in the base model's dtype), produced by [safemerge](https://arxiv.org/abs/2503.17239)
from the task adapter `{display_name(report.inputs["task_adapter"])}`. The per-module decisions are in the
parent directory's `safemerge_report.md`.

{load_snippet("model", name)}"""
    return render_card(card_metadata("model", hub_base, license_fields), body)


def _selection_sentence(report: Report) -> str:
    """ "N of T modules were selected (selection: …) and M of them were" ("was" for one): the two numbers
    of a merge, never one for the other (a partial merge merges fewer modules than it selects)."""
    s = report.summary
    return (
        f"{s['selected']} of its {s['modules']} modules were selected (selection: "
        f"{report.options.get('selection_policy')}) and {s['merged']} of them "
        f"{'was' if s['merged'] == 1 else 'were'}"
    )


def _kept_sentence(report: Report, owner: str) -> str:
    """The card's account of a partial merge (empty when every selected module was merged)."""
    kept = kept_as_fine_tuned(report)
    if not kept:
        return ""
    return (
        f"\nThe other {kept} selected modules have no counterpart in the safety update and are {owner} "
        "as fine-tuned (a partial merge, allowed with `allow_partial`)."
    )


def full_model_card(report: Report) -> str:
    """README.md of a merged full model (a full fine-tune merged with a safety update)."""
    hub_base, license_fields = card_base(report.inputs)
    base = hub_base or "BASE_MODEL"
    o = report.options
    safety = report.inputs.get("safety_adapter") or report.inputs.get("safety_model")
    task = display_name(report.inputs["task_model"])
    body = f"""
# SafeMERGE model

A full fine-tune of `{base}`{_revision_note(report)} processed by [safemerge](https://arxiv.org/abs/2503.17239)
from the task model `{task}`:
{_selection_sentence(report)} set to W_aligned + w_task ΔW_task + w_safety ΔW_safety, with the
safety update of `{display_name(safety) if safety else None}` (weights {tuple(o["weights"])}, method
`{o["method"]}`).{_kept_sentence(report, "the task model's")}
Every other tensor is the task model's, unchanged.

{load_snippet("model", base)}
The per-module similarities and decisions are in `safemerge_report.md`; the resolved options in
`safemerge.yaml`.
"""
    return render_card(card_metadata("model", hub_base, license_fields), body)


def warnings_line(report: Report) -> str:
    """The summary's pointer to the warnings, which were printed when they arose."""
    where = f"; all of them in {report.outputs['report']}" if "report" in report.outputs else ""
    return f"{len(report.warnings)} warning(s), printed above{where}"


def print_unclipped(console: Console, table: Table) -> None:
    """Print `table` with no cell cut. Where the output is not a terminal (a log file, a pipe), a table
    wider than the console is printed at its natural width, so no cell is folded or cut (80 columns is
    only rich's guess for a file). In a terminal, cells fold (`overflow="fold"` on every column); where
    rich cannot fold the table into the terminal's width, it is printed at the narrowest width that holds
    it (the terminal wraps the lines) rather than cropped at the edge."""
    width = console.width
    wide = console.options.update_width(WIDEST_TABLE)
    natural = min(console.measure(table, options=wide).maximum, WIDEST_TABLE)
    need = width if console.is_terminal else max(width, natural)
    while need < natural and (rendered := _rendered_width(console, table, need)) > need:
        need = min(rendered, natural)
    console.width = need
    try:
        console.print(table)
    finally:
        console.width = width


def _rendered_width(console: Console, table: Table, width: int) -> int:
    """The width of the widest line of `table` rendered for `width` columns, before any cropping."""
    lines = Segment.split_lines(console.render(table, console.options.update_width(width)))
    return max((Segment.get_line_length(line) for line in lines), default=0)


def print_summary(report: Report, console: Console, max_rows: int = 40) -> None:
    """A readable summary table on the console (the lowest-ρ modules first when there are many)."""
    table = Table(title=f"safemerge {report.command}: {headline(report)}")
    table.add_column("module", overflow="fold", min_width=20)
    table.add_column("ρ", justify="right", overflow="fold")
    table.add_column("selected", justify="center", overflow="fold")
    if _has_merge(report):
        table.add_column("merged", justify="center", overflow="fold")
        table.add_column("‖ΔW‖ in → out", justify="right", overflow="fold")
    table.add_column("flags", overflow="fold")
    rows = report.modules
    prefix = os.path.commonprefix([m.name for m in rows]) if len(rows) > 1 else ""  # noqa: RUF071
    prefix = prefix[: prefix.rfind(".") + 1]  # cut at a dot: "model.layers."
    if prefix:
        table.columns[0].header = f"module ({prefix}…)"
    if len(rows) > max_rows:
        rows = sorted(rows, key=lambda m: m.rho)[:max_rows]
        table.caption = f"the {max_rows} lowest-ρ of {len(report.modules)} modules; all in the report"
    for m in rows:
        cells = [m.name[len(prefix) :], f"{m.rho:.5f}", "✔" if m.selected else ""]
        if _has_merge(report):
            cells += ["✔" if m.merged else "", f"{_fmt(m.delta_norm_in)} → {_fmt(m.delta_norm_out)}"]
        cells.append(", ".join(m.flags))
        table.add_row(*cells)
    print_unclipped(console, table)
    if report.warnings:  # each was a Python warning when it arose, printed then (by the CLI: once, styled)
        console.print(warnings_line(report), highlight=False, soft_wrap=True)
    for what, where in report.outputs.items():
        console.print(f"{what}: {where}", highlight=False, soft_wrap=True)
