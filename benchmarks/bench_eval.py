"""Evaluation harness benchmark with the packaged SmolLM2-135M-Instruct (CPU or GPU).

1. Generation throughput of the transformers backend: batch 8 and 16 vs one prompt at a time
   (target: >= 4x tokens/s).
2. Four adapters evaluated on one loaded base vs reloading the base per adapter (target: <= 0.4x of
   the reloading time), measured in-process and as separate `safemerge eval` processes.

Usage: python benchmarks/bench_eval.py [--prompts 16] [--new-tokens 32] [--threads N] [--skip-cli]
(--threads: torch CPU threads; on a loaded machine 1 thread avoids OpenMP spin-waiting.)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safemerge.common.packaged import smollm2_dir
from safemerge.evaluate.backends import TransformersBackend
from safemerge.evaluate.benchmarks import load_benchmark


def count_tokens(backend: TransformersBackend, texts: list[str]) -> int:
    return sum(len(backend.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def throughput(backend: TransformersBackend, prompts: list[str], batch: int) -> tuple[float, int, float]:
    """(seconds, generated tokens, tokens/s) for all prompts at a given batch size."""
    t0 = time.perf_counter()
    outs: list[str] = []
    for k in range(0, len(prompts), batch):
        outs += backend.generate(prompts[k : k + batch], None)
    dt = time.perf_counter() - t0
    n = count_tokens(backend, outs)
    return dt, n, n / dt


def make_adapters(model_dir: Path, folder: Path, n: int = 4) -> list[str]:
    """n random (non-zero) LoRA adapters, r=8 on q_proj,v_proj, seeded."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft = get_peft_model(base, cfg)
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.mul_(0.05)
        out = folder / f"adapter{i}"
        peft.save_pretrained(out)
        paths.append(str(out))
    return paths


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--adapter-prompts", type=int, default=4)
    ap.add_argument("--adapter-new-tokens", type=int, default=16)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = smollm2_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"model: {model_dir}  device: {device}  torch threads: {torch.get_num_threads()}")
    prompts = [it.prompt for it in load_benchmark("overrefusal").items][: args.prompts]

    # 1. throughput
    if not args.skip_throughput:
        throughput_part(model_dir, prompts, args.new_tokens)
    adapters_part(model_dir, prompts, args)


def throughput_part(model_dir: Path, prompts: list[str], new_tokens: int) -> None:
    backend = TransformersBackend(str(model_dir), max_new_tokens=new_tokens)
    backend.generate(prompts[:2], None)  # warm-up
    dt1, n1, r1 = throughput(backend, prompts, 1)
    print(f"batch  1: {n1} tokens in {dt1:.1f}s = {r1:.1f} tokens/s")
    for b in (8, 16):
        dt, n, r = throughput(backend, prompts, b)
        print(f"batch {b:2d}: {n} tokens in {dt:.1f}s = {r:.1f} tokens/s  ({r / r1:.1f}x batch 1)")
    backend.close()


def adapters_part(model_dir: Path, prompts: list[str], args: argparse.Namespace) -> None:
    """Four adapters: one base vs reloading."""
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, Path(tmp))
        few = prompts[: args.adapter_prompts]
        t0 = time.perf_counter()
        shared = TransformersBackend(str(model_dir), adapters, max_new_tokens=args.adapter_new_tokens)
        t_load = time.perf_counter() - t0
        for a in adapters:
            shared.generate(few, a)
        t_shared = time.perf_counter() - t0
        shared.close()
        t0 = time.perf_counter()
        for a in adapters:
            single = TransformersBackend(str(model_dir), [a], max_new_tokens=args.adapter_new_tokens)
            single.generate(few, a)
            single.close()
        t_reload = time.perf_counter() - t0
        print(
            f"in-process, 4 adapters x {len(few)} prompts x {args.adapter_new_tokens} tokens: one base "
            f"{t_shared:.1f}s (loading base + 4 adapters {t_load:.1f}s), reload per adapter {t_reload:.1f}s, "
            f"ratio {t_shared / t_reload:.2f}"
        )
        if not args.skip_cli:
            exe = [
                str(Path(sys.executable).parent / "safemerge"),
                "eval",
                "--model",
                str(model_dir),
                "--benchmarks",
                "harmbench",
                "--limit",
                str(len(few)),
                "--max-new-tokens",
                str(args.adapter_new_tokens),
                "--no-include-base",
                "--no-cache",
            ]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            t0 = time.perf_counter()
            cmd = exe + [x for a in adapters for x in ("--adapter", a)] + ["--out", f"{tmp}/all"]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            t_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i, a in enumerate(adapters):
                subprocess.run(
                    [*exe, "--adapter", a, "--out", f"{tmp}/one{i}"], check=True, env=env, capture_output=True
                )
            t_four = time.perf_counter() - t0
            print(
                f"CLI, one `safemerge eval` with 4 adapters {t_one:.1f}s vs 4 runs of one adapter "
                f"{t_four:.1f}s, ratio {t_one / t_four:.2f}"
            )


if __name__ == "__main__":
    main()
