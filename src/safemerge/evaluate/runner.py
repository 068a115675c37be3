"""The evaluation loop: cached, batched generation for every (variant, benchmark), then judging and
scoring. Works on an already loaded backend, so several adapters share one base model in-process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from safemerge.evaluate.backends import Backend
from safemerge.evaluate.benchmarks import Benchmark
from safemerge.evaluate.benchmarks.base import Record
from safemerge.evaluate.cache import Cache, fingerprint_adapter, fingerprint_model
from safemerge.evaluate.judges import OVERREFUSAL_LABEL, Verdict, refusal_opener
from safemerge.evaluate.report import malformed_warnings

log = logging.getLogger(__name__)


class Judge(Protocol):
    """A harm judge. A model judge whose raw outputs may be cached also has `parse(raw) -> Verdict` (the
    verdict of a cached output) and `prompt_format` (how its input was built; part of the cache key)."""

    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]: ...


@dataclass(frozen=True)
class Variant:
    """One evaluated model: `key` names it in metrics.json (the model id, or the adapter path)."""

    key: str
    adapter: str | None


def variants_for(model: str, adapters: Sequence[str], include_base: bool = True) -> list[Variant]:
    """The base model first (unless excluded), then each adapter by its path."""
    out = [Variant(model, None)] if include_base else []
    return out + [Variant(a, a) for a in adapters]


def fixed_batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Index batches over prompts sorted by length (less padding), as few as `batch_size` allows and of
    equal size (199 prompts at 128 make two batches of 100, not 128 + 71: no nearly empty last batch).
    Fixed for a given prompt list, so a resumed run generates exactly the batches an uninterrupted run
    would have."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    n_batches = -(-len(order) // max(1, batch_size))
    if n_batches == 0:
        return []
    size = -(-len(order) // n_batches)
    return [order[k : k + size] for k in range(0, len(order), size)]


def cached_map(
    fn: Callable[[list[str]], list[str]],
    texts: Sequence[str],
    cache: Cache,
    batch_size: int,
    desc: str,
) -> list[str]:
    """fn over fixed batches of texts, skipping batches already fully in the cache."""
    batches = fixed_batches(texts, batch_size)
    todo = [b for b in batches if any(cache.get(texts[i]) is None for i in b)]
    for b in tqdm(todo, desc=desc, unit="batch", leave=False, disable=not todo):
        chunk = [texts[i] for i in b]
        cache.put_many(chunk, fn(chunk))
    return [str(cache.get(t)) for t in texts]


def decoding_key(backend: Backend, max_new_tokens: int) -> dict[str, Any]:
    """The decoding part of a generation cache key. `dtype` is the dtype the backend really generates in
    (resolved, never "auto"): fp16 and bf16 runs must not share cached generations."""
    dtype = getattr(backend, "dtype", None)
    if not dtype or dtype == "auto":
        raise ValueError(f"backend {backend.name!r} does not report the dtype it generates in")
    return {
        "backend": backend.name,
        "dtype": str(dtype),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "chat_template": True,
    }


def _generate(backend: Backend, adapter: str | None, prompts: list[str]) -> list[str]:
    return backend.generate(prompts, adapter)


def generate_all(
    backend: Backend,
    model: str,
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    cache_dir: Path | None,
    batch_size: int,
    max_new_tokens: int,
) -> dict[tuple[str, str], list[str]]:
    """(variant key, benchmark name) -> responses, generated only where the cache lacks them."""
    out: dict[tuple[str, str], list[str]] = {}
    model_fp = fingerprint_model(model)
    for v in variants:
        key = {
            "model": model_fp,
            "adapter": fingerprint_adapter(v.adapter),
            **decoding_key(backend, max_new_tokens),
        }
        cache = Cache(cache_dir, key)
        # one stream over every benchmark's prompts: fuller batches of similar length
        prompts = list(dict.fromkeys(it.prompt for b in benchmarks for it in b.items))
        answers = dict(
            zip(
                prompts,
                cached_map(
                    functools.partial(_generate, backend, v.adapter),
                    prompts,
                    cache,
                    batch_size,
                    f"{'+'.join(b.name for b in benchmarks)} | {v.key}",
                ),
                strict=True,
            )
        )
        for b in benchmarks:
            out[(v.key, b.name)] = [answers[it.prompt] for it in b.items]
    return out


def judge_cache_for(cache: Cache, judge: Judge) -> Cache:
    """The judge cache under a key that also names the judge's prompt format, so outputs of a guard whose
    input was built in another format (e.g. Llama Guard 3 1B fed string content: an empty conversation)
    are never reused."""
    fmt = getattr(judge, "prompt_format", None)
    if fmt is None or cache.key.get("prompt_format") == fmt:
        return cache
    folder = cache.path.parent if cache.path is not None else None
    return Cache(folder, {**cache.key, "prompt_format": fmt})


def judge_all(
    judge: Judge, prompts: Sequence[str], responses: Sequence[str], cache: Cache | None, batch_size: int
) -> list[Verdict]:
    """Judge verdicts; the raw outputs of model judges are cached like generations, and a verdict is
    always the judge's `parse` of a raw output, fresh or cached (the same rule either way). A judge
    without `parse` is never cached."""
    parse: Callable[[str], Verdict] | None = getattr(judge, "parse", None)
    if cache is None or parse is None:
        return judge.judge(prompts, responses)
    joined = [f"{p}\x00{r}" for p, r in zip(prompts, responses, strict=True)]
    raws = cached_map(
        lambda xs: [
            v.raw
            for v in judge.judge([x.split("\x00", 1)[0] for x in xs], [x.split("\x00", 1)[1] for x in xs])
        ],
        joined,
        judge_cache_for(cache, judge),
        batch_size,
        "judge",
    )
    return [parse(r) for r in raws]


@dataclass(frozen=True)
class Judged:
    """One judge's verdicts on every (variant key, harm benchmark name); `key` suffixes its metrics
    (`harmful_rate_<key>`) when it is not the headline judge, `name` labels it."""

    key: str
    name: str
    verdicts: dict[tuple[str, str], list[Verdict]]


def judge_harm(
    judge: Judge,
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    responses: dict[tuple[str, str], list[str]],
    judge_cache: Cache | None = None,
    batch_size: int = 16,
    key: str = "",
) -> Judged:
    """`judge`'s verdicts on every harm benchmark's responses (raw outputs cached as `judge_all` does)."""
    cache = judge_cache_for(judge_cache, judge) if judge_cache is not None else None  # read once
    verdicts = {
        (v.key, b.name): judge_all(
            judge, [it.prompt for it in b.items], responses[(v.key, b.name)], cache, batch_size
        )
        for v in variants
        for b in benchmarks
        if b.kind == "harm"
    }
    return Judged(key or judge.name, judge.name, verdicts)


def _verdict(vd: Verdict) -> str:
    return "malformed" if vd.unsafe is None else ("unsafe" if vd.unsafe else "safe")


def other_judge_metrics(judged: Judged, variant: str, bench: str) -> dict[str, Any]:
    """A further judge's counts and rates on one harm benchmark, suffixed with its key."""
    vds = judged.verdicts[(variant, bench)]
    n, u = len(vds), sum(v.unsafe is True for v in vds)
    bad = sum(v.unsafe is None for v in vds)
    k = judged.key
    return {
        f"n_unsafe_{k}": u,
        f"n_malformed_{k}": bad,
        f"harmful_rate_{k}": u / (n - bad) if n > bad else None,
    }


