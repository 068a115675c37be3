"""Full-fine-tune exact scan against the machine's own matrix-product rate, side by side in one process.

On synthetic 7B-shaped checkpoints (bench_fullft.py's set: hidden 4096, MLP 11008, the seven projections
of `--layers` Llama layers, bf16, written once under the data directory with safetensors), for each
thread count in `--threads`, in a fresh child process:

1. **GEMM**: the scan's products on float32 matrices of the same shapes, already in memory: per module,
   with X, Y the module's rows × cols views (rows the larger side: the route's orientation,
   docs/engine.md), A = Xᵀ Y then X A — the same two products, shapes and flop count as the scan's.
   Also a plain 4096² float32 product for reference.
2. **scan**: `safemerge.engine.scan` of the full fine-tune (reading the bf16 checkpoints, V and ΔW in
   float32 blocks, the two products, the float64 sums, the report).
3. Both `--repeats` times, alternating; the best of each. Ratio = scan GFLOP/s ÷ GEMM GFLOP/s; also
   against the faster of the GEMM and the 4096² product (the whole-module products, with an inner
   dimension up to 11008, can run slower than the scan's 1,024-row blocks).
4. One more scan under torch.profiler and a dispatch-mode counter: the flops are counted from the
   products the code actually runs (mm / addmm, 2·m·k·n each), and the time is split by the top-level
   operator: products (mm, addmm), read/convert (the copy and subtraction forming a float32 block of V
   or ΔW from the memory-mapped bf16 weights: file pages are read there), float64 sums (the chunked
   conversions and dots of the sums of squares), the rest (wall time minus those: Python, file opening,
   checks, the report).
5. Peak RSS of the scan (VmHWM, reset after the GEMM phase through /proc/self/clear_refs).

    nice -n 5 python benchmarks/bench_fullft_rate.py --threads 1 2 --json /tmp/safemerge-bench/rate.json
    python benchmarks/bench_fullft_rate.py --quick            # hidden 1024, MLP 2752: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_fullft import HIDDEN, MLP, generate, log, peak_rss, shapes  # (this script's directory)
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 1 << 30
TARGET = 0.6
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::matmul"}
CONVERT = {"aten::copy_", "aten::sub_"}
FLOAT64_SUMS = {
    "aten::to",
    "aten::_to_copy",
    "aten::dot",
    "aten::reshape",
    "aten::view",
    "aten::linalg_vector_norm",
    "aten::mul",
    "aten::sum",
}


class ProductFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every matrix product (mm, addmm, in place or not) that runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name == "mm":
            self.flops += 2 * args[0].shape[0] * args[0].shape[1] * args[1].shape[1]
        elif name in ("addmm", "addmm_"):
            self.flops += 2 * args[1].shape[0] * args[1].shape[1] * args[2].shape[1]
        return func(*args, **(kwargs or {}))


def formula_flops(hidden: int, mlp: int) -> int:
    """4 · rows · cols² per module (two products of 2 · rows · cols², docs/engine.md), per layer."""
    return sum(4 * max(s) * min(s) ** 2 for s in shapes(hidden, mlp).values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- the two measurements --------------------------------------------------------------------------
def gemm_operands(hidden: int, mlp: int, layers: int, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
    """Float32 X, Y per module shape (rows × cols, rows the larger side), one pair reused per layer."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for d_out, d_in in shapes(hidden, mlp).values():
        rows, cols = max(d_out, d_in), min(d_out, d_in)
        x, y = (0.01 * torch.randn(rows, cols, generator=gen) for _ in range(2))
        out.append((x.to(device), y.to(device)))
    return out * layers


def run_gemm(operands: list[tuple[torch.Tensor, ...]], device: torch.device) -> float:
    """Seconds for A = Xᵀ Y, then X A, per module: the scan's products without the scan."""
    sync(device)
    start = time.perf_counter()
    for x, y in operands:
        a = x.T @ y
        b = x @ a
        del a, b
    sync(device)
    return time.perf_counter() - start


def square_gemm_rate(device: torch.device, n: int = 4096) -> float:
    """GFLOP/s of one n × n float32 product (best of 3), the figure the docs quote for the machine."""
    x, y = (torch.randn(n, n, device=device) for _ in range(2))
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        x @ y
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def scan_config(data: Path, device: str) -> Any:
    from safemerge.engine.config import ScanConfig

    return ScanConfig.from_flat(
        aligned=str(data / "aligned"), unaligned=str(data / "unaligned"), task_model=str(data / "task"),
        device=device, plot=False,
    )  # fmt: skip


def run_scan(data: Path, device: str) -> tuple[float, dict[str, float]]:
    from safemerge.engine.pipeline import scan

    start = time.perf_counter()
    report = scan(scan_config(data, device))
    sync(torch.device(device))
    return time.perf_counter() - start, {m.name: m.rho for m in report.modules}


def top_level(event: Any) -> Any:
    while event.cpu_parent is not None:
        event = event.cpu_parent
    return event


