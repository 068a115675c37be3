"""The evaluation loop: cached, batched generation for every (variant, benchmark), then judging and
scoring. Works on an already loaded backend, so several adapters share one base model in-process.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from safemerge.common.errors import SafemergeWarning
from safemerge.common.progress import SHOW_PROGRESS
from safemerge.evaluate.backends import Backend, Generation
from safemerge.evaluate.benchmarks import Benchmark
from safemerge.evaluate.benchmarks.base import Record
from safemerge.evaluate.cache import (
    Cache,
    chat_template_fingerprint,
    fingerprint_adapter,
    fingerprint_model,
    tokenizer_fingerprint,
)
from safemerge.evaluate.judges import OVERREFUSAL_LABEL, Verdict, refusal_opener
from safemerge.evaluate.report import malformed_warnings, truncation_warnings

Responses = dict[tuple[str, str], list[Generation]]  # (variant key, benchmark name) -> answers

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
    for chunk in missing_batches(texts, cache, batch_size, desc):
        cache.put_many(chunk, fn(chunk))
    return [str(cache.get(t)) for t in texts]


def missing_batches(texts: Sequence[str], cache: Cache, batch_size: int, desc: str) -> Iterator[list[str]]:
    """The fixed batches of `texts` (`fixed_batches`) with some text not in `cache`, with a progress bar:
    what an interrupted run still has to compute."""
    batches = fixed_batches(texts, batch_size)
    todo = [b for b in batches if any(cache.get(texts[i]) is None for i in b)]
    for b in tqdm(todo, desc=desc, unit="batch", leave=False, disable=not todo or not SHOW_PROGRESS.get()):
        yield [texts[i] for i in b]


def decoding_key(backend: Backend, max_new_tokens: int) -> dict[str, Any]:
    """The decoding part of a generation cache key: everything besides the model's weights and the
    adapter that decides an answer. `dtype` is the dtype the backend really generates in (resolved,
    never "auto"): fp16 and bf16 runs must not share cached generations. `tokenizer` hashes the
    tokenizer the backend really uses (vocabulary, special tokens, chat template), `chat_template` the
    template the prompts are rendered with (None with `chat` off: raw prompts). `cpu_threads`, where a
    backend generates on the CPU, the torch threads: a product's rounding depends on how many threads
    split it, so answers generated with 1 and 2 threads may differ (docs/train_eval.md)."""
    dtype = getattr(backend, "dtype", None)
    if not dtype or dtype == "auto":
        raise ValueError(f"backend {backend.name!r} does not report the dtype it generates in")
    tokenizer = getattr(backend, "tokenizer", None)
    chat = bool(getattr(backend, "chat", True))
    key = {
        "backend": backend.name,
        "dtype": str(dtype),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "chat": chat,
        "chat_template": chat_template_fingerprint(tokenizer, chat),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    threads = getattr(backend, "cpu_threads", None)
    if threads:
        key["cpu_threads"] = int(threads)
    return key


def generate_batch(
    backend: Backend, adapter: str | None, prompts: list[str], max_new_tokens: int
) -> list[Generation]:
    """One batch of answers with exactly `max_new_tokens`, the number the cache key records. A backend
    without `generate_full` (one written for an older safemerge) generates with its own fixed number,
    which must then be this one; it reports no truncation."""
    full = getattr(backend, "generate_full", None)
    if callable(full):
        return list(full(prompts, adapter, max_new_tokens))
    own = getattr(backend, "max_new_tokens", max_new_tokens)
    if own != max_new_tokens:
        raise ValueError(
            f"backend {backend.name!r} generates {own} new tokens, {max_new_tokens} were asked for: it has "
            "no generate_full(prompts, adapter, max_new_tokens) to be told the number"
        )
    return [Generation(t) for t in backend.generate(prompts, adapter)]


def cached_generations(
    fn: Callable[[list[str]], list[Generation]],
    texts: Sequence[str],
    cache: Cache,
    batch_size: int,
    desc: str,
) -> list[Generation]:
    """`cached_map` for generations: each answer is stored with whether it was truncated."""
    for chunk in missing_batches(texts, cache, batch_size, desc):
        gens = fn(chunk)
        cache.put_many(chunk, [g.text for g in gens], [{"truncated": g.truncated} for g in gens])
    return [Generation(str(cache.get(t)), cache.get_meta(t).get("truncated")) for t in texts]


def mixed_blocker(backend: Backend, variants: Sequence[Variant]) -> str | None:
    """Why these variants' rows cannot share one batch on `backend` (None: they can)."""
    check = getattr(backend, "mixed_batch_blocker", None)
    if not callable(check) or not callable(getattr(backend, "generate_mixed", None)):
        return f"the {backend.name} backend generates one adapter per call"
    reason = check([v.adapter for v in variants])
    return None if reason is None else str(reason)


