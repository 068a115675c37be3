"""Mixed-adapter batched evaluation vs one variant, side by side in one run (CPU or GPU).

k seeded random LoRA adapters (r=8 on q_proj, v_proj) on the packaged SmolLM2-135M-Instruct; the same
P prompts. Four timings of the evaluation harness's generation (`generate_all`, no cache):
  one        one adapter on the P prompts;
  batched    k adapters on the P prompts, rows of several adapters in one batch (the backend's default,
             stacked LoRA: one LoRA product per layer, `safemerge.evaluate.stacked_lora`);
  peft       the same mixed batches through PEFT's own `adapter_names=` (a loop over the adapters);
  sequential k adapters one after another (what the harness did before mixed batches).
Prints time(batched) / time(one) (target: <= 0.35 k at k = 8), time(peft) / time(one) and
time(sequential) / time(one), each
with the peak resident memory of its own child process (each mode runs in a fresh process, model
loading not timed).

Usage: python benchmarks/bench_batched_eval.py [--k 8] [--prompts 16] [--new-tokens 32]
       [--batch-size 16] [--rows 128] [--dtype bfloat16] [--threads N] [--repeat 2] [--interleaved]
(--interleaved: the four modes in one process, in turn, best of --repeat each; no memory figures; it
also prints the compute floor of the batched run: its matrix-product FLOPs at the rate of a same-shaped
product measured in the process, over time(one) — where that floor exceeds 0.35 k no schedule meets it)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from safemerge.common.packaged import smollm2_dir

MODES = ("one", "batched", "peft", "sequential")


def make_adapters(model_dir: Path, folder: Path, n: int) -> list[str]:
    """n seeded random (non-zero) LoRA adapters, r=8 on q_proj, v_proj."""
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


def gemm_rate(dtype: Any, rows: int, d_in: int, d_out: int, repeat: int = 10) -> float:
    """FLOP/s of one `linear` of rows × d_in by d_out × d_in in `dtype`, best of `repeat`, this process's
    threads: the rate the model's projections can reach at best."""
    import torch

    x, w = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
    torch.nn.functional.linear(x, w)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * rows * d_in * d_out / best


def batched_flops(model: Any, tokenizer: Any, texts: list[str], k: int, new_tokens: int) -> float:
    """Matrix-product FLOPs of generating `new_tokens` for each text under k adapters: every decoder
    projection for each prompt token (left-padded to the longest) and each generated token, the output
    head for the last prompt token and each generated one (2 FLOPs per weight and token). Attention,
    norms and the LoRA products are left out, so this is a lower bound."""
    import torch

    head = model.get_output_embeddings()
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    decoder = linear - lora  # PEFT's lora_A/lora_B are Linear modules too
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    rows = k * len(texts)
    return 2.0 * rows * (decoder * (longest + new_tokens) + head.weight.numel() * (1 + new_tokens))


def child(args: argparse.Namespace) -> None:
    """One mode in this process: load, warm up, time `repeat` runs (the best is kept), print JSON."""
    import torch

    from safemerge.evaluate.backends import TransformersBackend, chat_texts
    from safemerge.evaluate.benchmarks import Benchmark, load_benchmark
    from safemerge.evaluate.runner import generate_all, variants_for

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = json.loads(args.adapters)
    items = load_benchmark("overrefusal").items[: args.prompts]
    bench = Benchmark("prompts", "benign", items)
    model = str(smollm2_dir())
    use = adapters[:1] if args.mode == "one" else adapters
    backend = TransformersBackend(model, use, max_new_tokens=args.new_tokens, dtype=args.dtype)

    def run(mode: str = args.mode) -> dict[tuple[str, str], list[object]]:
        use = adapters[:1] if mode == "one" else adapters
        backend.mixed_impl = "peft" if mode == "peft" else "stacked"
        if mode == "sequential":
            out: dict[tuple[str, str], list[object]] = {}
            for a in use:
                v = variants_for(model, [a], include_base=False)
                out.update(generate_all(backend, model, v, [bench], None, args.batch_size, args.new_tokens))
            return out
        v = variants_for(model, use, include_base=False)
        rows = args.rows or None
        return dict(generate_all(backend, model, v, [bench], None, args.batch_size, args.new_tokens, rows))

    backend.generate_full([items[0].prompt], use[0], 2)  # warm-up
    if args.mode == "interleaved":  # one process, the modes in turn each round: the same load for all
        best: dict[str, float] = {}
        got: dict[str, Any] = {}
        for _ in range(args.repeat):
            for mode in MODES:
                t0 = time.perf_counter()
                got[mode] = run(mode)
                best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t0)
        same = {
            mode: sum(
                a.text == b.text
                for key in got[mode]
                for a, b in zip(got[mode][key], got["sequential"][key], strict=True)
            )
            for mode in ("batched", "peft")
        }
        texts = chat_texts(backend.tokenizer, [it.prompt for it in items])
        flops = batched_flops(backend.model, backend.tokenizer, texts, len(adapters), args.new_tokens)
        cfg = backend.model.config
        rate = gemm_rate(getattr(torch, backend.dtype), 64 * 32, cfg.hidden_size, cfg.intermediate_size)
        print(
            json.dumps(
                {
                    "seconds": best,
                    "dtype": backend.dtype,
                    "same": same,
                    "n": len(adapters) * len(items),
                    "floor_s": flops / rate,
                    "gemm_gflops": rate / 1e9,
                }
            )
        )
        return
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        answers = run()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    texts = {f"{k[0]}|{k[1]}": [getattr(g, "text", g) for g in gs] for k, gs in answers.items()}
    print(json.dumps({"seconds": min(times), "peak_gib": peak, "dtype": backend.dtype, "answers": texts}))


