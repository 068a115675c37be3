"""`safemerge.evaluate.evaluate(EvalConfig)`: the whole command as a function, writing atomically to
`cfg.out`: generations.jsonl, metrics.json, summary.md, eval_config.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safemerge.common.config_io import dump_config
from safemerge.common.errors import InputError
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.evaluate.backends import (
    Backend,
    Generation,
    TransformersBackend,
    VLLMBackend,
    cuda_capability,
    load_tokenizer,
    read_adapter_config,
    transformers_dtype,
)
from safemerge.evaluate.benchmarks import Benchmark, load_benchmark
from safemerge.evaluate.cache import Cache, default_cache_dir
from safemerge.evaluate.compare import add_reference_comparison, named_variants
from safemerge.evaluate.config import EvalConfig
from safemerge.evaluate.judge_plugins import JudgeChoice, choose_judges, preflight_judges
from safemerge.evaluate.preflight import model_config, resolve_vllm_dtype
from safemerge.evaluate.report import markdown, print_table
from safemerge.evaluate.runner import (
    Judge,
    Record,
    Variant,
    generate_all,
    judge_harm,
    score_records,
)


def load_benchmarks(names: list[str], limit: int | None) -> list[Benchmark]:
    """All benchmarks, loaded up front so a bad name or file fails before any generation."""
    if not names:
        raise InputError("--benchmarks is empty")
    if len(set(names)) != len(names):
        raise InputError(f"--benchmarks lists a benchmark twice: {names}")
    out = []
    for n in names:
        try:
            out.append(load_benchmark(n, limit))
        except InputError as exc:
            text = str(exc)
            raise InputError(text if n in text else f"benchmark {n}: {text}") from None
    return out


def make_backend(cfg: EvalConfig, prompts: Sequence[str] | None = None) -> Backend:
    """The generation backend of `cfg`. A vLLM engine is sized for `prompts` (its `max_model_len` is the
    longest rendered prompt + max_new_tokens, unless `cfg.max_model_len` is given); without them, for the
    prompts of `cfg.benchmarks` (with `cfg.limit`). Pass the prompts you will generate for when they are
    not those (e.g. benchmarks built in code, or validation sets)."""
    if cfg.backend == "vllm":
        if prompts is None and cfg.max_model_len is None:
            prompts = [it.prompt for b in load_benchmarks(cfg.benchmarks, cfg.limit) for it in b.items]
        return VLLMBackend(
            cfg.model,
            cfg.adapters,
            cfg.max_new_tokens,
            cfg.tensor_parallel_size,
            cfg.gpu_memory_utilization,
            cfg.dtype,
            cfg.trust_remote_code,
            max_model_len=cfg.max_model_len,
            prompts=prompts,
        )
    return TransformersBackend(
        cfg.model, cfg.adapters, cfg.max_new_tokens, cfg.dtype, trust_remote_code=cfg.trust_remote_code
    )


class LazyGuard:
    """A model judge's backend, started on the judge's first generation and then kept: never when every
    verdict is cached, once however many verdicts are missing. `before_start` runs just before it starts
    (it frees a generation engine the caller keeps, so that the two never hold the GPU at once). `dtype`
    is resolved before the start, as the backend will resolve it: it keys the judge cache, which is read
    before anything starts."""

    def __init__(
        self,
        cfg: EvalConfig,
        model: str,
        max_new_tokens: int,
        sizing: Sequence[str] = (),
        before_start: Callable[[], None] | None = None,
    ) -> None:
        self.cfg, self.model, self.max_new_tokens = cfg, model, max_new_tokens
        self.sizing, self.before_start = list(sizing), before_start
        self.backend: Backend | None = None
        if cfg.backend == "vllm":
            self.dtype = resolve_vllm_dtype(cfg.dtype, model_config(model), cuda_capability())
        else:
            self.dtype = transformers_dtype(cfg.dtype)

    def _start(self, tokenizer: Any) -> Backend:
        if self.before_start is not None:
            self.before_start()
        cfg = self.cfg
        backend: Backend
        if cfg.backend == "vllm":
            backend = VLLMBackend(
                self.model, (), self.max_new_tokens, cfg.tensor_parallel_size, cfg.gpu_memory_utilization,
                cfg.dtype, chat=False, prompts=self.sizing, tokenizer=tokenizer,
            )  # fmt: skip
        else:
            backend = TransformersBackend(self.model, (), self.max_new_tokens, cfg.dtype, chat=False)
        if backend.dtype != self.dtype:
            backend.close()
            raise RuntimeError(
                f"the judge {self.model} runs in {backend.dtype}, its cache key says {self.dtype}"
            )
        return backend

    def generate(self, texts: Sequence[str], tokenizer: Any = None) -> list[str]:
        if self.backend is None:
            self.backend = self._start(tokenizer)
        return self.backend.generate(texts, None)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def make_judge(
    cfg: EvalConfig,
    pairs: Sequence[tuple[str, str]] = (),
    choice: JudgeChoice | None = None,
    before_start: Callable[[], None] | None = None,
) -> tuple[Judge, LazyGuard | None]:
    """A harm judge (default: `cfg`'s first) and, for a model judge, its lazily started backend
    (`LazyGuard`, to close afterwards). A vLLM judge engine is sized for the judge inputs of `pairs`
    (prompt, response): exactly the texts the judge renders for them (it is run once on them, capturing
    its inputs, before anything starts), + the judge's new tokens."""
    choice = choice or choose_judges(cfg.judge, cfg.judge_model)[0]
    plugin, model = choice.plugin, choice.model
    if model is None:
        return plugin.build(None, None, None), None
    tokenizer = load_tokenizer(model)
    rendered: list[str] = []
    guard: list[LazyGuard] = []  # empty while the judge's inputs are captured

    def generate(texts: list[str]) -> list[str]:
        if not guard:
            rendered.extend(texts)
            return [""] * len(texts)
        return guard[0].generate(texts, tokenizer)

    judge = plugin.build(model, generate, tokenizer)
    if pairs and cfg.backend == "vllm":
        judge.judge([p for p, _ in pairs], [r for _, r in pairs])
    guard.append(LazyGuard(cfg, model, plugin.max_new_tokens, rendered, before_start))
    return judge, guard[0]


def write_outputs(
    folder: Path,
    records: list[Record],
    metrics: dict[str, Any],
    cfg: EvalConfig,
    judge: str,
    config: bool = True,
) -> None:
    """generations.jsonl, metrics.json, summary.md and (with `config`) the eval_config.yaml that reruns
    it; a model held in memory has no config to rerun."""
    with (folder / "generations.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (folder / "summary.md").write_text(markdown(metrics, judge), encoding="utf-8")
    if config:
        (folder / "eval_config.yaml").write_text(dump_config(cfg), encoding="utf-8")


def eval_inputs(cfg: EvalConfig) -> dict[str, Any]:
    """What `safemerge eval` reads, by label: its output directory must not overlap any of it."""
    files = [b for b in cfg.benchmarks if Path(b).is_file()]
    return {
        "model": cfg.model,
        "adapter": cfg.adapters,
        "benchmark file": files,
        "judge model": cfg.judge_model,
        "generation cache": cfg.cache_dir,
    }


def evaluate(cfg: EvalConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Evaluate the base model and each adapter on each benchmark; returns metrics (as metrics.json).

    A `backend` already holding the model and adapters may be passed in (it is left open); otherwise
    one is built and closed before the judge loads (so an 8B judge fits next to nothing else).
    """
    check_output_dir(cfg.out, cfg.force, eval_inputs(cfg))
    if cfg.batch_size <= 0 or cfg.max_new_tokens <= 0:
        raise InputError("--batch-size and --max-new-tokens must be positive")
    for a in cfg.adapters:
        read_adapter_config(a)
    benchmarks = load_benchmarks(cfg.benchmarks, cfg.limit)
    if any(b.kind == "harm" for b in benchmarks):  # every judge resolved before any engine starts
        preflight_judges(cfg.judge, cfg.judge_model, cfg.trust_remote_code)
    variants = named_variants(cfg)  # the model, then each adapter by its name or path
    if not variants:
        raise InputError("nothing to evaluate: no --adapter given and the base model is excluded")
    cache_dir = None if cfg.no_cache else (cfg.cache_dir or default_cache_dir())
    own = backend is None
    backend = backend or make_backend(cfg, [it.prompt for b in benchmarks for it in b.items])
    try:
        responses = generate_all(
            backend, cfg.model, variants, benchmarks, cache_dir, cfg.batch_size, cfg.max_new_tokens
        )
    finally:
        if own:
            backend.close()  # before the judge's engine starts: one engine at a time
    # a backend the caller keeps is released (not closed) before a judge's engine starts: it starts
    # again on its next generation
    release = None if own else getattr(backend, "release", None)
    records, metrics = score(cfg, variants, benchmarks, responses, cache_dir, release)
    add_reference_comparison(cfg.reference, records, metrics)
    judge_name = _judge_label(cfg)
    with atomic_output_dir(cfg.out, cfg.force, eval_inputs(cfg), "eval") as tmp:
        write_outputs(tmp, records, metrics, cfg, judge_name)
    print_table(metrics, judge_name)
    return metrics


def _judge_label(cfg: EvalConfig) -> str:
    return judges_label(cfg.judge, cfg.judge_model)


def judges_label(judge: str | list[str], judge_model: str) -> str:
    """The judges as a summary names them: the headline judge's label, then the others'."""
    labels = [c.label for c in choose_judges(judge, judge_model)]
    return labels[0] + (f" (also: {'; '.join(labels[1:])})" if len(labels) > 1 else "")


def score(
    cfg: EvalConfig,
    variants: list[Variant],
    benchmarks: list[Benchmark],
    responses: Mapping[tuple[str, str], Sequence[str | Generation]],
    cache_dir: Path | None,
    before_guard: Callable[[], None] | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Judge harm benchmarks with every judge of `cfg.judge`, one after the other, and score the rest.
    A model judge's engine starts only where a harm benchmark has an answer whose verdict is not cached,
    once for all of them, after `before_guard` (which frees the caller's generation engine), and is
    closed before the next judge's starts. The first judge's verdicts are the headline."""
    harm = [b for b in benchmarks if b.kind == "harm"]
    judged = []
    if harm:
        pairs = [
            (it.prompt, r if isinstance(r, str) else r.text)
            for v in variants
            for b in harm
            for it, r in zip(b.items, responses[(v.key, b.name)], strict=True)
        ]
        for choice in choose_judges(cfg.judge, cfg.judge_model):
            judge, guard = make_judge(cfg, pairs if choice.model else (), choice, before_guard)
            try:
                cache = _judge_cache(cfg, choice, guard, cache_dir) if choice.model else None
                judged.append(
                    judge_harm(judge, variants, harm, responses, cache, cfg.batch_size, choice.slug)
                )
            finally:
                if guard is not None:
                    guard.close()
    return score_records(variants, benchmarks, responses, judged, warn_truncated=cfg.warn_truncated)


def _judge_cache(
    cfg: EvalConfig, choice: JudgeChoice, guard: LazyGuard | None, cache_dir: Path | None
) -> Cache:
    """Where a model judge's raw outputs are cached: keyed by its model, backend, dtype and token budget
    (and its name, for judges other than Llama Guard, whose key is as before)."""
    key: dict[str, Any] = {
        "judge": choice.model,
        "backend": cfg.backend,
        "dtype": getattr(guard, "dtype", cfg.dtype),
        "max_new_tokens": choice.plugin.max_new_tokens,
    }
    if choice.name != "llama-guard":
        key["judge_name"] = choice.name
    return Cache(cache_dir / "judge" if cache_dir else None, key)
