"""ρ from the low-rank path against an independent dense float64 computation of docs/method.md §3.

Among the bugs it catches (planted and seen to fail, docs/testing.md): traces accumulated in float32
instead of float64, and `--top-k` / fraction ties broken against module order.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safemerge.engine.criterion import (
    dense_similarity,
    fraction_count,
    lowrank_similarity,
    safety_difference,
    select_fraction,
    select_threshold,
    select_top_k,
    update_similarity,
    weights_similarity,
)


def dense_reference(v: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """docs/method.md §3 written out independently: C explicit, ΔW explicit, everything float64."""
    v = v.double()
    dw = b.double() @ a.double()
    c = v @ v.T / math.sqrt(float((v * v).sum()))
    cdw = c @ dw
    return float((cdw * dw).sum() / (math.sqrt(float((cdw * cdw).sum())) * math.sqrt(float((dw * dw).sum()))))


def random_case(d_out: int, d_in: int, r: int, v_rank: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if v_rank is None:
        v = torch.randn(d_out, d_in, generator=g)
    else:
        v = torch.randn(d_out, v_rank, generator=g) @ torch.randn(v_rank, d_in, generator=g)
    a = torch.randn(r, d_in, generator=g)
    b = torch.randn(d_out, r, generator=g)
    return v, a, b


@pytest.mark.parametrize(
    ("d_out", "d_in", "r", "v_rank"),
    [
        (64, 64, 8, None),
        (32, 128, 4, None),
        (128, 32, 8, None),
        (96, 96, 8, 3),
        (16, 64, 16, None),
        (40, 24, 1, 1),
    ],
)
def test_lowrank_matches_dense(d_out: int, d_in: int, r: int, v_rank: int | None) -> None:
    v, a, b = random_case(d_out, d_in, r, v_rank)
    sim = lowrank_similarity(v, a, b)
    ref = dense_reference(v, a, b)
    assert sim.degenerate is None
    # Measured |ρ_lowrank − ρ_dense| on these six cases (torch 2.13 CPU): 3.1e-9 to 2.9e-8 (largest:
    # 16×64, r=16); it comes from the float32 products VᵀB and VVᵀB, which are float32 by design
    # (method.md §3.6). 1e-7 leaves a 3× margin. The integer test below checks the float64 traces.
    assert sim.rho == pytest.approx(ref, abs=1e-7)
    assert dense_similarity(v, b.double() @ a.double()) == pytest.approx(ref, abs=1e-12)
    assert 0.0 <= sim.rho <= 1.0


def test_gqa_shapes_like_llama3() -> None:
    # v_proj of a GQA model: d_out (KV heads × head dim) much smaller than d_in.
    v, a, b = random_case(64, 512, 8, seed=3)
    # measured error 9.9e-9 (see test_lowrank_matches_dense)
    assert lowrank_similarity(v, a, b).rho == pytest.approx(dense_reference(v, a, b), abs=1e-7)


@pytest.mark.parametrize(("d_out", "d_in", "r", "seed"), [(48, 64, 4, 0), (64, 48, 8, 1), (96, 128, 8, 2)])
def test_traces_are_accumulated_in_float64(d_out: int, d_in: int, r: int, seed: int) -> None:
    """Small-integer V, A, B make every float32 product exact (|entries of VVᵀB| < 2^24), so the only
    rounding left in the low-rank path is in the traces. Accumulated in float64 they are exact too and ρ
    matches the dense float64 one to rounding (measured: 0 to 1.1e-16); accumulated in float32 (e.g.
    tr(MᵀM G) with entries ~1e11) ρ is off by 1.7e-8 to 8.6e-8 on these cases."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-3, 4, (d_out, d_in), generator=g).float()
    a = torch.randint(-3, 4, (r, d_in), generator=g).float()
    b = torch.randint(-3, 4, (d_out, r), generator=g).float()
    assert float((v @ (v.T @ b)).abs().max()) < 2**24  # the premise: float32 products are exact
    ref = dense_reference(v, a, b)
    assert lowrank_similarity(v, a, b).rho == pytest.approx(ref, abs=1e-12)
    # the streaming path from stored weights (V = W_al − W_un, exact for these integers) as well
    w_un = torch.full_like(v, 5.0)
    assert weights_similarity(v + w_un, w_un, a, b, block_rows=16).rho == pytest.approx(ref, abs=1e-12)


