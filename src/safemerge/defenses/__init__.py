"""Post-fine-tuning defences behind `safemerge defend`: SafeMERGE, merge-all, Safe LoRA, RESTA, none.

The configuration is imported eagerly (it is light); the implementation, which needs torch, is
imported on first use so that `safemerge --help` and config validation stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from safemerge.defenses.config import METHODS, DefendConfig

if TYPE_CHECKING:
    from safemerge.defenses.run import DefenseResult, defend, linear_weight_keys, safelora_selection
    from safemerge.defenses.tensors import dare, dense_projection, resta_weight, safelora_project

_LAZY = {
    "DefenseResult": "safemerge.defenses.run",
    "defend": "safemerge.defenses.run",
    "linear_weight_keys": "safemerge.defenses.run",
    "safelora_selection": "safemerge.defenses.run",
    "dare": "safemerge.defenses.tensors",
    "dense_projection": "safemerge.defenses.tensors",
    "resta_weight": "safemerge.defenses.tensors",
    "safelora_project": "safemerge.defenses.tensors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "DefendConfig",
    "DefenseResult",
    "dare",
    "defend",
    "dense_projection",
    "linear_weight_keys",
    "resta_weight",
    "safelora_project",
    "safelora_selection",
]
