"""safemerge: selective layer-wise merging of LoRA adapters to restore safety alignment (SafeMERGE).

The in-memory API on a `peft.PeftModel` (docs/python-api.md), `add_safemerge_adapter`,
`add_safelora_adapter`, `scan_peft_model`, `save_safemerged` and `evaluate_model`, is imported on first
use: `import safemerge` stays fast (the CLI starts from it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports them on first use
    from safemerge.evaluate.inmemory import evaluate_model
    from safemerge.peft import (
        add_safelora_adapter,
        add_safemerge_adapter,
        save_safemerged,
        scan_peft_model,
    )

__version__ = "0.1.0"

_LAZY = {
    "add_safemerge_adapter": "safemerge.peft",
    "add_safelora_adapter": "safemerge.peft",
    "scan_peft_model": "safemerge.peft",
    "save_safemerged": "safemerge.peft",
    "evaluate_model": "safemerge.evaluate.inmemory",
}
__all__ = [
    "__version__",
    "add_safelora_adapter",
    "add_safemerge_adapter",
    "evaluate_model",
    "save_safemerged",
    "scan_peft_model",
]


def __getattr__(name: str) -> Any:
    """The in-memory API (`_LAZY`), imported on first access (PEP 562): it imports PEFT and
    transformers, which add seconds to every command's start."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'safemerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
