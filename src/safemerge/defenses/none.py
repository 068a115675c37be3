"""none: the task adapter (or full fine-tune) passed through byte for byte, with the scan's report.

The fine-tuned row of an experiment, produced like every other defence's output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safemerge.common.errors import InputError
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import scan_config, without_selection
from safemerge.engine.checkpoint import SAFE_INDEX
from safemerge.engine.pipeline import run_full_scan, run_scan
from safemerge.engine.writer import MODEL_SIDE_FILES

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class NoDefense(Defense):
    """Copy the task adapter unchanged."""

    name = "none"
    output = "adapter"
    full_finetune = True

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        if cfg.inputs.task_model is not None:
            return self._run_full(cfg, tmp, out, progress)
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

    def _run_full(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        """A full fine-tune: its weight files, index and side files copied byte for byte."""
        report, task, _ = run_full_scan(scan_config(cfg, {"fraction": 0.0}), "defend", progress)
        source = task.checkpoint.directory
        weights = {f.name for f in task.checkpoint.headers}
        if not weights:
            raise InputError(f"method none copies safetensors files; {source} has pickle weights only")
        for name in sorted(weights | {SAFE_INDEX, *MODEL_SIDE_FILES}):
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        for rec in report.modules:
            rec.delta_norm_out = rec.delta_norm_in
        report.options = without_selection(report.options) | {
            "selection_policy": "none (task model passed through)"
        }
        report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "model", 0, report, out)


DEFENSE = NoDefense()
