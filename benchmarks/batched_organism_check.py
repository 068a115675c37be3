"""The organism's test variants generated one at a time and in mixed-adapter batches: how many answers,
verdicts and task scores differ, and how long each took (same process, same loaded backend).

Reads a finished demo seed directory (`safemerge demo --out OUT` → OUT/seed-0): the adapter rows of its
test evaluation (evals/<row>/<key>/generations.jsonl, not the validation ones) on the aligned model of
its experiment.yaml, with its test benchmarks and token budgets (harm and benign prompts 8 new tokens,
the task 24). Nothing is cached or written. Full-model rows (RESTA) are not mixed and not compared.

Usage: python benchmarks/batched_organism_check.py SEED_DIR [--dtype bfloat16] [--rows 1400]
       [--batch-size 200] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from safemerge.evaluate.backends import TransformersBackend
from safemerge.evaluate.benchmarks import load_benchmark
from safemerge.evaluate.judges import KeywordJudge
from safemerge.evaluate.runner import Responses, Variant, generate_all, judge_harm, score_records


def test_rows(seed_dir: Path) -> tuple[list[str], dict[str, int]]:
    """The adapters of the test rows and each test benchmark's item count."""
    adapters: list[str] = []
    counts: dict[str, int] = {}
    for gen in sorted(seed_dir.glob("evals/*/*/generations.jsonl")):
        if gen.parent.name.startswith("validation"):
            continue
        recs = [json.loads(line) for line in gen.read_text(encoding="utf-8").splitlines()]
        if recs and recs[0]["adapter"] and recs[0]["adapter"] not in adapters:
            adapters.append(recs[0]["adapter"])
        for r in recs:
            counts[r["benchmark"]] = counts.get(r["benchmark"], 0)
        for name in counts:
            counts[name] = max(counts[name], sum(r["benchmark"] == name for r in recs))
    return adapters, counts


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    ap = argparse.ArgumentParser()
    ap.add_argument("seed_dir", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=0, help="rows per mixed batch (0: the harness's default)")
    ap.add_argument("--batch-size", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = yaml.safe_load((args.seed_dir / "experiment.yaml").read_text(encoding="utf-8"))
    model = cfg["setup"]["aligned"]
    budgets = {b["name"]: b["max_new_tokens"] for b in cfg["evaluation"]["benchmarks"]}
    adapters, counts = test_rows(args.seed_dir)
    benches = {name: load_benchmark(name, counts[name]) for name in budgets}
    variants = [Variant(model, None)] + [Variant(a, a) for a in adapters]
    print(f"{len(variants)} variants (the base + {len(adapters)} adapters), {counts}, dtype {args.dtype}")
    backend = TransformersBackend(model, adapters, dtype=args.dtype)
    backend.generate_full(["warm up"], adapters[0], 2)
    out: dict[str, Responses] = {"alone": {}, "mixed": {}}
    seconds = {"alone": 0.0, "mixed": 0.0}
    for tokens in sorted(set(budgets.values())):
        group = [benches[n] for n in budgets if budgets[n] == tokens]
        t0 = time.perf_counter()
        for v in variants:
            out["alone"].update(generate_all(backend, model, [v], group, None, args.batch_size, tokens))
        seconds["alone"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = args.rows or None
        mixed = generate_all(backend, model, variants, group, None, args.batch_size, tokens, rows)
        out["mixed"].update(mixed)
        seconds["mixed"] += time.perf_counter() - t0
    print(f"one at a time {seconds['alone']:.1f} s, mixed {seconds['mixed']:.1f} s")
    compare(variants, list(benches.values()), out)


def compare(variants: list[Variant], benches: list[Any], out: dict[str, Responses]) -> None:
    """Print the differing answers and verdicts (keyword judge, refusal openers, task scores)."""
    scored = {}
    for mode, responses in out.items():
        judged = [judge_harm(KeywordJudge(), variants, benches, responses)]
        scored[mode] = score_records(variants, benches, responses, judged, warn_truncated=False)[0]
    answers = verdicts = 0
    for a, b in zip(scored["alone"], scored["mixed"], strict=True):
        assert (a["variant"], a["id"]) == (b["variant"], b["id"])
        if a["response"] != b["response"]:
            answers += 1
            name = Path(a["variant"]).name
            print(f"answer differs: {name} {a['id']}: {a['response']!r} / {b['response']!r}")
        if a["verdict"] != b["verdict"]:
            verdicts += 1
            print(f"VERDICT differs: {Path(a['variant']).name} {a['id']}: {a['verdict']} / {b['verdict']}")
    print(f"{len(scored['alone'])} answers: {answers} differ, {verdicts} verdicts differ")


if __name__ == "__main__":
    main()
