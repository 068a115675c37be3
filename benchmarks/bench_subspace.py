"""Speed and size of safety-subspace sketches (docs/subspace.md, figures in docs/benchmarks.md).

1. ρ of a dense full-fine-tune update ΔW = W_task − W_al on 7B shapes (4096 × 4096 and 11008 × 4096,
   bf16 weights in memory): from a rank-K sketch (`sketch_similarity_dense`: ΔW formed in float32, then
   X = Uᵀ ΔW) against the exact route, side by side in one run. The exact route is the engine's
   `criterion.update_similarity` (V and ΔW in float32 row blocks, C ΔW = V (Vᵀ ΔW) or (V Vᵀ) ΔW,
   whichever is cheaper) when the engine has it, otherwise the same association written here as a
   float32 Gram computation (printed as `exact route: ...`). Best of `--repeats` runs each.
2. Building a sketch with `safemerge subspace`'s Python API for a 7B-shaped q/v pair (two 4096² bf16
   modules per layer, `--layers` layers, from benchmarks/synthetic.py): wall time, size on disk, and the
   size against those tensors in the two models; peak RSS of the process (VmHWM).

    python benchmarks/bench_subspace.py --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from safemerge.engine.subspace import SubspaceConfig, sketch_matrix, sketch_similarity_dense, subspace

BENCH = Path(__file__).resolve().parent


def best_of(fn: Callable[[], Any], n: int) -> tuple[float, Any]:
    best, val = math.inf, None
    for _ in range(n):
        t0 = time.perf_counter()
        val = fn()
        best = min(best, time.perf_counter() - t0)
    return best, val


def gram_route(w_al: torch.Tensor, w_un: torch.Tensor, w_ft: torch.Tensor) -> float:
    """Exact ρ of ΔW = W_ft − W_al against V = W_al − W_un in float32 (float64 sums), cheaper association."""
    v = w_al.float() - w_un.float()
    d = w_ft.float() - w_al.float()
    if v.shape[1] <= v.shape[0]:  # input side: P = Vᵀ ΔW (d_in²), then V P
        p = v.T @ d
        num = float(torch.linalg.vector_norm(p, dtype=torch.float64)) ** 2
        cdw2 = float(torch.linalg.vector_norm(v @ p, dtype=torch.float64)) ** 2
    else:  # output side: K = V Vᵀ (d_out²), then K ΔW
        m = (v @ v.T) @ d
        num = float((m.double() * d.double()).sum())
        cdw2 = float(torch.linalg.vector_norm(m, dtype=torch.float64)) ** 2
    dw2 = float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
    return num / math.sqrt(cdw2 * dw2)


def exact_route() -> tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]]:
    """The engine's full-fine-tune route when present, else `gram_route`."""
    try:
        from safemerge.engine.criterion import update_similarity  # type: ignore[attr-defined]
    except ImportError:
        return "float32 Gram computation in this benchmark", gram_route
    return "engine criterion.update_similarity", lambda a, u, f: update_similarity(a, u, f)[0].rho


