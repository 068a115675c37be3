"""Post-fine-tuning defences behind `safemerge defend`: SafeMERGE, merge-all, Safe LoRA, RESTA, none —
and any defence another installed package registers (docs/extending.md).

`defend(DefendConfig)` runs one; `defense_names()` lists the registered ones and `get_defense(name)`
returns one (`Defense`, base.py: what it writes, which inputs and options it uses, how it runs).
"""

from safemerge.defenses.api import defend
from safemerge.defenses.base import Defense, DefenseResult
from safemerge.defenses.config import DefendConfig
from safemerge.defenses.registry import defense_names, get_defense
from safemerge.defenses.resta import linear_weight_keys
from safemerge.defenses.safelora import safelora_selection
from safemerge.defenses.tensors import dense_projection, resta_weight, safelora_project

__all__ = [
    "DefendConfig",
    "Defense",
    "DefenseResult",
    "defend",
    "defense_names",
    "dense_projection",
    "get_defense",
    "linear_weight_keys",
    "resta_weight",
    "safelora_project",
    "safelora_selection",
]
