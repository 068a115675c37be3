"""`safemerge train`: LoRA fine-tuning of task and safety adapters (TRL SFTTrainer + PEFT)."""

from safemerge.common.guard import HarmBenchLeakError, check_no_harmbench
from safemerge.train.config import TrainConfig
from safemerge.train.recipes import RECIPES, build_examples
from safemerge.train.trainer import TrainResult, train

__all__ = [
    "RECIPES",
    "HarmBenchLeakError",
    "TrainConfig",
    "TrainResult",
    "build_examples",
    "check_no_harmbench",
    "train",
]
