"""The SafeMERGE criterion (docs/method.md §3): how well a LoRA update lies in the safety subspace.

    V = W_al − W_un,   C = V Vᵀ / ‖V‖_F,   ρ = ⟨C ΔW, ΔW⟩_F / (‖C ΔW‖_F ‖ΔW‖_F)

C is never formed. With P = Vᵀ B (d_in × r), M = V P (d_out × r) and G = A Aᵀ (r × r):
⟨CΔW, ΔW⟩ ∝ tr(PᵀP G), ‖CΔW‖² ∝ tr(MᵀM G), ‖ΔW‖² ∝ tr(BᵀB G); the positive constants (1/‖V‖_F, the
LoRA scaling) cancel in ρ. Cost O(d_out·d_in·r) and one V in memory, instead of a dense d_out² matrix.
The two products with V run in float32 (they are bound by reading V); every trace and norm that decides
something is accumulated in float64. Pure tensor code: no files, no configuration.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

DECISION_DECIMALS = 5  # the reference code rounds ρ to 5 decimals before comparing with τ
ZERO_V = "zero-V"  # the degeneracy (and report flag) of a module the alignment never changed: V = 0
# A term of ρ below float32's smallest normal number is made of float32 products in the subnormal range
# (or 0), which keep few or no significant bits: such a module is recomputed in float64, whose range
# holds the same products exactly. Real weights never come near it; scaled-down ones must not change ρ.
FLOAT32_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class Similarity:
    """ρ of one module, and why it is degenerate when the formula is 0/0 (then ρ = 0, as the reference)."""

    rho: float
    degenerate: str | None = None  # "zero-V", "zero-update" or "orthogonal"

    @property
    def rho_rounded(self) -> float:
        return round(self.rho, DECISION_DECIMALS)


def safety_difference(w_aligned: torch.Tensor, w_unaligned: torch.Tensor) -> torch.Tensor:
    """V = W_al − W_un, both converted to float32 before subtracting (bf16 inputs lose nothing)."""
    if w_aligned.shape != w_unaligned.shape:
        raise ValueError(f"aligned {tuple(w_aligned.shape)} vs unaligned {tuple(w_unaligned.shape)}")
    v = w_aligned.to(torch.float32, copy=True)
    return v.sub_(w_unaligned)  # in place: one float32 buffer, the same V bit for bit


def _trace_product(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> float:
    """tr(xᵀ y g) for x, y of shape (n × r) and symmetric g (r × r), accumulated in float64."""
    return float(((x.T.to(torch.float64) @ y.to(torch.float64)) * g).sum())


def lowrank_similarity(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Similarity:
    """ρ of the update ΔW ∝ B A against V, without forming C or ΔW.

    v: d_out × d_in, a: r × d_in, b: d_out × r (any positive LoRA scaling may be left out).
    """
    if v.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
        raise ValueError(f"V {tuple(v.shape)} does not fit A {tuple(a.shape)}, B {tuple(b.shape)}")
    v32 = v.to(torch.float32)
    b32 = b.to(device=v.device, dtype=torch.float32)
    a64 = a.to(device=v.device, dtype=torch.float64)
    g = a64 @ a64.T  # r × r
    p = v32.T @ b32  # d_in × r  (Vᵀ B)
    m = v32 @ p  # d_out × r  (V Vᵀ B)
    num = _trace_product(p, p, g)  # ‖Vᵀ B A‖² ≥ 0
    cdw2 = _trace_product(m, m, g)  # ‖V Vᵀ B A‖²
    dw2 = _trace_product(b32, b32, g)  # ‖B A‖²
    if not all(math.isfinite(x) and x >= FLOAT32_TINY for x in (num, cdw2, dw2)):
        # Overflow or underflow in float32, a zero term, or non-finite input: redo it all in float64.
        return _lowrank_similarity_f64(v, a, b)
    return _finish(num, cdw2, dw2, v)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the blocked loop on one CPU thread: its small, memory-bound steps gain nothing from a second
    OpenMP thread, and lose a lot when another process holds the other core (measured: 62 ms vs 1 s per
    4096² module on a busy 2-core machine). The caller's thread setting is restored."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weights_similarity(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    transposed: bool = False,
    block_rows: int = 256,
) -> Similarity:
    """ρ straight from the two stored weights, streaming V = W_al − W_un in float32 row blocks.

    Same result as `lowrank_similarity(safety_difference(...), a, b)`, but V never exists whole: each
    block of rows is converted into one reused buffer while it is hot in cache (the full-V route reads a
    float32 V twice more). `transposed` is for Conv1D weights stored d_in × d_out (V = Dᵀ). Degenerate or
    non-finite cases fall back to the full-V route, which names the degeneracy.
    """
    d_rows, d_cols = w_aligned.shape
    if w_aligned.shape != w_unaligned.shape:
        raise ValueError(f"aligned {tuple(w_aligned.shape)} vs unaligned {tuple(w_unaligned.shape)}")
    d_out, d_in = (d_cols, d_rows) if transposed else (d_rows, d_cols)
    if (d_out, d_in) != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
        raise ValueError(f"V {(d_out, d_in)} does not fit A {tuple(a.shape)}, B {tuple(b.shape)}")
    dev, r = w_aligned.device, a.shape[0]
    b32 = b.to(device=dev, dtype=torch.float32)
    a64 = a.to(device=dev, dtype=torch.float64)
    g = a64 @ a64.T
    buf = torch.empty(min(block_rows, d_rows), d_cols, device=dev)
    p = torch.zeros(d_in, r, device=dev)  # Vᵀ B
    m = torch.zeros(d_out, r, device=dev)  # V Vᵀ B

    def block(i: int) -> torch.Tensor:
        d = buf[: min(block_rows, d_rows - i)]
        d.copy_(w_aligned[i : i + block_rows])
        return d.sub_(w_unaligned[i : i + block_rows])

    with _one_cpu_thread(dev):
        if not transposed:  # V = D: P = Σ D_kᵀ B_k, then M_k = D_k P
            for i in range(0, d_rows, block_rows):
                p.addmm_(block(i).T, b32[i : i + block_rows])
            for i in range(0, d_rows, block_rows):
                torch.mm(block(i), p, out=m[i : i + block_rows])
        else:  # V = Dᵀ: P_k = D_k B, M = Σ D_kᵀ P_k (one pass)
            for i in range(0, d_rows, block_rows):
                d = block(i)
                torch.mm(d, b32, out=p[i : i + block_rows])
                m.addmm_(d.T, p[i : i + block_rows])
    num, cdw2, dw2 = _trace_product(p, p, g), _trace_product(m, m, g), _trace_product(b32, b32, g)
    if not all(math.isfinite(x) and x >= FLOAT32_TINY for x in (num, cdw2, dw2)):
        v = safety_difference(w_aligned, w_unaligned)
        return lowrank_similarity(v.T if transposed else v, a, b)
    return Similarity(min(max(num / math.sqrt(cdw2 * dw2), 0.0), 1.0))


def _lowrank_similarity_f64(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Similarity:
    v64 = v.to(torch.float64)
    b64 = b.to(device=v.device, dtype=torch.float64)
    a64 = a.to(device=v.device, dtype=torch.float64)
    g = a64 @ a64.T
    p = v64.T @ b64
    m = v64 @ p
    num, cdw2, dw2 = (float(((x.T @ x) * g).sum()) for x in (p, m, b64))
    if not all(math.isfinite(x) for x in (num, cdw2, dw2)):
        raise ValueError("non-finite values in V or in the adapter factors")
    return _finish(num, cdw2, dw2, v)


def _finish(num: float, cdw2: float, dw2: float, v: torch.Tensor) -> Similarity:
    if dw2 <= 0.0:
        return Similarity(0.0, "zero-update")
    if cdw2 <= 0.0:
        vn = float(torch.linalg.vector_norm(v, dtype=torch.float64))
        return Similarity(0.0, ZERO_V if vn == 0.0 else "orthogonal")
    rho = num / math.sqrt(cdw2 * dw2)
    return Similarity(min(max(rho, 0.0), 1.0))


def dense_similarity(v: torch.Tensor, delta: torch.Tensor) -> float:
    """Reference ρ as docs/method.md §3 writes it, in float64, forming C = V Vᵀ / ‖V‖_F (tests only)."""
    v64 = v.to(torch.float64)
    d64 = delta.to(torch.float64)
    vn = torch.linalg.vector_norm(v64)
    if float(vn) == 0.0:
        return 0.0
    c = (v64 @ v64.T) / vn
    cd = c @ d64
    den = torch.linalg.vector_norm(cd) * torch.linalg.vector_norm(d64)
    if float(den) == 0.0:
        return 0.0
    return float((cd * d64).sum() / den)


# --- selection policies ----------------------------------------------------------------------------
def select_threshold(rhos: list[float], tau: float) -> list[bool]:
    """Select modules with round(ρ, 5) < τ (strict), as the reference code."""
    return [round(r, DECISION_DECIMALS) < tau for r in rhos]


LOWEST, HIGHEST, RANDOM = "lowest", "highest", "random"  # the orders a ranking policy takes modules in
ORDERS = (LOWEST, HIGHEST, RANDOM)


def rank_modules(
    rhos: list[float], order: str = LOWEST, seed: int | None = None, last: Collection[int] = ()
) -> list[int]:
    """Module indices in the order a ranking policy (top-k, fraction) takes them.

    `lowest`: ascending ρ (SafeMERGE); `highest`: descending ρ (the inverse control); `random`: a uniform
    permutation drawn from `random.Random(seed)` (the random control; the same seed, the same draw). Ties
    are broken by module order. `last`: indices ranked after every other module whatever the order — the
    `zero-V` modules, whose ρ = 0 is a convention, not a measurement (docs/method.md §3.3).
    """
    at_end = set(last)
    n = len(rhos)
    if order == LOWEST:
        return sorted(range(n), key=lambda i: (i in at_end, rhos[i], i))
    if order == HIGHEST:
        return sorted(range(n), key=lambda i: (i in at_end, -rhos[i], i))
    if order != RANDOM:
        raise ValueError(f"order must be one of {', '.join(ORDERS)} (got {order!r})")
    if seed is None:
        raise ValueError("order random needs a seed (the draw is reproducible per seed)")
    drawn = list(range(n))
    random.Random(seed).shuffle(drawn)
    return sorted(drawn, key=lambda i: i in at_end)  # stable: the draw's order within each group


def select_top_k(
    rhos: list[float], k: int, last: Collection[int] = (), order: str = LOWEST, seed: int | None = None
) -> list[bool]:
    """Select the first k modules of `rank_modules(rhos, order, seed, last)`: by default the k lowest ρ
    (ties broken by module order), with `last` (the `zero-V` modules) taking a place only when fewer than
    k other modules exist, so k measured modules are chosen whenever there are k."""
    chosen = set(rank_modules(rhos, order, seed, last)[: max(0, min(k, len(rhos)))])
    return [i in chosen for i in range(len(rhos))]


def fraction_count(n: int, fraction: float) -> int:
    """How many modules the `fraction` policy selects: ⌈fraction · n⌉ (at least the fraction asked for)."""
    return min(n, math.ceil(fraction * n - 1e-9))


def select_fraction(
    rhos: list[float],
    fraction: float,
    last: Collection[int] = (),
    order: str = LOWEST,
    seed: int | None = None,
) -> list[bool]:
    """Select ⌈fraction · n⌉ modules, by default the lowest-ρ ones (`last`, `order`, `seed` as in
    `select_top_k`)."""
    return select_top_k(rhos, fraction_count(len(rhos), fraction), last, order, seed)


# --- full fine-tunes: ρ of a dense update ΔW = W_task − W_al (docs/method.md §3.7) -----------------
INPUT_ROUTE = "input"  # P = Vᵀ ΔW (d_in × d_in), then V P: cost 2 · d_out · d_in²
OUTPUT_ROUTE = "output"  # K = V Vᵀ (d_out × d_out), then K ΔW: cost 2 · d_out² · d_in


def update_route(d_out: int, d_in: int) -> str:
    """The cheaper association of C ΔW = V Vᵀ ΔW for a d_out × d_in module (docs/engine.md).

    Both routes hold one min(d_out, d_in)² product besides a block of rows; V(VᵀΔW) costs 2·d_out·d_in²,
    (VVᵀ)ΔW costs 2·d_out²·d_in, so the smaller side decides (ties: the input route).
    """
    return INPUT_ROUTE if d_in <= d_out else OUTPUT_ROUTE


@dataclass(frozen=True)
class UpdateTerms:
    """The three terms of ρ for a dense update, in float64: ‖VᵀΔW‖², ‖VVᵀΔW‖² and ‖ΔW‖² (the constants
    of C are left out: they cancel in ρ)."""

    num: float
    cdw2: float
    dw2: float

    @property
    def finite(self) -> bool:
        return all(math.isfinite(x) for x in (self.num, self.cdw2, self.dw2))


# Elements per float64 chunk of a sum of squares (512 KiB): converting a whole float32 block to float64
# first costs 5× the sum itself (the copy leaves the cache); chunks are converted while they stay in it.
F64_CHUNK = 1 << 16


def _storage_order(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y (one shape) transposed together when x is a column-major view, so rows are contiguous."""
    if x.dim() == 2 and x.stride(-1) != 1 and x.stride(0) == 1:
        return x.T, y.T
    return x, y


