"""The SafeMERGE engine (the paper's method): criterion, merge operators, LoRA and checkpoint I/O, the
report, and the scan/merge pipeline. Knows nothing of defences, evaluation, experiments or the CLI.

Public API: `scan(ScanConfig)`, `merge(MergeConfig)`, and the tensor-level `merge_modules`.
"""

from safemerge.engine.config import MergeConfig, ScanConfig, SelectionConfig
from safemerge.engine.pipeline import merge, merge_modules, scan
from safemerge.engine.report import ModuleRecord, Report

__all__ = [
    "MergeConfig",
    "ModuleRecord",
    "Report",
    "ScanConfig",
    "SelectionConfig",
    "merge",
    "merge_modules",
    "scan",
]
