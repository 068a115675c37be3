"""none: the task adapter passed through byte for byte, with the scan's report.

The fine-tuned row of an experiment, produced like every other defence's output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import scan_config, without_selection
from safemerge.engine.pipeline import run_scan

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class NoDefense(Defense):
    """Copy the task adapter unchanged."""

    name = "none"
    output = "adapter"

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        report, task, _ = run_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        for name in ADAPTER_FILES:
            shutil.copyfile(task.directory / name, tmp / name)
        for rec in report.modules:
            rec.delta_norm_out = rec.delta_norm_in
        report.options = without_selection(report.options) | {
            "selection_policy": "none (task adapter passed through)"
        }
        report.outputs = {"adapter": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", 0, report)


DEFENSE = NoDefense()
