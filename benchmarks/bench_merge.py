"""Merge-engine benchmark: scan + merge against the I/O floor, peak RSS, dense vs low-rank ρ.

In one run, for a synthetic preset (see `synthetic.py`, generated on first use):

- floor: read exactly the tensors scan reads (aligned and unaligned q/v weights, through the engine's
  `Checkpoint.get`), convert to float32 and compute V = W_al − W_un, nothing else;
- `merge()` (which runs the scan inside it) and `scan()` alone, through the engine's Python API, in the
  order floor, merge, scan, then scan, merge, floor, ... so the page cache favours none; min and median;
- peak RSS of merge() in a fresh child process (the kernel's VmHWM, reset at exec, unlike ru_maxrss which
  starts from the forking parent's RSS), plus polled peaks of anonymous and file-backed (mmap'd
  checkpoint pages, droppable page cache) memory;
- per module at d = 4096, r = 8: the dense formulation (C = V Vᵀ/‖V‖_F formed explicitly) in float32, as
  the reference code computes it, and in float64 (the engine's test oracle) against the engine's
  `criterion.lowrank_similarity`, with |Δρ|;
- linearity: time per module at two layer counts of the same shapes (the preset and an 8-layer variant).

    python benchmarks/bench_merge.py --preset llama2-7b --json /tmp/safemerge-bench/llama2-7b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from synthetic import PRESETS, TensorSpec, _delta_factors, generate

GiB = 1 << 30
TARGET_RATIO = 1.5
TARGET_DENSE_SPEEDUP = 20.0
TARGET_RSS_GIB = 2.0


# --- data ------------------------------------------------------------------------------------------
def bench_root() -> Path:
    return Path(os.environ.get("SAFEMERGE_BENCH_DIR", Path(tempfile.gettempdir()) / "safemerge-bench"))


def ensure_data(preset: str, root: Path, layers: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Generate (or reuse) the synthetic set of a preset under `root`."""
    name = preset if layers is None else f"{preset}-{layers}l"
    d = root / name
    log(f"data: {d}")
    manifest = generate(preset, d, layers=layers, quiet=False)
    return d, manifest