def mixed_plan(todo: Sequence[set[int]], sizes: Sequence[int], rows: int) -> list[list[tuple[int, int]]]:
    """Mixed batches as (variant, batch) pairs: `todo[v]` holds the fixed batches (indices into `sizes`,
    their row counts) variant v lacks. Batch j of every variant that lacks it is stacked, as many
    variants per mixed batch as keep it within `rows` rows (at least one), the groups of equal size;
    rows of one prompt get the same left padding as when generated alone."""
    plan: list[list[tuple[int, int]]] = []
    for j, size in enumerate(sizes):
        need = [v for v, t in enumerate(todo) if j in t]
        if not need:
            continue
        n_groups = -(-len(need) // max(1, rows // max(1, size)))
        per = -(-len(need) // n_groups)
        plan += [[(v, j) for v in need[k : k + per]] for k in range(0, len(need), per)]
    return plan


def generate_mixed(
    backend: Backend,
    variants: Sequence[Variant],
    prompts: Sequence[str],
    caches: Sequence[Cache],
    batch_size: int,
    max_new_tokens: int,
    desc: str,
    rows: int | None = None,
) -> None:
    """Generate the fixed batches (`fixed_batches`) each variant lacks, several variants per batch where
    the backend can mix adapters (`mixed_blocker`), into each variant's own cache; otherwise (or with
    fewer than two adapters left to generate) leave them to the one-variant-at-a-time loop, logging why.
    `rows` caps a mixed batch (default: the backend's `mixed_rows(batch_size)`, else `batch_size`; a
    forward pass never holds more rows than one variant's batch may); a batch that no other variant's
    fits beside runs alone, as before."""
    batches = fixed_batches(prompts, batch_size)
    todo = [{j for j, b in enumerate(batches) if any(c.get(prompts[i]) is None for i in b)} for c in caches]
    waiting = [v for v in range(len(variants)) if todo[v]]
    if len({variants[v].adapter for v in waiting}) < 2:
        return
    reason = mixed_blocker(backend, [variants[v] for v in waiting])
    if reason is not None:
        log.info("%s: generating %d variants one at a time: %s", desc, len(waiting), reason)
        return
    mixed: Any = backend
    limit = getattr(mixed, "mixed_rows", None)
    rows = rows or (int(limit(batch_size)) if callable(limit) else batch_size)
    plan = mixed_plan(todo, [len(b) for b in batches], rows)
    for group in tqdm(
        plan,
        desc=f"{desc} | {len(waiting)} variants mixed",
        unit="batch",
        leave=False,
        disable=not SHOW_PROGRESS.get(),
    ):
        texts = [prompts[i] for _, j in group for i in batches[j]]
        adapters = [variants[v].adapter for v, j in group for _ in batches[j]]
        if len(group) == 1:  # nothing beside it: the one-variant path
            gens = generate_batch(backend, adapters[0], texts, max_new_tokens)
        else:
            gens = list(mixed.generate_mixed(texts, adapters, max_new_tokens))
        start = 0
        for v, j in group:
            mine = gens[start : start + len(batches[j])]
            start += len(batches[j])
            chunk = [prompts[i] for i in batches[j]]
            caches[v].put_many(chunk, [g.text for g in mine], [{"truncated": g.truncated} for g in mine])


def generate_all(
    backend: Backend,
    model: str,
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    cache_dir: Path | None,
    batch_size: int,
    max_new_tokens: int,
    mixed_rows: int | None = None,
    model_fingerprint: str | None = None,
    adapter_fingerprint: Callable[[str | None], str] = fingerprint_adapter,
) -> Responses:
    """(variant key, benchmark name) -> answers, generated with `max_new_tokens` (it keys the cache and is
    what the backend is told: one number) only where the cache lacks them: first several variants per
    batch where the backend can mix adapters (`generate_mixed`, at most `mixed_rows` rows, default
    `generate_mixed`'s), then the rest one variant at a time. Each variant's answers are cached under its own
    key: the model's and the adapter's fingerprints (default: of their files; a model held in memory
    passes its own) and the decoding settings."""
    out: Responses = {}
    model_fp = model_fingerprint or fingerprint_model(model)
    decoding = decoding_key(backend, max_new_tokens)
    # one stream over every benchmark's prompts: fuller batches of similar length
    prompts = list(dict.fromkeys(it.prompt for b in benchmarks for it in b.items))
    shared: dict[str, Cache] = {}  # variants of the same adapter content share one cache, as on disk
    caches = []
    for v in variants:
        key = {"model": model_fp, "adapter": adapter_fingerprint(v.adapter), **decoding}
        caches.append(shared.setdefault(json.dumps(key, sort_keys=True), Cache(cache_dir, key)))
    names = "+".join(b.name for b in benchmarks)
    generate_mixed(backend, variants, prompts, caches, batch_size, max_new_tokens, names, mixed_rows)
    for v, cache in zip(variants, caches, strict=True):  # what is still missing: one variant at a time

        def fn(chunk: list[str], adapter: str | None = v.adapter) -> list[Generation]:
            return generate_batch(backend, adapter, chunk, max_new_tokens)

        desc = f"{names} | {v.key}"
        answers = dict(zip(prompts, cached_generations(fn, prompts, cache, batch_size, desc), strict=True))
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


def as_generations(answers: Sequence[str | Generation]) -> list[Generation]:
    """Answers as Generations (plain strings: truncation unknown)."""
    return [a if isinstance(a, Generation) else Generation(a) for a in answers]


def n_truncated(gens: Sequence[Generation]) -> int | None:
    """How many answers were cut off at the token limit; None when the backend did not say for some."""
    if any(g.truncated is None for g in gens):
        return None
    return sum(bool(g.truncated) for g in gens)


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
    responses: Mapping[tuple[str, str], Sequence[str | Generation]],
    judge_cache: Cache | None = None,
    batch_size: int = 16,
    key: str = "",
) -> Judged:
    """`judge`'s verdicts on every harm benchmark's responses (raw outputs cached as `judge_all` does)."""
    cache = judge_cache_for(judge_cache, judge) if judge_cache is not None else None  # read once
    verdicts = {
        (v.key, b.name): judge_all(
            judge,
            [it.prompt for it in b.items],
            [g.text for g in as_generations(responses[(v.key, b.name)])],
            cache,
            batch_size,
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
    responses: Mapping[tuple[str, str], Sequence[str | Generation]],
    judged: Sequence[Judged],
    warn_truncated: bool = True,
) -> tuple[list[Record], dict[str, Any]]:
    """Records for generations.jsonl (each with `truncated`) and the metrics mapping variant ->
    benchmark -> metrics (each with `n_truncated`). The first judge's verdicts are the headline
    (`verdict`, `harmful_rate`); every further judge's are kept beside them (records: `judges` → key →
    verdict and output; metrics: `harmful_rate_<key>` and counts). Warns where more than 5% of a
    benchmark's answers were cut off at the token limit (unless `warn_truncated` is off: `n_truncated`
    is counted either way)."""
    records: list[Record] = []
    metrics: dict[str, Any] = {}
    head = judged[0] if judged else None
    for v in variants:
        metrics[v.key] = {"adapter": v.adapter, "benchmarks": {}}
        for b in benchmarks:
            gens = as_generations(responses[(v.key, b.name)])
            resp = [g.text for g in gens]
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
                    "truncated": gens[i].truncated,
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
            metrics[v.key]["benchmarks"][b.name] = {**m, "n_truncated": n_truncated(gens)}
            records += recs
    for line in malformed_warnings(metrics):
        log.warning(line)
    for line in truncation_warnings(metrics) if warn_truncated else []:
        warnings.warn(line, SafemergeWarning, stacklevel=2)
    return records, metrics


def judge_and_score(
    variants: Sequence[Variant],
    benchmarks: Sequence[Benchmark],
    responses: Mapping[tuple[str, str], Sequence[str | Generation]],
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
    max_new_tokens: int | None = None,
    include_base: bool = True,
) -> tuple[list[Record], dict[str, Any]]:
    """In-process entry point: evaluate several adapters already loaded on one backend; writes nothing.

    `judge` must be a judge without a model cache (e.g. KeywordJudge, or a LlamaGuardJudge the caller
    manages). Answers have `max_new_tokens` new tokens at most (default: the backend's): the backend is
    told this number and the cache is keyed by it.
    """
    tokens = max_new_tokens if max_new_tokens is not None else getattr(backend, "max_new_tokens", None)
    if not isinstance(tokens, int) or tokens <= 0:
        raise ValueError("evaluate_loaded: give max_new_tokens (the backend does not say its own)")
    variants = variants_for(model, adapters, include_base)
    responses = generate_all(backend, model, variants, benchmarks, cache_dir, batch_size, tokens)
    return judge_and_score(variants, benchmarks, responses, judge, None, batch_size)
