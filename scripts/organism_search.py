"""Choose the organism's recipe on the validation sets only (never the test sets).

Builds each candidate recipe's A (and, with --task, its T) into a cache and evaluates them on the
organism's validation sets with the demo's decoding settings: harmful validation (HarmBench val + held-out
StrongREJECT), benign validation, and with --task the validation arithmetic set. One line per candidate
(counts and Wilson 95% intervals), appended as JSON to --log.

    python scripts/organism_search.py --cache /tmp/search-cache --log search.jsonl \
        '{"aligned": {"steps": 120}}' '{"aligned": {"steps": 120, "learning_rate": 5e-5}}'
    python scripts/organism_search.py --task --val-task 200 '{"task": {"samples": 1200, "steps": 150}}'

A candidate is a JSON object of overrides to `OrganismRecipe` (nested for its stages). Stages are cached
by recipe key, so candidates that share A build it once. docs/organism.md records the searches run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError
from safemerge.common.packaged import cache_root
from safemerge.common.stats import wilson
from safemerge.evaluate.backends import TransformersBackend
from safemerge.evaluate.judges import KeywordJudge
from safemerge.evaluate.runner import evaluate_loaded
from safemerge.organism.build import build_organism, set_threads
from safemerge.organism.demo import DemoSettings, resolve_settings, validation_benchmarks
from safemerge.organism.recipe import OrganismRecipe


def recipe_with(text: str) -> OrganismRecipe:
    """OrganismRecipe() with a candidate's nested JSON overrides applied (validated by pydantic)."""
    from pydantic import ValidationError

    try:
        overrides = json.loads(text)
        if not isinstance(overrides, dict):
            raise ValueError("expected a JSON object")
    except ValueError as exc:
        raise InputError(f"candidate {text!r}: not a JSON object of recipe overrides ({exc})") from None
    data = OrganismRecipe().model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
        else:
            data[key] = value
    try:
        return OrganismRecipe.model_validate(data)
    except ValidationError as exc:
        raise InputError(f"candidate {text!r}: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None


def evaluate(model: Path, adapter: Path | None, s: DemoSettings, benches: dict[str, Any]) -> dict[str, Any]:
    """Validation counts of A (adapter None) or A + adapter, with the demo's token budgets and dtype."""
    out: dict[str, Any] = {}
    names = [n for n in benches if benches[n].kind != "utility"]
    groups = [(names, s.harm_tokens)]
    if adapter is not None:
        groups.append(([n for n in benches if benches[n].kind == "utility"], s.task_tokens))
    for group, tokens in groups:
        adapters = [str(adapter)] if adapter is not None else []
        backend = TransformersBackend(str(model), adapters, max_new_tokens=tokens, dtype=s.dtype)
        _, metrics = evaluate_loaded(
            backend, str(model), adapters, [benches[n] for n in group], KeywordJudge(),
            (s.cache or cache_root()) / "generations", s.batch_size, tokens,
            include_base=adapter is None,
        )  # fmt: skip
        backend.close()
        key = adapters[0] if adapters else str(model)
        for m in metrics[key]["benchmarks"].values():
            k = m.get("n_unsafe", m.get("n_refused", m.get("n_correct")))
            out[m["kind"]] = (int(k), int(m["n"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", nargs="+", help="JSON overrides of OrganismRecipe, one per candidate")
    ap.add_argument("--cache", type=Path, default=None, help="organism and generation cache")
    ap.add_argument("--task", action="store_true", help="also build and evaluate T")
    ap.add_argument("--val-task", type=int, default=200, help="validation arithmetic problems")
    ap.add_argument("--log", type=Path, default=Path("organism_search.jsonl"))
    args = ap.parse_args()
    try:
        recipes = [recipe_with(text) for text in args.candidates]  # all checked before any build
    except InputError as exc:
        print(f"organism_search: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    set_threads()
    for text, recipe in zip(args.candidates, recipes, strict=True):
        overrides = json.loads(text)
        # the precision resolved once per candidate (the probe's answer is cached), generation in it too
        s = resolve_settings(
            DemoSettings(out=Path("."), recipe=recipe, cache=args.cache, val_task=args.val_task)
        )
        t0 = time.perf_counter()
        stages = ("aligned", "task") if args.task else ("aligned",)
        org = build_organism(s.recipe, args.cache, progress=False, stages=stages)
        build_s = time.perf_counter() - t0
        benches = validation_benchmarks(s, org)
        row: dict[str, Any] = {"overrides": overrides, "build_s": round(build_s, 1)}
        row["aligned"] = evaluate(org.aligned, None, s, benches)
        if args.task:
            row["task"] = evaluate(org.aligned, org.task, s, benches)
        with args.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        parts = [f"{json.dumps(overrides)} (build {build_s:.0f} s)"]
        for who in ("aligned", "task"):
            for kind, (k, n) in row.get(who, {}).items():
                parts.append(f"  {who} {kind}: {wilson(k, n).fmt()}")
        print("\n".join(parts), flush=True)


if __name__ == "__main__":
    main()