def test_update_inside_the_subspace_has_rho_near_one_and_orthogonal_update_rho_zero() -> None:
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    v = u[:, :4] @ torch.randn(4, 48, generator=g)  # V spans the first 4 output directions
    b_in = u[:, :1]  # update in a single direction of V's column space...
    a = torch.randn(1, 48, generator=g)
    # ... aligned with V's dominant right singular vector gives ρ = 1
    _, _, vh = torch.linalg.svd(v.double())
    sim_in = lowrank_similarity(v, vh[:1].float(), (v.double() @ vh[0].reshape(-1, 1)).float())
    assert sim_in.rho == pytest.approx(1.0, abs=1e-6)
    b_out = u[:, 10:11]  # outside V's column space entirely
    sim_out = lowrank_similarity(v, a, b_out)
    assert sim_out.rho < 1e-6  # numerically orthogonal: tiny, not flagged
    exact = lowrank_similarity(
        torch.eye(4, 3)[:, :2] @ torch.ones(2, 3), torch.ones(1, 3), torch.eye(4)[:, 3:]
    )
    assert exact.rho == 0.0 and exact.degenerate == "orthogonal"
    assert lowrank_similarity(v, a, b_in).rho > 0


def test_zero_v_and_zero_update_follow_the_reference_convention() -> None:
    v, a, b = random_case(32, 32, 4)
    zero_v = lowrank_similarity(torch.zeros_like(v), a, b)
    assert zero_v.rho == 0.0 and zero_v.degenerate == "zero-V"
    zero_b = lowrank_similarity(v, a, torch.zeros_like(b))
    assert zero_b.rho == 0.0 and zero_b.degenerate == "zero-update"
    zero_a = lowrank_similarity(v, torch.zeros_like(a), b)
    assert zero_a.rho == 0.0 and zero_a.degenerate == "zero-update"
    assert select_threshold([zero_v.rho], 0.35) == [True]


@settings(max_examples=30, deadline=None)
@given(
    st.floats(1e-3, 1e3),
    st.floats(1e-3, 1e3),
    st.floats(1e-3, 1e3),
    st.integers(0, 10_000),
)
def test_rho_is_invariant_to_positive_scaling(cv: float, ca: float, cb: float, seed: int) -> None:
    v, a, b = random_case(24, 20, 3, seed=seed)
    base = lowrank_similarity(v, a, b).rho
    assert lowrank_similarity(v * cv, a * ca, b * cb).rho == pytest.approx(base, abs=1e-5)


def test_large_magnitudes_fall_back_to_float64() -> None:
    v, a, b = random_case(16, 16, 2)
    sim = lowrank_similarity(v * 1e20, a * 1e10, b * 1e10)  # float32 products overflow
    assert sim.rho == pytest.approx(dense_reference(v, a, b), abs=1e-6)


def test_bf16_weights_are_converted_before_subtracting() -> None:
    w = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    w2 = torch.tensor([[1.0078125, 2.0]], dtype=torch.bfloat16)  # one bf16 ulp above 1
    assert safety_difference(w2, w).dtype == torch.float32
    assert float(safety_difference(w2, w)[0, 0]) == pytest.approx(0.0078125)


def test_threshold_is_strict_and_uses_rounded_rho() -> None:
    rhos = [0.349994, 0.349996, 0.35, 0.2]
    # 0.349996 rounds to 0.35, which is not < 0.35
    assert select_threshold(rhos, 0.35) == [True, False, False, True]
    assert select_threshold(rhos, 0.0) == [False] * 4
    assert select_threshold([0.0, 1.0], 1.01) == [True, True]


