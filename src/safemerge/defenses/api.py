"""`defend(DefendConfig)`: run one registered defence and write its output atomically.

Every defence writes into a temporary sibling of `cfg.out` that is renamed into place only when it is
complete; the output holds the defence's files plus `safemerge_report.{json,md}`, `similarity.png` and
`defense.yaml`. Which defences exist, and what each writes, is in registry.py and the defence modules.
"""

from __future__ import annotations

from pathlib import Path

from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.defenses.base import DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.registry import get_defense


def defend(cfg: DefendConfig, progress: bool = False) -> DefenseResult:
    """Run the configured defence; everything lands in `cfg.out` (temporary directory renamed at the end)."""
    out = Path(cfg.out)
    inputs = {**cfg.inputs.paths(), "safety adapter": cfg.safety_adapter, "safety model": cfg.safety_model}
    check_output_dir(out, cfg.run.force, inputs)
    defense = get_defense(cfg.method)
    with atomic_output_dir(out, cfg.run.force, inputs, "defend") as tmp:
        return defense.run(cfg, tmp, out, progress)