def full_finetune_module(d_out: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 W_un, W_al, W_ft: V has a decaying spectrum (a rank-64 part with σ_j ∝ j^−0.5 holding ~90 % of
    ‖V‖², plus a noise floor), ΔW is a dense update that leans on V's leading directions."""
    g = torch.Generator().manual_seed(seed)
    w_un = torch.randn(d_out, d_in, generator=g) * 0.02
    left, right = torch.randn(d_out, 64, generator=g), torch.randn(64, d_in, generator=g)
    sigma = torch.arange(1, 65, dtype=torch.float32) ** -0.5
    v = (left * sigma) @ right * (2e-3 / math.sqrt(d_in)) + torch.randn(d_out, d_in, generator=g) * 2e-5
    delta = left[:, :8] @ torch.randn(8, d_in, generator=g) * (1e-3 / math.sqrt(d_in))
    delta += torch.randn(d_out, d_in, generator=g) * 1e-4
    w_al = w_un + v
    return w_un.bfloat16(), w_al.bfloat16(), (w_al + delta).bfloat16()


def bench_rho(shapes: list[tuple[int, int]], rank: int, repeats: int, seed: int) -> None:
    name, exact = exact_route()
    print(f"\n1. ρ of a dense full-fine-tune ΔW: rank-{rank} sketch vs exact route ({name})")
    print("| module | exact route | sketch route | speed-up | ρ exact | ρ sketch | sketch build (once) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for d_out, d_in in shapes:
        w_un, w_al, w_ft = full_finetune_module(d_out, d_in, seed)
        t_build, sk = best_of(lambda: sketch_matrix(w_al.float() - w_un.float(), rank, seed), 1)  # noqa: B023
        t_exact, rho = best_of(lambda: exact(w_al, w_un, w_ft), repeats)  # noqa: B023

        def via_sketch() -> float:
            delta = w_ft.float() - w_al.float()  # noqa: B023
            return sketch_similarity_dense(sk.u, sk.s, delta).rho  # noqa: B023

        t_sketch, rho_sk = best_of(via_sketch, max(repeats, 3))
        print(
            f"| {d_out} × {d_in} | {t_exact:.2f} s | {t_sketch:.3f} s | {t_exact / t_sketch:.1f}× | "
            f"{rho:.5f} | {rho_sk:.5f} | {t_build:.1f} s ({sk.method}, energy {sk.energy:.4f}) |"
        )


def load_synthetic() -> Any:
    spec = importlib.util.spec_from_file_location("synthetic", BENCH / "synthetic.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synthetic"] = mod
    spec.loader.exec_module(mod)
    return mod


def bench_build(root: Path, preset: str, layers: int, ranks: list[int], seed: int, u_dtype: str) -> None:
    data = root / f"{preset}-{layers}l"
    load_synthetic().generate(preset, data, seed=seed, layers=layers, quiet=True)
    what = f"q_proj and v_proj (bf16) of {layers} layers, U in {u_dtype}"
    print(f"\n2. building a sketch: {preset} shapes, {what}")
    print("| K | modules | time | per module | on disk | vs those tensors in the two models |")
    print("|---|---:|---:|---:|---:|---:|")
    for k in ranks:
        out = root / f"sketch-{layers}l-k{k}"
        cfg = SubspaceConfig(
            aligned=str(data / "aligned"),
            unaligned=str(data / "unaligned"),
            rank=k,
            out=str(out),
            force=True,
            u_dtype=u_dtype,
        )
        res = subspace(cfg)
        print(
            f"| {k} | {res.modules} | {res.seconds:.1f} s | {res.seconds / res.modules:.2f} s | "
            f"{res.bytes_on_disk / 1e6:.1f} MB | {100 * res.bytes_on_disk / res.model_bytes:.2f} % of "
            f"{res.model_bytes / 1e9:.2f} GB |"
        )
        shutil.rmtree(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rank", type=int, default=256, help="K of the sketch in part 1")
    ap.add_argument("--repeats", type=int, default=2, help="runs of the exact route (best of)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the 7B-shaped q/v pair in part 2")
    ap.add_argument("--build-ranks", default="64,256", help="K values of part 2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--skip-rho", action="store_true")
    ap.add_argument(
        "--u-dtype", default="float32", choices=["float32", "float16"], help="storage of U in part 2"
    )
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "safemerge-bench")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    shapes = [(512, 512), (1376, 512)] if args.quick else [(4096, 4096), (11008, 4096)]
    if not args.skip_rho:
        bench_rho(shapes, min(args.rank, 64) if args.quick else args.rank, args.repeats, args.seed)
    if not args.skip_build:
        ranks = [int(k) for k in args.build_ranks.split(",")]
        bench_build(
            args.root, "tiny" if args.quick else "llama2-7b", args.layers, ranks, args.seed, args.u_dtype
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux → GB
    total = time.perf_counter() - t0
    print(f"\ntorch threads {torch.get_num_threads()}, peak RSS {peak:.2f} GB, total {total:.0f} s")


if __name__ == "__main__":
    main()