def test_top_k_and_fraction() -> None:
    rhos = [0.5, 0.1, 0.3, 0.1, 0.9]
    assert select_top_k(rhos, 2) == [False, True, False, True, False]
    assert select_top_k(rhos, 0) == [False] * 5
    assert select_top_k(rhos, 99) == [True] * 5
    assert fraction_count(5, 0.5) == 3 and fraction_count(4, 0.5) == 2 and fraction_count(10, 0.0) == 0
    assert select_fraction(rhos, 0.4) == [False, True, False, True, False]
    for k in range(6):
        assert sum(select_top_k(rhos, k)) == k


def test_top_k_and_fraction_break_exact_ties_by_module_order() -> None:
    # four modules tie at ρ = 0.1 exactly: the earliest ones in module order win
    rhos = [0.2, 0.1, 0.1, 0.1, 0.1, 0.05]
    assert select_top_k(rhos, 1) == [False, False, False, False, False, True]
    assert select_top_k(rhos, 3) == [False, True, True, False, False, True]
    assert select_top_k(rhos, 4) == [False, True, True, True, False, True]
    assert select_top_k([0.3] * 5, 2) == [True, True, False, False, False]
    # fraction 0.5 of 6 = 3 modules: the same tie rule
    assert select_fraction(rhos, 0.5) == [False, True, True, False, False, True]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(
    ("d_rows", "d_cols", "block"), [(64, 48, 16), (70, 33, 32), (40, 40, 256), (96, 24, 1)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_from_weights_matches_full_v(transposed, d_rows, d_cols, block, dtype) -> None:
    g = torch.Generator().manual_seed(d_rows + d_cols)
    w_un = torch.randn(d_rows, d_cols, generator=g).to(dtype)
    w_al = (w_un.float() + 0.1 * torch.randn(d_rows, d_cols, generator=g)).to(dtype)
    d_out, d_in = (d_cols, d_rows) if transposed else (d_rows, d_cols)
    a, b = torch.randn(4, d_in, generator=g), torch.randn(d_out, 4, generator=g)
    v = safety_difference(w_al, w_un)
    full = lowrank_similarity(v.T if transposed else v, a, b)
    streamed = weights_similarity(w_al, w_un, a, b, transposed=transposed, block_rows=block)
    assert streamed.rho == pytest.approx(full.rho, abs=1e-6)
    assert streamed.rho == pytest.approx(dense_reference(v.T if transposed else v, a, b), abs=2e-6)


def test_streaming_from_weights_falls_back_for_degenerate_inputs() -> None:
    w = torch.randn(8, 6)
    a, b = torch.randn(2, 6), torch.randn(8, 2)
    assert weights_similarity(w, w.clone(), a, b).degenerate == "zero-V"
    assert weights_similarity(w + 1, w, a, torch.zeros_like(b)).degenerate == "zero-update"
    with pytest.raises(ValueError, match="does not fit"):
        weights_similarity(w, w, a, b, transposed=True)


# --- update_similarity (full fine-tunes): edge cases found by mutation testing (docs/testing.md) --------
def _dense_rho64(v: torch.Tensor, dw: torch.Tensor) -> float:
    """docs/method.md §3 in float64 with C explicit (scale-free: ρ is invariant to scaling V or ΔW)."""
    v, dw = v.double() / v.double().abs().max(), dw.double() / dw.double().abs().max()
    cdw = (v @ v.T) @ dw
    return float((cdw * dw).sum() / (torch.linalg.norm(cdw) * torch.linalg.norm(dw)))


@pytest.mark.parametrize("route", ["input", "output"])
@pytest.mark.parametrize(("v_scale", "dw_scale"), [(1e-23, 1.0), (1e-11, 1.0), (1e10, 1e-20)])
def test_update_similarity_recomputes_underflowing_terms_in_float64(
    route: str, v_scale: float, dw_scale: float
) -> None:
    """A term of ρ below float32's smallest normal number (1.2e-38) sends the module to the float64
    recompute, whichever term it is: V of 1e-23 (V VᵀΔW ~ 1e-46 underflows: ρ would read 0, "orthogonal"),
    V of 1e-11 (‖VVᵀΔW‖² ~ 5e-41) and ΔW of 1e-20 (‖ΔW‖² ~ 1e-40, with V of 1e10 so that the other two
    terms are not small). The recomputed ρ is within 1e-12 of the dense float64 oracle (float32's is
    ~1e-8 off)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, 6, generator=g) * v_scale
    dw = torch.randn(8, 6, generator=g) * dw_scale
    zero = torch.zeros(8, 6)  # W_al = 0, W_un = −V, W_task = ΔW: V and ΔW held exactly in float32
    sim, norm = update_similarity(zero, -v, dw, route=route)
    assert sim.degenerate is None
    assert sim.rho == pytest.approx(_dense_rho64(v, dw), abs=1e-12)
    assert norm == pytest.approx(float(torch.linalg.norm(dw.double())), rel=1e-12)


def test_update_similarity_refusals_are_worded() -> None:
    """Weights of different shapes, or not 2-D, and non-finite weights: ValueError in words written here."""
    a = torch.ones(4, 3)
    with pytest.raises(ValueError) as err:
        update_similarity(a, a, torch.ones(3, 4))
    want = "aligned, unaligned and task weights must share one 2-D shape (got (4, 3), (4, 3), (3, 4))"
    assert str(err.value) == want
    with pytest.raises(ValueError, match=r"share one 2-D shape \(got \(3,\), \(3,\), \(3,\)\)$"):
        update_similarity(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError) as err:
        update_similarity(a, torch.zeros(4, 3), torch.full((4, 3), math.nan))
    assert str(err.value) == "non-finite values in the aligned, unaligned or task weights"


@pytest.mark.parametrize("shape", [(13, 7), (7, 13)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("route", ["input", "output"])
def test_update_similarity_in_float64_chunks_and_either_block_layout(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int], transposed: bool, route: str
) -> None:
    """The sums of squares run in float64 chunks of a few elements (one row each, last one partial) and
    the blocks are laid out as the weights are stored (a transposed view on one route per layout, with a
    partial last block of 4 rows): ρ and ‖ΔW‖ still equal the dense float64 oracle."""
    import safemerge.engine.criterion as criterion

    monkeypatch.setattr(criterion, "F64_CHUNK", 3)
    g = torch.Generator().manual_seed(sum(shape) + transposed)
    un, v, dw = (torch.randn(shape, generator=g) for _ in range(3))
    al, ft, un = ((w).to(torch.bfloat16) for w in (un + v, un + v + dw, un))  # float32 differences exact
    sim, norm = update_similarity(al, un, ft, transposed, block_rows=4, route=route)
    v64, dw64 = al.double() - un.double(), ft.double() - al.double()
    if transposed:
        v64, dw64 = v64.T, dw64.T
    assert sim.rho == pytest.approx(_dense_rho64(v64, dw64), abs=1e-7)
    assert norm == pytest.approx(float(torch.linalg.norm(dw64)), rel=1e-12)


def test_float64_sums_of_squares_are_float64_whatever_the_layout() -> None:
    """1 + 209,999 · 2⁻²⁶ (every square exact): each small term is below half of float32's spacing at 1,
    so a float32 accumulation loses digits; the chunked float64 sums are exact, for a row-major tensor,
    a column-major view, and the two mixed."""
    from safemerge.engine.criterion import _dot64, _sq

    x = torch.full((300, 700), 2.0**-13)
    x[0, 0] = 1.0
    col_major = x.T.contiguous().T
    want = 1.0 + (300 * 700 - 1) * 2.0**-26
    for got in (_sq(x), _sq(col_major), _dot64(col_major, x), _dot64(x, col_major)):
        assert got == pytest.approx(want, rel=1e-15)
    y = torch.arange(300 * 700, dtype=torch.float32).reshape(300, 700) % 7  # pairs must meet by position
    assert _dot64(col_major, y) == _dot64(y.T.contiguous().T, x) == float((x.double() * y.double()).sum())
