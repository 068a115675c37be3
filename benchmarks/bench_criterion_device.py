"""Per-module ρ on one device: the low-rank criterion vs the dense formulation (C formed explicitly).

    python benchmarks/bench_criterion_device.py --device cuda     # on a GPU machine
    python benchmarks/bench_criterion_device.py --device cpu --shapes 4096x4096

Prints, per shape: time of `lowrank_similarity` (V already on the device), time of the dense reference
formula in float32 and float64 (C = V Vᵀ/‖V‖_F formed), their ratio, and |Δρ| against dense float64.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from safemerge.engine.criterion import lowrank_similarity


def dense_rho(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> float:
    """docs/method.md §3 with C and ΔW formed explicitly, in `dtype`, on v's device."""
    v = v.to(dtype)
    dw = b.to(dtype) @ a.to(dtype)
    c = (v @ v.T) / torch.linalg.vector_norm(v)
    cdw = c @ dw
    den = torch.linalg.vector_norm(cdw) * torch.linalg.vector_norm(dw)
    return float((cdw * dw).sum() / den)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time in ms (synchronising the device), after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def measure(
    shape: str, rank: int, device: torch.device, repeats: int, gen: torch.Generator
) -> dict[str, object]:
    """Time both formulations on one random module of `shape` (d_out x d_in)."""
    d_out, d_in = (int(x) for x in shape.split("x"))
    v = torch.randn(d_out, d_in, generator=gen).to(device)
    a = torch.randn(rank, d_in, generator=gen).to(device)
    b = torch.randn(d_out, rank, generator=gen).to(device)
    t_low = timed(lambda: lowrank_similarity(v, a, b), device, repeats)
    t_f32 = timed(lambda: dense_rho(v, a, b, torch.float32), device, repeats)
    t_f64 = timed(lambda: dense_rho(v, a, b, torch.float64), device, repeats if device.type == "cuda" else 1)
    diff = abs(lowrank_similarity(v, a, b).rho - dense_rho(v, a, b, torch.float64))
    return {
        "shape": shape,
        "lowrank_ms": t_low,
        "dense_f32_ms": t_f32,
        "dense_f64_ms": t_f64,
        "ratio_f32": t_f32 / t_low,
        "ratio_f64": t_f64 / t_low,
        "abs_diff_rho": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shapes", default="4096x4096,1024x8192,8192x8192", help="d_out x d_in, comma-separated"
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"device: {name}; torch {torch.__version__}; r = {args.rank}")
    print(f"{'shape':>11} {'low-rank ms':>12} {'dense f32 ms':>13} {'dense f64 ms':>13} {'f32 ratio':>10} "
          f"{'f64 ratio':>10} {'|Δρ| vs f64':>12}")  # fmt: skip
    for shape in args.shapes.split(","):
        row = measure(shape, args.rank, device, args.repeats, gen)
        rows.append(row)
        print(
            f"{shape:>11} {row['lowrank_ms']:12.2f} {row['dense_f32_ms']:13.2f} {row['dense_f64_ms']:13.2f} "
            f"{row['ratio_f32']:10.1f} {row['ratio_f64']:10.1f} {row['abs_diff_rho']:12.2e}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
