"""Full-fine-tune scan benchmark: `scan(task_model=...)` against the floor of reading its tensors, peak RSS.

In one run, on synthetic 7B-shaped checkpoints (hidden 4096, MLP 11008, all seven projections per layer,
bf16, one shard per layer; `--layers` of them, generated once under the data directory):

- floor: read exactly the tensors the scan reads — each module's weight from the aligned, unaligned and
  task checkpoints, through the engine's `Checkpoint.get` — convert them to float32 and form V and ΔW
  once (safetensors maps files lazily, so the conversion is what reads the bytes), nothing else;
- `scan()` of the full fine-tune through the engine's Python API (ρ per module, docs/method.md §3.7);
- both at 1 layer and at `--layers` layers (the 1-layer set is an index over the first shard), each in a
  fresh child process, alternating floor and scan `--repeats` times so the page cache favours neither;
  wall time (min, median) and the child's peak RSS (VmHWM, reset at exec);
- accuracy: ρ of layer 0's q_proj and down_proj (one per route) from the scan against a float64
  computation of the formula written here.

    python benchmarks/bench_fullft.py --layers 2 --json /tmp/safemerge-bench/fullft.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

HIDDEN, MLP = 4096, 11008  # Llama-2-7B


def shapes(hidden: int, mlp: int) -> dict[str, tuple[int, int]]:
    """Stored (d_out, d_in) of the seven nn.Linear projections of a Llama layer (MHA: k/v full width)."""
    attn = {f"self_attn.{p}_proj": (hidden, hidden) for p in "qkvo"}
    return attn | {
        "mlp.gate_proj": (mlp, hidden),
        "mlp.up_proj": (mlp, hidden),
        "mlp.down_proj": (hidden, mlp),
    }


MODULES = tuple(shapes(1, 1))
GiB = 1 << 30
TARGET_RSS_GIB = 2.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ------------------------------------------------------------------------------------------
def generate(root: Path, layers: int, hidden: int = HIDDEN, mlp: int = MLP, seed: int = 0) -> None:
    """unaligned, aligned = unaligned + V, task = aligned + ΔW, each layer in its own bf16 shard.

    V = 0.1 σ·N; ΔW = 0.05 σ·N + a·V with a per module in [0, 0.2], so ρ spans a range. One tensor of each
    checkpoint in memory at a time (float32 while generated)."""
    done = {"layers": layers, "hidden": hidden, "mlp": mlp, "seed": seed}
    if (root / "done.json").exists() and json.loads((root / "done.json").read_text()) == done:
        return
    for name in ("unaligned", "aligned", "task"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for layer in range(layers):
        shards: dict[str, dict[str, torch.Tensor]] = {"unaligned": {}, "aligned": {}, "task": {}}
        for j, (mod, shape) in enumerate(shapes(hidden, mlp).items()):
            gen = torch.Generator().manual_seed(seed * 1000 + layer * 10 + j)
            key = f"model.layers.{layer}.{mod}.weight"
            w = 0.02 * torch.randn(shape, generator=gen)
            v = 0.002 * torch.randn(shape, generator=gen)
            shards["unaligned"][key] = w.to(torch.bfloat16)
            w += v
            shards["aligned"][key] = w.to(torch.bfloat16)
            w += 0.001 * torch.randn(shape, generator=gen) + (0.2 * j / len(MODULES)) * v
            shards["task"][key] = w.to(torch.bfloat16)
            del w, v
        for name, tensors in shards.items():
            save_file(tensors, str(root / name / shard_name(layer, layers)), metadata={"format": "pt"})
        log(f"generated layer {layer + 1}/{layers}")
    for name in ("unaligned", "aligned", "task"):
        write_index(root / name, layers, layers)
        (root / name / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n")
    (root / "done.json").write_text(json.dumps(done) + "\n")


def shard_name(layer: int, layers: int) -> str:
    return f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"


def write_index(directory: Path, use: int, layers: int) -> None:
    """An index over the first `use` layer shards of a `layers`-shard checkpoint."""
    weight_map = {f"model.layers.{i}.{m}.weight": shard_name(i, layers) for i in range(use) for m in MODULES}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def subset(root: Path, use: int, layers: int) -> Path:
    """A view of the first `use` layers: symlinked shards and a smaller index."""
    d = root / f"first{use}"
    for name in ("unaligned", "aligned", "task"):
        (d / name).mkdir(parents=True, exist_ok=True)
        for i in range(use):
            link = d / name / shard_name(i, layers)
            if not link.exists():
                link.symlink_to(root / name / shard_name(i, layers))
        write_index(d / name, use, layers)
        (d / name / "config.json").write_text(json.dumps({"model_type": "llama"}) + "\n")
    return d


# --- child processes -------------------------------------------------------------------------------
def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(kind: str, data: Path, device: str) -> dict[str, Any]:
    """Run one measurement in this (fresh) process: the read floor or the scan."""
    from safemerge.engine.checkpoint import Checkpoint
    from safemerge.engine.config import ScanConfig
    from safemerge.engine.pipeline import scan

    start = time.perf_counter()
    result: dict[str, Any] = {}
    if kind == "floor":
        al_c, un_c, ft_c = (Checkpoint(data / n) for n in ("aligned", "unaligned", "task"))
        total = 0
        for key in al_c.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
            # safetensors maps the file lazily: converting to float32 reads every byte
            al, un, ft = (c.get(key).to(torch.float32) for c in (al_c, un_c, ft_c))
            v, d = al - un, ft - al  # the inputs of ρ, formed once
            total += 3 * al.numel() * 2
            del al, un, ft, v, d
        result["bytes_read"] = total
    else:
        cfg = ScanConfig.from_flat(
            aligned=str(data / "aligned"), unaligned=str(data / "unaligned"), task_model=str(data / "task"),
            device=device, plot=False,
        )  # fmt: skip
        report = scan(cfg)
        result["rho"] = {m.name: m.rho for m in report.modules}
        result["routes"] = {m.name: m.route for m in report.modules}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = peak_rss()
    return result


def run_child(kind: str, data: Path, device: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(data), "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- accuracy --------------------------------------------------------------------------------------
def rho_float64(data: Path, key: str) -> float:
    """ρ = ‖VᵀΔW‖² / (‖VVᵀΔW‖ ‖ΔW‖) in float64 (C's constant 1/‖V‖_F cancels), the cheaper association."""
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        index = json.loads((data / name / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(str(data / name / index[key]), framework="pt") as fh:
            return fh.get_tensor(key).to(torch.float64)

    al = read("aligned")
    v = al - read("unaligned")
    d = read("task") - al
    del al
    if d.shape[1] <= d.shape[0]:
        p = v.T @ d
        num, cd = float((p * p).sum()), v @ p
    else:
        k = v @ v.T
        cd = k @ d
        num = float((cd * d).sum())
    return num / (float(torch.linalg.vector_norm(cd)) * float(torch.linalg.vector_norm(d)))


# --- main ------------------------------------------------------------------------------------------
def measure(data: Path, repeats: int, device: str) -> dict[str, Any]:
    floors, scans = [], []
    for _ in range(repeats):
        floors.append(run_child("floor", data, device))
        scans.append(run_child("scan", data, device))
    f = [r["seconds"] for r in floors]
    s = [r["seconds"] for r in scans]
    return {
        "floor_s": {"min": min(f), "median": statistics.median(f)},
        "scan_s": {"min": min(s), "median": statistics.median(s)},
        "ratio_min": min(s) / min(f),
        "bytes_read": floors[0]["bytes_read"],
        "peak_rss_floor_gib": max(r["peak_rss"] for r in floors) / GiB,
        "peak_rss_scan_gib": max(r["peak_rss"] for r in scans) / GiB,
        "modules": len(scans[0]["rho"]),
        "rho": scans[0]["rho"],
        "routes": scans[0]["routes"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="smaller for a smoke run")
    ap.add_argument("--mlp", type=int, default=MLP)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=None, help="where the synthetic set is (made if missing)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", choices=("floor", "scan"), default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.device)))
        return
    bench_dir = Path(os.environ.get("SAFEMERGE_BENCH_DIR", tempfile.gettempdir()))
    root = args.data or bench_dir / "safemerge-fullft"
    generate(root, args.layers, args.hidden, args.mlp)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "device": args.device,
        "shape": {"hidden": args.hidden, "mlp": args.mlp, "layers": args.layers},
        "load_average_start": os.getloadavg(),
        "by_layers": {},
    }
    for use in sorted({1, args.layers}):
        data = subset(root, use, args.layers)
        log(f"measuring {use} layer(s) ...")
        res = measure(data, args.repeats, args.device)
        results["by_layers"][use] = res
        log(
            f"{use} layer(s), {res['modules']} modules, {res['bytes_read'] / GiB:.2f} GiB read: scan "
            f"{res['scan_s']['min']:.1f} s (median {res['scan_s']['median']:.1f}) vs floor "
            f"{res['floor_s']['min']:.2f} s (median {res['floor_s']['median']:.2f}) "
            f"= x{res['ratio_min']:.1f}; "
            f"per layer {res['scan_s']['min'] / use:.1f} s; peak RSS scan {res['peak_rss_scan_gib']:.2f} GiB "
            f"(floor {res['peak_rss_floor_gib']:.2f}; target <= {TARGET_RSS_GIB})"
        )
    rhos = results["by_layers"][args.layers]["rho"]
    acc = {}
    for mod in ("self_attn.q_proj", "mlp.down_proj"):
        name = f"model.layers.0.{mod}"
        ref = rho_float64(root, name + ".weight")
        acc[name] = {"engine": rhos[name], "float64": ref, "abs_diff": abs(rhos[name] - ref)}
        log(f"{name}: rho {rhos[name]:.10f}, float64 {ref:.10f}, |diff| {acc[name]['abs_diff']:.2e}")
    results["accuracy"] = acc
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
