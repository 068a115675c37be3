"""`safemerge eval`: utility and harmfulness of a base model and its LoRA adapters."""

from safemerge.evaluate.api import evaluate
from safemerge.evaluate.backends import TransformersBackend, VLLMBackend
from safemerge.evaluate.benchmarks import Benchmark, Item, benchmark_kind, benchmark_names, load_benchmark
from safemerge.evaluate.config import EvalConfig
from safemerge.evaluate.judges import KeywordJudge, LlamaGuardJudge, parse_llama_guard
from safemerge.evaluate.runner import Variant, evaluate_loaded, generate_all, judge_and_score, variants_for

__all__ = [
    "Benchmark",
    "EvalConfig",
    "Item",
    "KeywordJudge",
    "LlamaGuardJudge",
    "TransformersBackend",
    "VLLMBackend",
    "Variant",
    "benchmark_kind",
    "benchmark_names",
    "evaluate",
    "evaluate_loaded",
    "generate_all",
    "judge_and_score",
    "load_benchmark",
    "parse_llama_guard",
    "variants_for",
]
