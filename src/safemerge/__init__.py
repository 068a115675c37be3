"""safemerge: selective layer-wise merging of LoRA adapters to restore safety alignment (SafeMERGE)."""

__version__ = "0.1.0"