def module_weight_names(data: Path) -> list[str]:
    """Checkpoint keys of the task adapter's modules, in adapter order (what scan reads)."""
    from safetensors import safe_open

    with safe_open(str(data / "task_adapter" / "adapter_model.safetensors"), framework="pt") as fh:
        keys = [k for k in fh.keys() if k.endswith(".lora_A.weight")]  # noqa: SIM118
    return [k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight" for k in keys]


def evict(data: Path) -> None:
    """Drop this benchmark's checkpoint files (only them) from the page cache."""
    gc.collect()
    for f in data.glob("*aligned/*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- measured passes -------------------------------------------------------------------------------
def floor_pass(data: Path, names: list[str]) -> float:
    """Read the aligned/unaligned weights scan reads, convert to float32, V = W_al − W_un; seconds."""
    from safemerge.engine.checkpoint import Checkpoint

    t0 = time.perf_counter()
    al = Checkpoint(data / "aligned", label="aligned")
    un = Checkpoint(data / "unaligned", label="unaligned")
    for n in names:
        v = al.get(n).to(torch.float32) - un.get(n).to(torch.float32)
        del v
    dt = time.perf_counter() - t0
    del al, un
    return dt


def merge_config(data: Path, out: Path) -> Any:
    from safemerge.engine.config import MergeConfig

    return MergeConfig.from_flat(aligned=str(data / "aligned"), unaligned=str(data / "unaligned"),
                       task_adapter=str(data / "task_adapter"), safety_adapter=str(data / "safety_adapter"),
                       out=str(out), force=True, plot=False)


def merge_pass(data: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """Wall time of `safemerge.engine.pipeline.merge` (scan inside), and the report's summary."""
    from safemerge.engine.pipeline import merge

    cfg = merge_config(data, out)
    t0 = time.perf_counter()
    report = merge(cfg)
    dt = time.perf_counter() - t0
    return dt, dict(report.summary)


def scan_pass(data: Path) -> float:
    """Wall time of `safemerge.engine.pipeline.scan` without an output directory."""
    from safemerge.engine.config import ScanConfig
    from safemerge.engine.pipeline import scan

    cfg = ScanConfig.from_flat(aligned=str(data / "aligned"), unaligned=str(data / "unaligned"),
                     task_adapter=str(data / "task_adapter"), plot=False)
    t0 = time.perf_counter()
    scan(cfg)
    return time.perf_counter() - t0


def timed_series(data: Path, names: list[str], out: Path, repeats: int, cold: bool) -> dict[str, Any]:
    """floor / merge / scan, alternating the order each repeat; cold evicts the files before each pass."""
    runs: dict[str, list[float]] = {"floor": [], "merge": [], "scan": []}
    loads: list[float] = []
    summary: dict[str, Any] = {}

    def run(kind: str) -> None:
        nonlocal summary
        if cold:
            evict(data)
        gc.collect()
        if kind == "floor":
            runs["floor"].append(floor_pass(data, names))
        elif kind == "merge":
            dt, summary = merge_pass(data, out)
            runs["merge"].append(dt)
        else:
            runs["scan"].append(scan_pass(data))
        loads.append(os.getloadavg()[0])
        log(f"  {kind:5s} {runs[kind][-1]:8.2f} s   (load {loads[-1]:.2f})")

    for i in range(repeats):
        order = ["floor", "merge", "scan"] if i % 2 == 0 else ["scan", "merge", "floor"]
        for kind in order:
            run(kind)
    res: dict[str, Any] = {"runs_s": runs, "summary": summary, "loadavg_1min": loads}
    for kind, vals in runs.items():
        res[f"{kind}_min_s"] = min(vals)
        res[f"{kind}_median_s"] = statistics.median(vals)
    res["ratio_min"] = res["merge_min_s"] / res["floor_min_s"]
    res["ratio_median"] = res["merge_median_s"] / res["floor_median_s"]
    res["scan_ratio_min"] = res["scan_min_s"] / res["floor_min_s"]
    return res


# --- peak RSS in a child process -------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmRSS / RssAnon / RssFile / VmHWM of this process, in KiB."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1])
    return out


def child_merge(data: Path, out: Path) -> dict[str, Any]:
    """Run in a fresh process: merge once, report peaks (bytes) and wall time."""
    t_start = time.perf_counter()
    import safemerge.engine.pipeline
    import safemerge.engine.report  # noqa: F401

    base = _status()
    peaks = {"RssAnon": base.get("RssAnon", 0), "RssFile": base.get("RssFile", 0)}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            s = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], s.get(k, 0))
            time.sleep(0.01)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    dt, summary = merge_pass(data, out)
    stop.set()
    th.join()
    end = _status()
    return {
        "wall_s_merge": dt, "wall_s_process": time.perf_counter() - t_start,
        "rss_after_imports": base["VmRSS"] * 1024, "anon_after_imports": base.get("RssAnon", 0) * 1024,
        # VmHWM is reset by exec; ru_maxrss is not (after fork it starts at the parent's RSS).
        "peak_rss": end["VmHWM"] * 1024,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_anon_polled": peaks["RssAnon"] * 1024, "peak_file_polled": peaks["RssFile"] * 1024,
        "summary": summary,
    }


def measure_rss(data: Path, out: Path) -> dict[str, Any]:
    """Peak RSS of merge() in a fresh subprocess (also checked against RUSAGE_CHILDREN)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-merge", str(data), "--child-out", str(out),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child merge failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["ru_maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return res


# --- dense vs low-rank per module ------------------------------------------------------------------
def dense_rho_f32(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """The reference code's formulation: C = V Vᵀ / ‖V‖_F and ΔW = s B A formed densely, in float32."""
    c = (v @ v.T) / torch.linalg.vector_norm(v)
    dw = scaling * (b @ a)
    cdw = c @ dw
    return float((cdw * dw).sum() / (torch.linalg.vector_norm(cdw) * torch.linalg.vector_norm(dw)))


def best_of(fn: Callable[[], Any], n: int) -> tuple[float, Any]:
    best, val = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        val = fn()
        best = min(best, time.perf_counter() - t0)
    return best, val


def dense_vs_lowrank(d: int = 4096, r: int = 8, seed: int = 0, dense_repeats: int = 2) -> dict[str, Any]:
    """Per-module ρ timings at d_out = d_in = d, rank r, V in memory (float32)."""
    from safemerge.engine.criterion import dense_similarity, lowrank_similarity

    g = torch.Generator().manual_seed(seed)
    spec = TensorSpec("bench.q_proj.weight", (d, d), True)
    f = _delta_factors(spec, seed, 0.02)
    v = f.u @ f.wt + 0.0014 * torch.randn(d, d, generator=g)
    a = torch.randn(r, d, generator=g) / d**0.5
    b = torch.randn(d, r, generator=g) * 1e-3
    t_low, sim = best_of(lambda: lowrank_similarity(v, a, b), 7)
    t_d32, rho32 = best_of(lambda: dense_rho_f32(v, a, b, 2.0), dense_repeats)
    t_d64, rho64 = best_of(lambda: dense_similarity(v, 2.0 * (b.double() @ a.double())), 1)
    return {
        "d": d, "r": r, "threads": torch.get_num_threads(),
        "lowrank_s": t_low, "dense_f32_s": t_d32, "dense_f64_s": t_d64,
        "speedup_vs_dense_f32": t_d32 / t_low, "speedup_vs_dense_f64": t_d64 / t_low,
        "rho_lowrank": sim.rho, "rho_dense_f32": rho32, "rho_dense_f64": rho64,
        "abs_diff_vs_f64": abs(sim.rho - rho64), "abs_diff_f32_vs_f64": abs(rho32 - rho64),
    }


# --- report ----------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info(root: Path) -> dict[str, Any]:
    import psutil

    vm = psutil.virtual_memory()
    return {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_total": vm.total,
        "ram_available": vm.available, "loadavg": os.getloadavg(), "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
        "disk_free": shutil.disk_usage(root).free,
    }


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def print_table(res: dict[str, Any]) -> None:
    m, t = res["machine"], res["timing"]
    rows: list[tuple[str, str]] = [
        ("machine", f"{m['cpus']} CPUs, torch threads {m['torch_threads']}, RAM {gib(m['ram_total'])} "
                    f"(available {gib(m['ram_available'])}), load {m['loadavg'][0]:.2f}"),
        ("preset", f"{res['preset']}: {res['data']['modules']} modules, q {res['data']['q_shape']}, "
                   f"v {res['data']['v_shape']}"),
        ("bytes read (al+un, bf16)", f"{gib(res['bytes_read'])}; fits page cache: {res['fits_page_cache']}"),
        ("cache", "cold (files evicted before each pass)" if res["cold"] else "warm (page cache)"),
        ("floor min / median", f"{t['floor_min_s']:.2f} s / {t['floor_median_s']:.2f} s "
                               f"({res['bytes_read'] / t['floor_min_s'] / 1e9:.2f} GB/s)"),
        ("scan+merge min / median", f"{t['merge_min_s']:.2f} s / {t['merge_median_s']:.2f} s"),
        ("scan alone min / median", f"{t['scan_min_s']:.2f} s / {t['scan_median_s']:.2f} s"),
        ("(scan+merge)/floor", f"{t['ratio_min']:.2f} (min)  {t['ratio_median']:.2f} (median)  "
                               f"target <= {TARGET_RATIO}"),
        ("selected / modules", f"{t['summary'].get('selected')} / {t['summary'].get('modules')}"),
    ]
    for label, rss in res.get("rss", {}).items():
        rows.append((f"peak RSS merge [{label}]",
                     f"VmHWM {gib(rss['peak_rss'])}, anon {gib(rss['peak_anon_polled'])}, file-backed "
                     f"{gib(rss['peak_file_polled'])}, after imports {gib(rss['rss_after_imports'])}; "
                     f"process {rss['wall_s_process']:.1f} s"))
    lin = res.get("linearity")
    if lin:
        per = [f"{k}: {v['merge_min_s'] / v['modules'] * 1e3:.1f} ms "
               f"(floor {v['floor_min_s'] / v['modules'] * 1e3:.1f} ms)" for k, v in lin["points"].items()]
        rows.append(("scan+merge per module", "  ".join(per) + f"  ratio {lin['per_module_ratio']:.2f}"))
    dv = res.get("dense_vs_lowrank")
    if dv:
        rows += [
            (f"dense f32 vs low-rank (d={dv['d']}, r={dv['r']})",
             f"{dv['dense_f32_s'] * 1e3:.0f} ms vs {dv['lowrank_s'] * 1e3:.1f} ms = "
             f"{dv['speedup_vs_dense_f32']:.0f}x  (target >= {TARGET_DENSE_SPEEDUP:.0f}x)"),
            ("dense f64 vs low-rank",
             f"{dv['dense_f64_s'] * 1e3:.0f} ms = {dv['speedup_vs_dense_f64']:.0f}x"),
            ("|Δρ| low-rank vs dense f64", f"{dv['abs_diff_vs_f64']:.2e} (dense f32 vs f64: "
                                           f"{dv['abs_diff_f32_vs_f64']:.2e})"),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print()
    for k, ok in res["targets"].items():
        print(f"target {k}: {'MET' if ok else 'NOT MET'}")


def targets(res: dict[str, Any]) -> dict[str, bool]:
    out = {"scan+merge <= 1.5x floor": res["timing"]["ratio_min"] <= TARGET_RATIO}
    if "dense_vs_lowrank" in res:
        out[">= 20x faster than dense (f32)"] = (
            res["dense_vs_lowrank"]["speedup_vs_dense_f32"] >= TARGET_DENSE_SPEEDUP)
    if res.get("rss"):
        out["peak RSS (VmHWM) <= 2 GiB"] = all(
            r["peak_rss"] <= TARGET_RSS_GIB * GiB for r in res["rss"].values())
        out["peak anonymous memory <= 2 GiB"] = all(
            r["peak_anon_polled"] <= TARGET_RSS_GIB * GiB for r in res["rss"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--data-root", type=Path, default=None, help="default $SAFEMERGE_BENCH_DIR or /tmp/...")
    ap.add_argument("--repeats", type=int, default=2, help="timed floor/merge/scan rounds (order alternates)")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint files before each timed pass")
    ap.add_argument("--linearity-layers", type=int, default=8,
                    help="also time an N-layer variant of the same shapes (0: skip)")
    ap.add_argument("--no-rss", action="store_true", help="skip the child-process peak-RSS measurement")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense vs low-rank comparison")
    ap.add_argument("--dense-d", type=int, default=4096, help="d of the dense vs low-rank comparison")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every pass and the RSS child (default: torch's default)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--child-merge", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.child_merge is not None:
        print(json.dumps(child_merge(args.child_merge, args.child_out)))
        return 0

    root = args.data_root or bench_root()
    root.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"preset": args.preset, "cold": args.cold, "machine": machine_info(root)}
    data, manifest = ensure_data(args.preset, root, args.layers)
    res["data"] = manifest
    names = module_weight_names(data)
    res["bytes_read"] = 2 * manifest["target_bytes_per_model"]
    res["fits_page_cache"] = res["bytes_read"] < 0.8 * res["machine"]["ram_available"]
    with tempfile.TemporaryDirectory(dir=root, prefix="out-") as tmp:
        out = Path(tmp) / "merged"
        log("warm-up (imports, first read)")
        res["warmup_floor_s"] = floor_pass(data, names)
        res["warmup_merge_s"], _ = merge_pass(data, out)
        log(f"timed series ({'cold' if args.cold else 'warm'} cache)")
        res["timing"] = timed_series(data, names, out, args.repeats, args.cold)
        if args.linearity_layers and args.linearity_layers != manifest["num_hidden_layers"]:
            small, small_manifest = ensure_data(args.preset, root, args.linearity_layers)
            log(f"linearity: {args.linearity_layers}-layer variant")
            small_names = module_weight_names(small)
            floor_pass(small, small_names)  # warm
            t_small = timed_series(small, small_names, out, args.repeats, args.cold)
            points = {
                f"{small_manifest['num_hidden_layers']} layers": {
                    "modules": small_manifest["modules"], "merge_min_s": t_small["merge_min_s"],
                    "floor_min_s": t_small["floor_min_s"], "scan_min_s": t_small["scan_min_s"]},
                f"{manifest['num_hidden_layers']} layers": {
                    "modules": manifest["modules"], "merge_min_s": res["timing"]["merge_min_s"],
                    "floor_min_s": res["timing"]["floor_min_s"], "scan_min_s": res["timing"]["scan_min_s"]},
            }
            per = [p["merge_min_s"] / p["modules"] for p in points.values()]
            res["linearity"] = {"points": points, "per_module_ratio": per[1] / per[0]}
        if not args.no_rss:
            log("peak RSS (fresh child processes)")
            res["rss"] = {f"{manifest['num_hidden_layers']} layers": measure_rss(data, out)}
            if args.linearity_layers and args.linearity_layers != manifest["num_hidden_layers"]:
                res["rss"][f"{args.linearity_layers} layers"] = measure_rss(small, out)
    if not args.no_dense:
        log(f"dense vs low-rank at d={args.dense_d}, r=8")
        res["dense_vs_lowrank"] = dense_vs_lowrank(args.dense_d)
    res["targets"] = targets(res)
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        log(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
