"""Reports of `safemerge defend`: the engine's report files plus the defence's settings.

`safemerge_report.json` is the engine's JSON with a `defense` block (and, for RESTA, a `tensors` list);
`safemerge_report.md` shows per module ρ, the decision and ‖ΔW‖ before and after the defence;
`similarity.png` is the engine's ρ plot; `defense.yaml` the resolved config (rerun with
`safemerge defend -c OUT/defense.yaml --out NEW_DIR`, from any working directory).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from safemerge.common.config_io import plain_dump
from safemerge.defenses.registry import get_defense
from safemerge.engine.hub import Kind, card_base, card_metadata, display_name, render_card
from safemerge.engine.report import (
    REPORT_JSON,
    REPORT_MD,
    Report,
    _fmt,
    input_lines,
    load_snippet,
    markdown,
    merged_model_card,
    plot_similarity,
    report_dict,
)
from safemerge.engine.rerun import rerun_comment, rerunnable

if TYPE_CHECKING:
    from safemerge.defenses.config import DefendConfig

DEFENSE_YAML = "defense.yaml"


@dataclass
class TensorEdit:
    """One full-model tensor changed by RESTA: ‖ΔW_f‖ (after DARE), ‖β V‖ and ‖W_out − W_al‖."""

    key: str
    lora_module: str | None
    task_norm: float
    safety_norm: float
    change_norm: float


def write_defense_report(
    report: Report, directory: Path, cfg: DefendConfig, edits: list[TensorEdit] | None = None
) -> None:
    """Write the JSON and Markdown reports, the ρ plot and the resolved config into `directory`."""
    data = report_dict(report)
    data["defense"] = cfg.settings()
    if edits is not None:
        data["tensors"] = [asdict(e) for e in edits]
    (directory / REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n")
    (directory / REPORT_MD).write_text(defense_markdown(report, cfg, edits))
    if cfg.run.plot and report.modules:
        plot_similarity(report, directory / "similarity.png")
    write_defense_cards(report, directory, cfg)
    (directory / DEFENSE_YAML).write_text(defense_yaml(cfg))


def defense_yaml(cfg: DefendConfig) -> str:
    """The resolved config as `defense.yaml`: local inputs (and a calibration file) absolute, hub ids as
    given (engine/rerun.py), so `safemerge defend -c OUT/defense.yaml --out NEW_DIR` reruns it anywhere."""
    resolved = rerunnable(plain_dump(cfg, exclude=("force",)))
    resolved["weights"] = list(cfg.merge.weights)
    if "plugin_options" in resolved:
        resolved["plugin_options"] = rerunnable(resolved["plugin_options"], ("calibration",), out=None)
    header = rerun_comment("defence configuration", "defend", DEFENSE_YAML)
    return header + yaml.safe_dump(resolved, sort_keys=False)


def write_defense_cards(report: Report, directory: Path, cfg: DefendConfig) -> None:
    """README.md of a defence's output (and of its `full_model/`), unless the engine wrote them (the
    merges of `safemerge` / `merge-all` carry the merge's cards)."""
    if not (directory / "README.md").exists():
        (directory / "README.md").write_text(defense_card(report, cfg))
    full = directory / "full_model"
    if "adapter" in report.outputs and full.is_dir() and not (full / "README.md").exists():
        what = f"the {cfg.method} adapter of the parent directory"
        (full / "README.md").write_text(merged_model_card(report, cfg.inputs.aligned, what))


def defense_card(report: Report, cfg: DefendConfig, options_in: str = f"`{DEFENSE_YAML}`") -> str:
    """The model card of a defence's output: the Hub's front matter (engine/hub.py) and what was done.
    `options_in`: where the card says the resolved options are (an adapter saved from memory has no
    rerunnable `defense.yaml`)."""
    kind: Kind = "adapter" if "adapter" in report.outputs else "model"
    task_key = "task_adapter" if "task_adapter" in report.inputs else "task_model"
    base, license_fields = card_base(report.inputs)
    name = base or "BASE_MODEL"
    s = report.summary
    what = "A LoRA adapter for" if kind == "adapter" else "A model derived from"
    settings = ", ".join(f"{k}={v}" for k, v in cfg.settings().items() if k != "method")
    body = f"""
# safemerge defence `{cfg.method}`

{what} `{name}`, the output of the `{cfg.method}` defence of [safemerge](https://arxiv.org/abs/2503.17239)
({settings or "no settings"}) applied to the task {task_key.removeprefix("task_")}
`{display_name(report.inputs[task_key])}`: {s["selected"]} of {s["modules"]} modules selected,
{s["merged"]} {get_defense(cfg.method).changed_verb}.

{load_snippet(kind, name)}
The per-module similarities and decisions are in `safemerge_report.md`; the resolved options in
{options_in}.
"""
    return render_card(card_metadata(kind, base, license_fields), body)


def _settings_line(cfg: DefendConfig) -> str:
    items = [f"{k}={v}" for k, v in cfg.settings().items() if k != "method"]
    return f"**Defence `{cfg.method}`**" + (f": {', '.join(items)}" if items else "")


def defense_markdown(report: Report, cfg: DefendConfig, edits: list[TensorEdit] | None = None) -> str:
    """The engine's Markdown for merges; for the other defences a table with ‖ΔW‖ in → out."""
    if report.command == "merge":
        return f"{_settings_line(cfg)}\n\n" + markdown(report)
    s = report.summary
    defense = get_defense(cfg.method)
    lines = [
        f"# SafeMERGE defend report: `{cfg.method}`",
        "",
        _settings_line(cfg),
        "",
        *input_lines(report, with_safety=False),
        f"- selection: {report.options.get('selection_policy')}",
        "",
        f"**{s['selected']} of {s['modules']} {'LoRA ' if 'task_adapter' in report.inputs else ''}modules "
        f"selected, {s['merged']} {defense.changed_verb}**; "
        f"ρ from {_fmt(s['rho_min'])} to {_fmt(s['rho_max'])} (mean {_fmt(s['rho_mean'])}).",
        "",
        *defense.report_notes(cfg),
    ]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    lines += [
        "## Modules",
        "",
        "| module | ρ | selected | changed | ‖ΔW‖ in | ‖ΔW‖ out | out/in | flags |",
        "|---|---:|:---:|:---:|---:|---:|---:|---|",
    ]
    for m in report.modules:
        ratio = (
            m.delta_norm_out / m.delta_norm_in if m.delta_norm_out is not None and m.delta_norm_in else None
        )
        lines.append(
            f"| `{m.name}` | {m.rho:.5f} | {'yes' if m.selected else ''} | {'yes' if m.merged else ''} |"
            f" {_fmt(m.delta_norm_in)} | {_fmt(m.delta_norm_out)} | {_fmt(ratio)} | {', '.join(m.flags)} |"
        )
    if edits:
        lines += [
            "",
            f"## Full-model tensors edited ({len(edits)})",
            "",
            "‖ΔW_f‖: the task update (after DARE); ‖βV‖: the safety vector; change: ‖W_out − W_al‖.",
            "",
            "| tensor | ‖ΔW_f‖ | ‖βV‖ | change |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{e.key}` | {_fmt(e.task_norm)} | {_fmt(e.safety_norm)} | {_fmt(e.change_norm)} |"
            for e in edits
        ]
    return "\n".join(lines) + "\n"
