"""Fidelity of safety-subspace sketches (docs/subspace.md): |ρ_sketch − ρ_exact| and changed decisions.

For K in {8, 32, 128, 256, full} it prints, per set of modules, the largest |ρ_sketch − ρ_exact|, how many
threshold decisions (round(ρ, 5) < τ, τ = 0.35; docs/method.md §3.2) change, and the share of ‖V‖²_F the
sketch keeps (median and lowest over modules).

(a) `organism`: the CPU model organism's real V (aligned − unaligned SmolLM2-135M, full fine-tune) with
    its task LoRA (q_proj and v_proj of 30 layers: 60 modules, one ρ each). Needs a built organism
    (`safemerge organism build`); pass its cache directory with --organism.
(b) `synthetic`: 7B-shaped V (4096 × 4096 twice, 11008 × 4096) with a decaying spectrum: 1024 directions
    with σ_j = j^(−α) (α = 0.5, 1.0, 0.75) over a Gaussian noise floor at about σ_1024, random singular
    vectors; per module `--updates` random rank-16 LoRA updates mixing a band of V's leading directions
    with noise so that ρ spreads over [0, 1]. K = full needs an exact float64 SVD per module (minutes
    each on a CPU) and is skipped unless `--synthetic-full`: a full-rank sketch is exact by construction,
    which (a) and tests/test_subspace.py measure.

The sketches are built by `engine/subspace.sketch_matrix` exactly as `safemerge subspace` builds them
(seed per module from `--seed`); ρ_exact is the float64 low-rank formula of docs/method.md §3.5 on the
full V, computed here. Everything is seeded: the same command prints the same table.

    python benchmarks/subspace_fidelity.py --organism /tmp/fresh-cache/organism \
        --task task-6b9456d2f3fa --threads 1
    python benchmarks/subspace_fidelity.py --quick          # a small synthetic set only (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.lora import LoraAdapter
from safemerge.engine.merging import module_seed
from safemerge.engine.subspace import U_DTYPES, sketch_matrix, sketch_similarity_lowrank

TAU = 0.35
KS: tuple[int | None, ...] = (8, 32, 128, 256, None)  # None: full rank, min(d_out, d_in)
LORA_RANK = 16
STRUCTURED = 1024  # singular directions of the synthetic V's decaying part (the rest is a noise floor)


@dataclass
class Case:
    """One module: its V, the LoRA updates (A, B) to score, and a label."""

    name: str
    v: torch.Tensor  # d_out × d_in, float32
    updates: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Row:
    """Per K: errors, decision changes and energies gathered over the modules of one set."""

    errors: list[float] = field(default_factory=list)
    changed: int = 0
    more_merged: int = 0  # changes where the sketch selects a module the exact ρ does not
    below: int = 0  # how often ρ_sketch < ρ_exact
    excess: float = 0.0  # the largest ρ_sketch − ρ_exact (a truncation never raises ρ: docs/subspace.md)
    total: int = 0
    energies: list[float] = field(default_factory=list)
    exact: list[float] = field(default_factory=list)

    @property
    def at_risk(self) -> int:
        """How many exact ρ lie within the largest measured error of τ (decisions a sketch may flip)."""
        return sum(abs(r - TAU) <= max(self.errors) for r in self.exact)


def exact_rhos(v: torch.Tensor, updates: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """ρ of each update against the full V, float64 (docs/method.md §3.5), all updates in one product."""
    v64 = v.to(torch.float64)
    b_all = torch.cat([b.to(torch.float64) for _, b in updates], dim=1)
    p_all = v64.T @ b_all  # d_in × (n·r)
    m_all = v64 @ p_all  # d_out × (n·r)
    out, col = [], 0
    for a, b in updates:
        r = b.shape[1]
        a64 = a.to(torch.float64)
        g = a64 @ a64.T
        p, m, b64 = p_all[:, col : col + r], m_all[:, col : col + r], b_all[:, col : col + r]
        num, cdw2, dw2 = (float(((x.T @ x) * g).sum()) for x in (p, m, b64))
        out.append(num / math.sqrt(cdw2 * dw2))
        col += r
    return out


def decide(rho: float) -> bool:
    return round(rho, 5) < TAU


def score(
    cases: list[Case], seed: int, ks: tuple[int | None, ...], u_dtype: str = "float32"
) -> dict[str, Row]:
    """Sketch every case at every K and compare ρ with the exact one."""
    rows = {label(k): Row() for k in ks}
    for case in cases:
        t0 = time.perf_counter()
        exact = exact_rhos(case.v, case.updates)
        n = min(case.v.shape)
        for k in ks:
            sk = sketch_matrix(case.v, k or n, module_seed(seed, case.name))
            u = sk.u.to(U_DTYPES[u_dtype]).to(torch.float32)  # as stored and read back
            row = rows[label(k)]
            row.energies.append(sk.energy)
            for (a, b), rho in zip(case.updates, exact, strict=True):
                got = sketch_similarity_lowrank(u, sk.s, a, b).rho
                row.errors.append(abs(got - rho))
                row.changed += decide(got) != decide(rho)
                row.more_merged += decide(got) and not decide(rho)
                row.below += got < rho
                row.excess = max(row.excess, got - rho)
                row.total += 1
        for k in ks:
            rows[label(k)].exact += exact
        spread = f"ρ {min(exact):.3f}..{max(exact):.3f}"
        print(
            f"  {case.name} {tuple(case.v.shape)}: {spread}, {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )
    return rows


def label(k: int | None) -> str:
    return "full" if k is None else str(k)


# --- (a) the organism --------------------------------------------------------------------------------
def organism_cases(root: Path, task_dir: str | None) -> list[Case]:
    """The organism's q/v modules with V = aligned − unaligned and the task LoRA's factors."""

    def one(prefix: str, name: str | None = None) -> Path:
        if name is not None:
            return root / name
        found = sorted(root.glob(f"{prefix}-*"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found)
            raise SystemExit(f"expected one {prefix}-* directory under {root}, found {names or 'none'}")
        return found[0]

    aligned, unaligned = Checkpoint(one("aligned")), Checkpoint(one("unaligned"))
    task = LoraAdapter.load(one("task", task_dir))
    cases = []
    for m in task.lora_modules:
        v = aligned.get_float(f"{m}.weight") - unaligned.get_float(f"{m}.weight")
        f = task.factors(m)
        cases.append(Case(m, v, [(f.A, f.B)]))
    return cases


# --- (b) synthetic 7B shapes -------------------------------------------------------------------------
def synthetic_case(name: str, d_out: int, d_in: int, alpha: float, n_updates: int, seed: int) -> Case:
    """V = Q1 diag(j^−α, j ≤ 1024) Q2ᵀ + a Gaussian noise floor whose largest singular value is about
    σ_1024 (random orthonormal Q1, Q2: a decaying spectrum, full rank), and rank-16 updates whose B mixes
    a band of 16 of V's leading 80 directions (weight t) with Gaussian noise (weight 1 − t)."""
    g = torch.Generator().manual_seed(seed)
    n = min(d_out, d_in, STRUCTURED)
    q1 = torch.linalg.qr(torch.randn(d_out, n, generator=g)).Q
    q2 = torch.linalg.qr(torch.randn(d_in, n, generator=g)).Q
    sigma = torch.arange(1, n + 1, dtype=torch.float32) ** -alpha
    v = (q1 * sigma) @ q2.T
    floor = float(sigma[-1]) / (math.sqrt(d_out) + math.sqrt(d_in))
    v += floor * torch.randn(d_out, d_in, generator=g)
    updates = []
    for i in range(n_updates):
        t = i / max(n_updates - 1, 1)
        start = int(torch.randint(0, 64, (1,), generator=g))
        band = (
            q1[:, start : start + LORA_RANK]
            @ torch.linalg.qr(torch.randn(LORA_RANK, LORA_RANK, generator=g)).Q
        )
        noise = torch.randn(d_out, LORA_RANK, generator=g) / math.sqrt(d_out)
        b = t * band + (1 - t) * noise
        a = torch.randn(LORA_RANK, d_in, generator=g) / math.sqrt(d_in)
        updates.append((a, b))
    del q1, q2
    return Case(name, v, updates)


