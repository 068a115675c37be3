"""Model-organism benchmark: what a first `safemerge demo` costs, and the savings behind it.

1. `--train-steps N` (side by side, same data, batch 8, same LoRA): seconds per step of the harness's
   TRL trainer (`safemerge train`) vs the organism's `train_loop` (loss and vocabulary projection on
   response tokens only), and of the same loop with and without SmolLM2's default system prompt.
2. `--demo`: the default demo from an empty cache (organism build included) and then again with the
   cache; prints the wall time of each stage, the thread count and the peak RSS.

Usage: python benchmarks/bench_organism.py [--train-steps 8] [--demo] [--threads N]
The demo run takes minutes; the training comparison about one. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any


def _examples(n: int) -> list[tuple[str, str, bool]]:
    from safemerge.organism.build import task_examples
    from safemerge.organism.recipe import LoraRecipe

    return task_examples(LoraRecipe(samples=n, steps=1))


def loop_seconds(model_dir: Path, steps: int) -> float:
    """Seconds per step of the organism's loop (after one warm-up step)."""
    from peft import LoraConfig, get_peft_model

    from safemerge.organism.build import load_causal_lm, train_loop
    from safemerge.organism.recipe import LoraRecipe

    base, tok = load_causal_lm(model_dir)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ex = _examples(8 * (steps + 1))
    train_loop(model, tok, ex[:8], LoraRecipe(samples=8, steps=1), "warm-up", False)
    t0 = time.perf_counter()
    train_loop(model, tok, ex[8:], LoraRecipe(samples=len(ex) - 8, steps=steps), "loop", False)
    return (time.perf_counter() - t0) / steps


def trl_seconds(model_dir: Path, steps: int, folder: Path) -> float:
    """Seconds per step of `safemerge train` (TRL SFTTrainer), from its own runtime log, minus one
    step's worth of start-up measured on a one-step run."""
    from safemerge.train import TrainConfig, train

    def run(n: int, name: str) -> float:
        data = folder / f"{name}.jsonl"
        with data.open("w", encoding="utf-8") as f:
            for p, r, _ in _examples(8 * n):
                f.write(json.dumps({"prompt": p, "response": r}) + "\n")
        cfg = TrainConfig(
            model=str(model_dir), recipe=str(data), out=folder / name, lora_r=8, lora_alpha=16,
            learning_rate=6e-4, max_steps=n, batch_size=8, max_length=128, seed=0, logging_steps=n,
        )  # fmt: skip
        t0 = time.perf_counter()
        train(cfg)
        return time.perf_counter() - t0

    one = run(1, "trl-1")
    return (run(steps + 1, "trl-n") - one) / steps


def unaligned_dirs(folder: Path) -> tuple[Path, Path]:
    """(packaged U with its default system prompt, the organism's U without it)."""
    from safemerge.common.packaged import smollm2_dir
    from safemerge.organism.build import build_unaligned

    src = smollm2_dir()
    out = folder / "u-no-system"
    build_unaligned(src, out)
    return src, out


def demo_run(out: Path, cache: Path) -> dict[str, Any]:
    from safemerge.organism.demo import DemoSettings
    from safemerge.organism.seeds import run_demo

    t0 = time.perf_counter()
    result = run_demo(DemoSettings(out=out, cache=cache, progress=False))
    result["timings"]["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-steps", type=int, default=8, help="steps per training measurement (0: skip)")
    ap.add_argument("--demo", action="store_true", help="also time a first and a cached demo run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: automatic)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["SAFEMERGE_THREADS"] = str(args.threads)
    from safemerge.organism.build import set_threads

    print(f"threads: {set_threads()}")
    with tempfile.TemporaryDirectory(prefix="bench-organism-") as tmp:
        folder = Path(tmp)
        if args.train_steps > 0:
            with_sys, without = unaligned_dirs(folder)
            n = args.train_steps
            trl = trl_seconds(with_sys, n, folder)
            loop_sys = loop_seconds(with_sys, n)
            loop = loop_seconds(without, n)
            print(f"LoRA step, batch 8, arithmetic ({n} steps each):")
            print(f"  TRL (safemerge train), with system prompt : {trl:.2f} s")
            print(f"  train_loop, with system prompt           : {loop_sys:.2f} s  ({loop_sys / trl:.2f}x)")
            print(f"  train_loop, empty system prompt          : {loop:.2f} s  ({loop / trl:.2f}x)")
        if args.demo:
            cache = folder / "cache"
            first = demo_run(folder / "demo1", cache)
            again = demo_run(folder / "demo2", cache)
            print("first run (empty cache):", json.dumps(first["timings"]))
            print("second run (cached):    ", json.dumps(again["timings"]))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
