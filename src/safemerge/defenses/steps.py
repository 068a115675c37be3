"""Steps that several defences share: the scan that computes ρ, tidying the report, moving outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError
from safemerge.defenses.config import DefendConfig
from safemerge.engine.config import SELECTION_OPTIONS, ScanConfig, SelectionConfig


def scan_config(cfg: DefendConfig, selection: dict[str, Any] | None = None) -> ScanConfig:
    """The engine scan of the defence's inputs, under `selection` (default: the resolved policy)."""
    policy = selection if selection is not None else cfg.resolved_selection
    run = cfg.run.model_copy(update={"force": False})
    # fraction 0: ρ only, no module selected (a policy users cannot give: it selects nothing)
    chosen = SelectionConfig.scan_only() if policy == {"fraction": 0.0} else SelectionConfig(**policy)
    return ScanConfig(selection=chosen, inputs=cfg.inputs, run=run)


def without_selection(options: dict[str, Any]) -> dict[str, Any]:
    """A report's options minus the scan's selection policy (a defence states its own)."""
    return {k: v for k, v in options.items() if k not in SELECTION_OPTIONS}


def move_up(inner: Path, outer: Path) -> None:
    """Move every entry of `inner` into `outer` and remove `inner`."""
    for entry in inner.iterdir():
        entry.rename(outer / entry.name)
    inner.rmdir()


def unaligned_of(cfg: DefendConfig) -> str:
    """The unaligned model of a defence that needs V itself, not only ρ (Safe LoRA's C, RESTA's β V)."""
    if cfg.inputs.unaligned is None:
        why = "it uses V = W_al - W_un itself, not a sketch (`subspace`)"
        raise InputError(f"method {cfg.method} needs `unaligned`: {why}")
    return cfg.inputs.unaligned