def _dot64(x: torch.Tensor, y: torch.Tensor) -> float:
    """⟨x, y⟩_F of two tensors of one shape, every product and sum in float64 (float32 reductions of long
    vectors lose digits, docs/method.md §3.6). On the CPU in row chunks of `F64_CHUNK` elements, on one
    thread: each chunk is too small to gain from a second, and every parallel step waits for both
    threads — thousands of waits when another process holds a core (measured: 168 s of a 253 s scan)."""
    if x.device.type != "cpu" or x.dim() != 2:
        return float((x.to(torch.float64) * y.to(torch.float64)).sum())
    x, y = _storage_order(x, y)
    rows = max(1, F64_CHUNK // max(1, x.shape[1]))
    total = 0.0
    with _one_cpu_thread(x.device):
        for i in range(0, x.shape[0], rows):
            xc = x[i : i + rows].to(torch.float64).reshape(-1)
            yc = xc if y is x else y[i : i + rows].to(torch.float64).reshape(-1)
            total += float(torch.dot(xc, yc))
    return total


def _sq(x: torch.Tensor) -> float:
    """‖x‖_F² accumulated in float64 (`_dot64`)."""
    return _dot64(x, x)


def _block_buffer(x: torch.Tensor, step: int, dtype: torch.dtype) -> torch.Tensor:
    """A step × cols buffer for row blocks of the view x, laid out as x's rows are stored: row-major,
    or column-major when x is a transposed view (Linear weights on the output route, Conv1D weights on
    the input route), so that filling it reads the stored tensor in order; the products take either
    layout at no cost."""
    cols = x.shape[1]
    if x.stride(-1) == 1 or x.stride(0) != 1:
        return torch.empty(step, cols, device=x.device, dtype=dtype)
    return torch.empty(cols, step, device=x.device, dtype=dtype).T


def _update_terms(
    al: torch.Tensor, un: torch.Tensor, ft: torch.Tensor, route: str, block_rows: int, dtype: torch.dtype
) -> UpdateTerms:
    """The terms of ρ from three d_out × d_in views (any layout), forming V and ΔW block by block.

    input route: row blocks i give V_i, ΔW_i; P = Σ V_iᵀ ΔW_i, then ‖VVᵀΔW‖² = Σ ‖V_i P‖².
    output route: column blocks j (rows of the transposed views) give V_j, ΔW_j; K = Σ V_j V_jᵀ, then
    ⟨K ΔW_j, ΔW_j⟩ and ‖K ΔW_j‖² per block. Products in `dtype`, every sum of squares in float64.
    """
    if route == OUTPUT_ROUTE:
        al, un, ft = al.T, un.T, ft.T  # rows are now the input side: blocks are column blocks of V
    rows, cols = al.shape
    step = max(1, min(block_rows, rows))
    buf_v, buf_d = _block_buffer(al, step, dtype), _block_buffer(al, step, dtype)

    def diff(buf: torch.Tensor, x: torch.Tensor, y: torch.Tensor, i: int) -> torch.Tensor:
        d = buf[: min(step, rows - i)]
        with _one_cpu_thread(d.device):  # bound by memory: as `_dot64`, one thread, no waits for a second
            d.copy_(x[i : i + step])
            return d.sub_(y[i : i + step])

    acc = torch.zeros(cols, cols, device=al.device, dtype=dtype)  # P (input) or K (output)
    num = cdw2 = dw2 = 0.0
    if route == INPUT_ROUTE:
        for i in range(0, rows, step):
            d = diff(buf_d, ft, al, i)
            acc.addmm_(diff(buf_v, al, un, i).T, d)  # P += V_iᵀ ΔW_i
            dw2 += _sq(d)
        num = _sq(acc)  # ‖Vᵀ ΔW‖²
        for i in range(0, rows, step):
            cdw2 += _sq(diff(buf_v, al, un, i) @ acc)  # ‖V_i P‖²
        return UpdateTerms(num, cdw2, dw2)
    for i in range(0, rows, step):
        v = diff(buf_v, al, un, i)
        acc.addmm_(v.T, v)  # K += V_j V_jᵀ  (here V_jᵀ is a row block)
    for i in range(0, rows, step):
        d = diff(buf_d, ft, al, i)
        # (K ΔW_j)ᵀ = ΔW_jᵀ K (K is symmetric), made in ΔW_j's layout so ⟨·, ΔW_j⟩ reads both in order
        m = d @ acc if d.stride(-1) == 1 else (acc @ d.T).T
        num += _dot64(m, d)
        cdw2 += _sq(m)
        dw2 += _sq(d)
    return UpdateTerms(num, cdw2, dw2)


def update_similarity(
    w_aligned: torch.Tensor,
    w_unaligned: torch.Tensor,
    w_task: torch.Tensor,
    transposed: bool = False,
    block_rows: int = 1024,
    route: str | None = None,
) -> tuple[Similarity, float]:
    """ρ of the dense update ΔW = W_task − W_al against V = W_al − W_un, and ‖ΔW‖_F (float64).

    The weights are the stored tensors (Conv1D: d_in × d_out with `transposed`); V and ΔW are formed in
    float32 blocks of `block_rows` (bf16 → fp32 is exact, §3.6) and never held whole, C is never formed,
    and the association of V Vᵀ ΔW is `update_route`'s (or `route`). A non-finite or 0 term triggers a
    float64 recompute, which names the degeneracy (§3.3) or raises ValueError for non-finite input.
    """
    if not (w_aligned.shape == w_unaligned.shape == w_task.shape) or w_aligned.dim() != 2:
        shapes = ", ".join(str(tuple(w.shape)) for w in (w_aligned, w_unaligned, w_task))
        raise ValueError(f"aligned, unaligned and task weights must share one 2-D shape (got {shapes})")
    al, un, ft = (w.T if transposed else w for w in (w_aligned, w_unaligned, w_task))
    route = route or update_route(*al.shape)
    terms = _update_terms(al, un, ft, route, block_rows, torch.float32)
    if not terms.finite or min(terms.num, terms.cdw2, terms.dw2) < FLOAT32_TINY:
        terms = _update_terms(al, un, ft, route, block_rows, torch.float64)
        if not terms.finite:
            raise ValueError("non-finite values in the aligned, unaligned or task weights")
    norm = math.sqrt(max(terms.dw2, 0.0))
    if terms.dw2 <= 0.0:
        return Similarity(0.0, "zero-update"), norm
    if terms.cdw2 <= 0.0:
        vn = _sq(safety_difference(w_aligned, w_unaligned))
        return Similarity(0.0, ZERO_V if vn == 0.0 else "orthogonal"), norm
    rho = terms.num / math.sqrt(terms.cdw2 * terms.dw2)
    return Similarity(min(max(rho, 0.0), 1.0)), norm