def profiled_scan(data: Path, device: str) -> dict[str, Any]:
    """One scan with its products' flops counted and its wall time split by top-level operator (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from safemerge.engine.pipeline import scan

    counter = ProductFlops()
    with profile(activities=[ProfilerActivity.CPU]) as prof, counter:
        start = time.perf_counter()
        scan(scan_config(data, device))
        sync(torch.device(device))
        wall = time.perf_counter() - start
    split = {"products": 0.0, "read_convert": 0.0, "float64_sums": 0.0}
    seen = set()
    for ev in prof.events():
        root = top_level(ev)
        if id(root) in seen:
            continue
        seen.add(id(root))
        seconds = root.cpu_time_total / 1e6
        if root.name in PRODUCTS:
            split["products"] += seconds
        elif root.name in CONVERT:
            split["read_convert"] += seconds
        elif root.name in FLOAT64_SUMS:
            split["float64_sums"] += seconds
    split["rest"] = wall - sum(split.values())
    return {"flops": counter.flops, "wall_s": wall, "split_s": split}


def reset_peak_rss() -> None:
    """VmHWM := current RSS (Linux: writing 5 to clear_refs), so the scan's peak excludes the GEMM's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        log(f"cannot reset the peak RSS ({exc}): it includes the GEMM phase")


def child(data: Path, threads: int, device: str, repeats: int, hidden: int, mlp: int, layers: int) -> dict:
    """The side-by-side measurement at one thread count, in this (fresh) process."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    operands = gemm_operands(hidden, mlp, layers, dev)
    run_gemm(operands[:1], dev)  # warm the BLAS up
    gemm_s, scan_s, rhos = [], [], {}
    for _ in range(repeats):
        gemm_s.append(run_gemm(operands, dev))
        scan_s.append(run_scan(data, device)[0])
    square = square_gemm_rate(dev)
    del operands
    gc.collect()
    reset_peak_rss()
    best_scan, rhos = run_scan(data, device)
    scan_s.append(best_scan)
    rss = peak_rss()
    prof = profiled_scan(data, device) if dev.type == "cpu" else {"flops": None, "split_s": None}
    flops = formula_flops(hidden, mlp) * layers
    g, s = min(gemm_s), min(scan_s)
    return {
        "threads": threads,
        "flops_per_layer_formula": flops // layers,
        "flops_per_layer_counted": None if prof["flops"] is None else prof["flops"] // layers,
        "gemm_s": gemm_s,
        "scan_s": scan_s,
        "gemm_gflops": flops / g / 1e9,
        "scan_gflops": flops / s / 1e9,
        "ratio": g / s,
        "square_4096_gemm_gflops": square,
        "ratio_to_best_gemm": flops / s / 1e9 / max(flops / g / 1e9, square),
        "scan_peak_rss_gib": rss / GiB,
        "profiled": prof,
        "rho": rhos,
    }


def run_child(args: argparse.Namespace, data: Path, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", str(threads), "--data", str(data), "--device", args.device,
        "--repeats", str(args.repeats), "--hidden", str(args.hidden), "--mlp", str(args.mlp),
        "--layers", str(args.layers),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def describe(r: dict[str, Any], layers: int) -> str:
    lines = [
        f"threads {r['threads']}: flops per layer {r['flops_per_layer_formula']:.4g} "
        f"(counted from the products: {r['flops_per_layer_counted']})",
        f"  GEMM (same shapes, float32) {r['gemm_gflops']:.1f} GFLOP/s, best {min(r['gemm_s']):.2f} s; "
        f"scan {r['scan_gflops']:.1f} GFLOP/s, best {min(r['scan_s']):.2f} s "
        f"({min(r['scan_s']) / layers:.2f} s per layer)",
        f"  ratio scan / GEMM = {r['ratio']:.3f} (target >= {TARGET}); plain 4096^2 float32 product "
        f"{r['square_4096_gemm_gflops']:.1f} GFLOP/s; scan / the faster of the two "
        f"{r['ratio_to_best_gemm']:.3f}; scan peak RSS {r['scan_peak_rss_gib']:.2f} GiB",
    ]
    split = r["profiled"]["split_s"]
    if split:
        wall = r["profiled"]["wall_s"]
        parts = ", ".join(f"{k} {v:.2f} s ({100 * v / wall:.0f}%)" for k, v in split.items())
        lines.append(f"  profiled scan {wall:.2f} s: {parts}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--mlp", type=int, default=MLP)
    ap.add_argument("--quick", action="store_true", help="hidden 1024, MLP 2752 (a smoke run)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--data", type=Path, default=None, help="where the synthetic set is (made if missing)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.mlp = 1024, 2752
    if args.child is not None:
        res = child(args.data, args.child, args.device, args.repeats, args.hidden, args.mlp, args.layers)
        print(json.dumps(res))
        return
    bench_dir = Path(os.environ.get("SAFEMERGE_BENCH_DIR", tempfile.gettempdir()))
    root = args.data or bench_dir / f"safemerge-fullft-rate-{args.hidden}-{args.mlp}"
    generate(root, args.layers, args.hidden, args.mlp)
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
        },
        "device": args.device,
        "shape": {"hidden": args.hidden, "mlp": args.mlp, "layers": args.layers},
        "load_average_start": os.getloadavg(),
        "by_threads": {},
    }
    for threads in args.threads:
        log(f"measuring {threads} thread(s) ...")
        res = run_child(args, root, threads)
        results["by_threads"][threads] = res
        log(describe(res, args.layers))
    results["load_average_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
