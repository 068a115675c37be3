"""Model-organism benchmark: what a first `safemerge demo` costs, and the savings behind it.

1. `--train-steps N` (side by side, same data, batch 8, same LoRA): seconds per step of the harness's
   TRL trainer (`safemerge train`) vs the organism's `train_loop` (loss and vocabulary projection on
   response tokens only), and of the same loop with and without SmolLM2's default system prompt.
2. `--precision` (side by side): float32 vs bfloat16 (the organism's recipe 4) for a LoRA step, a full
   fine-tune step (A's stage) and the greedy generation of the organism's validation prompts; and the
   LM head's input made contiguous or not (`contiguous_head_input`) with a frozen head, alone and when
   generating with a LoRA attached.
3. `--demo`: the default demo from an empty cache (organism build included) and then again with the
   cache; prints the wall time of each stage, the thread count and the peak RSS.
4. `--probe`: the precision probe (docs/organism.md, "Precision") at 1 and 2 threads: float32 and
   bfloat16 GFLOP/s at the organism's shapes and the choice; nothing else runs.

Usage: python benchmarks/bench_organism.py [--train-steps 8] [--precision] [--demo] [--threads N] [--probe]
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


def loop_seconds(model_dir: Path, steps: int, precision: str = "float32", full: bool = False) -> float:
    """Seconds per step of the organism's loop (after one warm-up step): a LoRA (r 8, q/v), or with
    `full` a fine-tune of every attention and MLP projection (A's stage)."""
    from peft import LoraConfig, get_peft_model

    from safemerge.organism.build import TRAINED, load_causal_lm, train_loop
    from safemerge.organism.recipe import LoraRecipe

    base, tok = load_causal_lm(model_dir)
    if full:
        model = base
        for name, p in model.named_parameters():
            p.requires_grad_(any(f".{t}." in name for t in TRAINED))
    else:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    ex = _examples(8 * (steps + 1))
    warm = LoraRecipe(samples=8, steps=1, precision=precision)
    train_loop(model, tok, ex[:8], warm, "warm-up", False)
    t0 = time.perf_counter()
    recipe = LoraRecipe(samples=len(ex) - 8, steps=steps, precision=precision)
    train_loop(model, tok, ex[8:], recipe, "loop", False)
    return (time.perf_counter() - t0) / steps


def generation_seconds(model_dir: Path, dtype: str) -> tuple[float, int]:
    """Seconds to generate 8 greedy tokens for the organism's validation harmful + benign prompts
    (one batch, as the demo does), after a warm-up batch; and the number of prompts."""
    from safemerge.evaluate.backends import TransformersBackend, chat_texts
    from safemerge.organism.data import prompt_sets

    ps = prompt_sets(0, 480, 480, 40, 40)
    backend = TransformersBackend(str(model_dir), max_new_tokens=8, dtype=dtype)
    texts = sorted(chat_texts(backend.tokenizer, ps.harmful_val + ps.benign_val), key=len)
    backend.generate_texts(texts[:8])
    t0 = time.perf_counter()
    backend.generate_texts(texts)
    backend.close()
    return time.perf_counter() - t0, len(texts)


def head_table(model_dir: Path, folder: Path) -> None:
    """The LM head with a frozen weight: strided [200, 1, 576] input vs a contiguous copy, alone and in
    generation with a LoRA attached (200 validation arithmetic prompts, 8 tokens, bfloat16)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from safemerge.evaluate import backends
    from safemerge.evaluate.backends import TransformersBackend, chat_texts
    from safemerge.organism.build import load_causal_lm
    from safemerge.organism.data import arithmetic_val

    w = torch.randn(49152, 576, dtype=torch.bfloat16)  # SmolLM2's head, frozen
    h = torch.randn(200, 26, 576, dtype=torch.bfloat16)
    with torch.inference_mode():
        times = []
        for x in (h[:, -1:, :], h[:, -1:, :].contiguous()):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    print(
        f"  LM head, frozen, 200 x 1 x 576: strided {times[0]:.3f} s, contiguous {times[1]:.3f} s  "
        f"({times[1] / times[0]:.4f}x)"
    )
    base, _ = load_causal_lm(model_dir)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(str(folder / "lora"))
    texts_of = [q for q, _ in arithmetic_val(200)]
    gen = []
    for hook in (False, True):
        original = backends.contiguous_head_input
        if not hook:
            backends.contiguous_head_input = lambda _model: None  # type: ignore[assignment]
        try:
            b = TransformersBackend(str(model_dir), [str(folder / "lora")], 8, dtype="bfloat16")
        finally:
            backends.contiguous_head_input = original  # type: ignore[assignment]
        texts = sorted(chat_texts(b.tokenizer, texts_of), key=len)
        b.model.set_adapter(b.names[str(folder / "lora")])
        t0 = time.perf_counter()
        b.generate_texts(texts)
        gen.append(time.perf_counter() - t0)
        b.close()
    print(
        f"  generation with a LoRA, 200 x 8 tokens: strided head input {gen[0]:.1f} s, contiguous "
        f"{gen[1]:.1f} s  ({gen[1] / gen[0]:.2f}x)"
    )


def precision_table(model_dir: Path, steps: int) -> None:
    """float32 vs bfloat16, each pair measured back to back in this run."""
    print(f"float32 vs bfloat16 ({steps} steps each, batch 8, arithmetic examples):")
    for label, full in (("LoRA step (r 8, q/v)", False), ("full fine-tune step (A)", True)):
        f32 = loop_seconds(model_dir, steps, "float32", full)
        bf16 = loop_seconds(model_dir, steps, "bfloat16", full)
        print(f"  {label:26s}: float32 {f32:.2f} s, bfloat16 {bf16:.2f} s  ({bf16 / f32:.2f}x)")
    g32, n = generation_seconds(model_dir, "float32")
    g16, _ = generation_seconds(model_dir, "bfloat16")
    print(
        f"  {'generation, ' + str(n) + ' prompts x 8':26s}: float32 {g32:.1f} s, bfloat16 {g16:.1f} s  "
        f"({g16 / g32:.2f}x)"
    )


def probe_table(threads: list[int], reps: int) -> None:
    """The precision probe (`safemerge.common.precision`) at each thread count, with `reps` timed products
    per precision (the probe itself stops after 0.2 s): best times, GFLOP/s, bfloat16's speed-up over
    float32, the choice, and the default probe's own wall time."""
    import torch

    from safemerge.common.precision import PROBE_IN, PROBE_OUT, PROBE_TOKENS, faster_precision, probe_products

    print(
        f"precision probe: F.linear [{PROBE_TOKENS} x {PROBE_IN}] x [{PROBE_OUT} x {PROBE_IN}]^T, "
        f"best of {reps}:"
    )
    for n in threads:
        torch.set_num_threads(n)
        t = probe_products(reps=reps, budget_s=float("inf"))  # every rep, however long
        t0 = time.perf_counter()
        probe_products()
        wall = time.perf_counter() - t0
        print(
            f"  {n} thread(s): float32 {t.float32_s * 1e3:.2f} ms ({t.gflops('float32'):.0f} GFLOP/s), "
            f"bfloat16 {t.bfloat16_s * 1e3:.2f} ms ({t.gflops('bfloat16'):.0f} GFLOP/s), bfloat16 "
            f"{t.speedup:.2f}x float32 -> {faster_precision(t.float32_s, t.bfloat16_s)}; "
            f"the default probe took {wall:.2f} s"
        )


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
    ap.add_argument("--precision", action="store_true", help="float32 vs bfloat16 training and generation")
    ap.add_argument("--demo", action="store_true", help="also time a first and a cached demo run")
    ap.add_argument("--probe", action="store_true", help="the precision probe at 1 and 2 threads, 50 reps")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: automatic)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["SAFEMERGE_THREADS"] = str(args.threads)
    from safemerge.organism.build import set_threads

    if args.probe:
        probe_table([1, 2], 50)
        return 0
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
        if args.precision:
            u = unaligned_dirs(folder)[1] if args.train_steps <= 0 else without
            precision_table(u, 8)
            head_table(u, folder)
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