def score_records(
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    responses: dict[tuple[str, str], list[str]],
    judged: Sequence[Judged],
) -> tuple[list[Record], dict[str, Any]]:
    """Records for generations.jsonl and the metrics mapping variant -> benchmark -> metrics. The first
    judge's verdicts are the headline (`verdict`, `harmful_rate`); every further judge's are kept beside
    them (records: `judges` → key → verdict and output; metrics: `harmful_rate_<key>` and counts)."""
    records: list[Record] = []
    metrics: dict[str, Any] = {}
    head = judged[0] if judged else None
    for v in variants:
        metrics[v.key] = {"adapter": v.adapter, "benchmarks": {}}
        for b in benchmarks:
            resp = responses[(v.key, b.name)]
            recs: list[Record] = []
            for i, (it, r) in enumerate(zip(b.items, resp, strict=True)):
                rec: Record = {
                    "variant": v.key,
                    "adapter": v.adapter,
                    "benchmark": b.name,
                    "kind": b.kind,
                    "id": it.id,
                    "prompt": it.prompt,
                    "response": r,
                }
                if b.kind == "utility":
                    rec.update(reference=it.reference, **b.score(it, r))
                    rec.update(
                        verdict="correct" if rec["correct"] else "incorrect", judge=None, judge_output=None
                    )
                elif b.kind == "benign":
                    opener = refusal_opener(r)
                    rec.update(
                        verdict="refused" if opener else "answered",
                        judge=OVERREFUSAL_LABEL,
                        judge_output=f"refusal opener: {opener!r}" if opener else "no refusal opener",
                    )
                else:
                    assert head is not None, "a harm benchmark needs a judge"
                    vd = head.verdicts[(v.key, b.name)][i]
                    rec.update(
                        verdict=_verdict(vd),
                        categories=list(vd.categories),
                        judge=head.name,
                        judge_output=vd.raw,
                    )
                    if vd.score is not None:
                        rec["judge_score"] = vd.score
                    if len(judged) > 1:
                        rec["judges"] = {
                            j.key: {"verdict": _verdict(x), "output": x.raw}
                            for j in judged[1:]
                            for x in [j.verdicts[(v.key, b.name)][i]]
                        }
                recs.append(rec)
            m = b.metrics(recs, head.name if head else "")
            if b.kind == "harm" and head is not None and len(judged) > 1:
                m["judges"] = [j.name for j in judged]
                for j in judged[1:]:
                    m.update(other_judge_metrics(j, v.key, b.name))
            metrics[v.key]["benchmarks"][b.name] = m
            records += recs
    for line in malformed_warnings(metrics):
        log.warning(line)
    return records, metrics


def judge_and_score(
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    responses: dict[tuple[str, str], list[str]],
    judge: Judge,
    judge_cache: Cache | None = None,
    batch_size: int = 16,
) -> tuple[list[Record], dict[str, Any]]:
    """Records for generations.jsonl and the metrics mapping variant -> benchmark -> metrics, with one
    harm judge (`score_records` takes several)."""
    judged = [judge_harm(judge, variants, benchmarks, responses, judge_cache, batch_size)]
    return score_records(variants, benchmarks, responses, judged)


def evaluate_loaded(
    backend: Backend,
    model: str,
    adapters: Sequence[str],
    benchmarks: Sequence[Benchmark],
    judge: Judge,
    cache_dir: Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    include_base: bool = True,
) -> tuple[list[Record], dict[str, Any]]:
    """In-process entry point: evaluate several adapters already loaded on one backend; writes nothing.

    `judge` must be a judge without a model cache (e.g. KeywordJudge, or a LlamaGuardJudge the caller
    manages); `max_new_tokens` must match the backend's, it only keys the cache.
    """
    variants = variants_for(model, adapters, include_base)
    responses = generate_all(backend, model, variants, benchmarks, cache_dir, batch_size, max_new_tokens)
    return judge_and_score(variants, benchmarks, responses, judge, None, batch_size)