SYNTHETIC = (  # (name, d_out, d_in, α)
    ("layers.0.self_attn.q_proj", 4096, 4096, 0.5),
    ("layers.0.self_attn.v_proj", 4096, 4096, 1.0),
    ("layers.0.mlp.up_proj", 11008, 4096, 0.75),
)
QUICK = (("q_proj", 512, 384, 0.5), ("v_proj", 384, 512, 1.0), ("up_proj", 1100, 384, 0.75))


# --- report --------------------------------------------------------------------------------------------
def print_table(title: str, rows: dict[str, Row]) -> None:
    print(f"\n{title}")
    head = "| K | max abs(ρ_sketch − ρ_exact) | median abs error | decisions changed at τ = 0.35 |"
    head += " of them sketch selects | ρ_sketch < ρ_exact | max ρ_sketch − ρ_exact |"
    print(head + " exact ρ within max error of τ | energy kept |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, row in rows.items():
        print(
            f"| {k} | {max(row.errors):.2e} | {statistics.median(row.errors):.2e} | "
            f"{row.changed} of {row.total} | {row.more_merged} | {row.below} | {row.excess:.1e} | "
            f"{row.at_risk} | "
            f"{statistics.median(row.energies):.4f} / {min(row.energies):.4f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", type=Path, help="organism cache dir (aligned-*, unaligned-*, task-*)")
    ap.add_argument(
        "--task", help="the task adapter's directory name under --organism (default: the only task-*)"
    )
    ap.add_argument("--updates", type=int, default=48, help="random LoRA updates per synthetic module")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="small synthetic shapes only (a smoke run)")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument(
        "--synthetic-full",
        action="store_true",
        help="also K = full on the 7B shapes: an exact float64 SVD per module (minutes each on a CPU)",
    )
    ap.add_argument("--u-dtype", choices=sorted(U_DTYPES), default="float32", help="storage of U")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Row]] = {}
    t0 = time.perf_counter()
    if args.organism and not args.quick:
        print("organism:", file=sys.stderr)
        results["organism"] = score(organism_cases(args.organism, args.task), args.seed, KS, args.u_dtype)
        print_table(
            "(a) organism: SmolLM2-135M aligned − unaligned, task LoRA r = 8 (q_proj, v_proj)",
            results["organism"],
        )
    if not args.skip_synthetic:
        print("synthetic:", file=sys.stderr)
        shapes = QUICK if args.quick else SYNTHETIC
        cases = [
            synthetic_case(n, do, di, al, args.updates, args.seed + i)
            for i, (n, do, di, al) in enumerate(shapes)
        ]
        ks = KS if args.synthetic_full or args.quick else KS[:-1]
        results["synthetic"] = score(cases, args.seed, ks, args.u_dtype)
        desc = ", ".join(f"{n.split('.')[-1]} {do}×{di} α={al}" for n, do, di, al in shapes)
        print_table(f"(b) synthetic: {desc}; {args.updates} rank-16 updates each", results["synthetic"])
    total = time.perf_counter() - t0
    threads = torch.get_num_threads()
    print(f"\nU stored as {args.u_dtype}; total {total:.0f} s, torch threads {threads}, seed {args.seed}")
    if args.json:
        data = {
            s: {k: {"max_error": max(r.errors), "median_error": statistics.median(r.errors),
                    "changed": r.changed, "more_merged": r.more_merged, "below": r.below, "excess": r.excess,
                    "total": r.total,
                    "energy_median": statistics.median(r.energies),
                    "energy_min": min(r.energies), "at_risk": r.at_risk} for k, r in rows.items()}
            for s, rows in results.items()
        }  # fmt: skip
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
