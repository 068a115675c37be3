"""Threads: does a product's rounding depend on the thread count, and what OpenMP's wait policy costs on
an idle and on a busy machine (docs/organism.md, "Threads").

1. Products: `F.linear` (and one weight-gradient-shaped product) on the same seeded inputs with 1 and
   with 2 torch threads, bfloat16 and float32; prints every shape whose bits differ.
2. U's answers: the organism's `benign_answers` (U's greedy answers to A's 480 benign prompts, the
   recipe's precision and token budget) with 1 and with 2 threads, each in a fresh process; prints how
   many differ. Needs the packaged model (converted once into the cache).
3. Waiting: SmolLM2-135M in bfloat16, a training step (batch 8 × 128 tokens) and a greedy generation
   (8 × 16 tokens), best of 3, each setting in a fresh process: 1 thread, 2 threads with the default
   (active) OpenMP waiting and 2 with `OMP_WAIT_POLICY=PASSIVE`; idle, then with a single-threaded busy
   loop holding one core (`--no-busy` skips that half); `--spincounts 1000,10000` adds 2 threads with
   libgomp's GOMP_SPINCOUNT at each value (how long a waiting thread spins before it sleeps).

Usage: python benchmarks/bench_threads.py [--skip products,answers,waiting] [--no-busy] [--spincounts N,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any


def products() -> None:
    import torch
    import torch.nn.functional as F

    shapes = [(m, k, n) for m in (1, 8, 64, 512, 4096) for k, n in ((576, 1536), (1536, 576), (576, 49152))]
    for dtype in (torch.bfloat16, torch.float32):
        differ = []
        for m, k, n in shapes:
            gen = torch.Generator().manual_seed(m * 7 + k + n)
            x, w = (
                torch.randn(m, k, generator=gen, dtype=dtype),
                torch.randn(n, k, generator=gen, dtype=dtype),
            )
            differ += [f"linear [{m}, {k}] x [{n}, {k}]^T"] * (not same(lambda x=x, w=w: F.linear(x, w)))
        for tokens in (512, 4096):
            gen = torch.Generator().manual_seed(tokens)
            x, g = (
                torch.randn(tokens, 576, generator=gen, dtype=dtype),
                torch.randn(tokens, 1536, generator=gen),
            )
            g = g.to(dtype)
            differ += [f"gradient [1536, {tokens}] x [{tokens}, 576]"] * (
                not same(lambda x=x, g=g: g.t() @ x)
            )
        total = len(shapes) + 2
        print(f"products, {dtype}: {len(differ)} of {total} shapes differ between 1 and 2 threads: {differ}")


def same(fn: Any) -> bool:
    import torch

    out = []
    for n in (1, 2):
        torch.set_num_threads(n)
        out.append(fn())
    return bool(torch.equal(out[0], out[1]))


def answers_child(threads: int) -> None:
    import torch

    from safemerge.common.packaged import smollm2_dir
    from safemerge.organism import build
    from safemerge.organism.recipe import OrganismRecipe

    torch.set_num_threads(threads)
    recipe, _ = build.resolve_recipe(OrganismRecipe())
    ar = recipe.aligned
    ps = build.prompt_sets(
        recipe.seed, ar.n_harmful, ar.n_benign, recipe.n_val_strongreject, recipe.n_benign_val
    )
    folder = smollm2_dir().parent / "bench-threads-U"  # U: the packaged model, empty system message
    if not (folder / "config.json").exists():
        build.build_unaligned(smollm2_dir(), folder)
    got = build.benign_answers(folder, ps.benign_train, ar.benign_max_new_tokens, ar.precision)
    print(json.dumps({"precision": ar.precision, "answers": got}))


def waiting_child(threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from safemerge.common.packaged import smollm2_dir

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.bfloat16)
    ids = torch.randint(3, 40000, (8, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()

    def generate() -> None:
        with torch.inference_mode():
            model.generate(input_ids=ids[:, :40], max_new_tokens=16, do_sample=False, pad_token_id=0)

    best = {}
    for name, fn in (("training step", step), ("generation", generate)):
        fn()  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    print(json.dumps(best))


def child(mode: str, threads: int, env: dict[str, str]) -> str:
    cmd = [sys.executable, __file__, "--child", mode, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1]


def answers() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    got = {n: json.loads(child("answers", n, env)) for n in (1, 2)}
    one, two = got[1]["answers"], got[2]["answers"]
    differ = sum(a != b for a, b in zip(one, two, strict=True))
    print(
        f"U's benign answers ({got[1]['precision']}): {differ} of {len(one)} differ between 1 and 2 threads"
    )


def waiting(busy: bool, spincounts: list[int]) -> None:
    unset = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    base = {k: v for k, v in os.environ.items() if k not in unset} | {"HF_HUB_OFFLINE": "1"}
    settings = [("1 thread", 1, base), ("2 threads, default waiting", 2, base)]
    settings.append(("2 threads, passive", 2, base | {"OMP_WAIT_POLICY": "PASSIVE"}))
    settings += [(f"2 threads, GOMP_SPINCOUNT={n}", 2, base | {"GOMP_SPINCOUNT": str(n)}) for n in spincounts]
    for load in ("idle", "busy loop on one core") if busy else ("idle",):
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            for name, threads, env in settings:
                res = json.loads(child("waiting", threads, env))
                cells = ", ".join(f"{k} {v:.2f} s" for k, v in res.items())
                print(f"{load}, {name}: {cells}")
        finally:
            if loop is not None:
                loop.kill()


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: products, answers, waiting")
    ap.add_argument("--no-busy", action="store_true", help="waiting: the idle half only")
    ap.add_argument("--spincounts", default="", help="waiting: also 2 threads at these GOMP_SPINCOUNTs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        {"answers": answers_child, "waiting": waiting_child}[args.child](args.threads)
        return
    skip = set(filter(None, args.skip.split(",")))
    print(f"load average at start: {os.getloadavg()}")
    if "products" not in skip:
        products()
    if "answers" not in skip:
        answers()
    if "waiting" not in skip:
        waiting(not args.no_busy, [int(n) for n in args.spincounts.split(",") if n])
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