def child_command(args: argparse.Namespace, mode: str, adapters: list[str]) -> list[str]:
    cmd = [sys.executable, __file__, "--mode", mode, "--adapters", json.dumps(adapters)]
    for flag in ("k", "prompts", "new_tokens", "batch_size", "rows", "dtype", "threads", "repeat"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return cmd


def interleaved(args: argparse.Namespace, adapters: list[str]) -> None:
    """The four modes in one process, in turn each round (best of `repeat`): on a shared machine the
    load then falls on all four alike. Memory is not measured here."""
    done = subprocess.run(
        child_command(args, "interleaved", adapters), check=True, capture_output=True, text=True
    )
    res = json.loads(done.stdout.strip().splitlines()[-1])
    sec, k = res["seconds"], args.k
    one, bat, peft, seq = sec["one"], sec["batched"], sec["peft"], sec["sequential"]
    same = res["same"]
    print(
        f"interleaved, k={k}, {args.prompts} prompts, {args.new_tokens} new tokens, batch size "
        f"{args.batch_size}, {res['dtype']}: one {one:.2f} s, batched {bat:.2f} s, PEFT's mixed batch "
        f"{peft:.2f} s, sequential {seq:.2f} s; batched/one {bat / one:.2f} (target <= {0.35 * k:.2f}), "
        f"peft/one {peft / one:.2f}, sequential/one {seq / one:.2f}; answers = sequential: batched "
        f"{same['batched']}, peft {same['peft']} of {res['n']}; compute floor of batched "
        f"{res['floor_s']:.2f} s at {res['gemm_gflops']:.0f} GFLOP/s, floor/one {res['floor_s'] / one:.2f}"
    )


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rows", type=int, default=0, help="rows per mixed batch (0: the harness's default)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--interleaved", action="store_true", help="all modes in one process, in turn")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(smollm2_dir(), Path(tmp), args.k)
        if args.interleaved:
            interleaved(args, adapters)
            return
        res = {}
        for mode in MODES:
            cmd = child_command(args, mode, adapters)
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{mode:10s} {res[mode]['seconds']:7.2f} s   peak RSS {res[mode]['peak_gib']:.2f} GiB")
    one, k = res["one"]["seconds"], args.k
    n = sum(len(v) for v in res["batched"]["answers"].values())
    differ = {
        mode: sum(
            a != b
            for key, rows in res[mode]["answers"].items()
            for a, b in zip(rows, res["sequential"]["answers"][key], strict=True)
        )
        for mode in ("batched", "peft")
    }
    print(
        f"k={k}, {args.prompts} prompts, {args.new_tokens} new tokens, batch size {args.batch_size}, "
        f"{res['one']['dtype']}: batched/one {res['batched']['seconds'] / one:.2f} "
        f"(target <= {0.35 * k:.2f}), peft/one {res['peft']['seconds'] / one:.2f}, "
        f"sequential/one {res['sequential']['seconds'] / one:.2f}; answers differing from sequential: "
        f"batched {differ['batched']}, peft {differ['peft']} of {n}"
    )


if __name__ == "__main__":
    main()
