"""Safety-subspace sketches (docs/subspace.md) against dense float64 oracles written here.

Oracles: ρ as docs/method.md §3 writes it (C = V Vᵀ / ‖V‖_F formed explicitly, float64), applied to the
full V (a full-rank sketch must match it) and to V truncated to its top-K by a float64 SVD computed in the
test (a rank-K sketch must match that). Bugs planted and seen to fail: the Conv1D weight not transposed,
S instead of S² as the weights, K not clamped to min(d_out, d_in) (docs/testing.md).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import save_adapter, save_pair
from safetensors import safe_open
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.engine import subspace as sub
from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.lora import LoraAdapter
from safemerge.engine.subspace import (
    Sketch,
    SubspaceConfig,
    load_sketch,
    measured_error,
    near_threshold,
    sketch_matrix,
    sketch_similarity_dense,
    sketch_similarity_lowrank,
    subspace,
)

runner = CliRunner()


# --- oracles -------------------------------------------------------------------------------------------
def dense_rho(v: torch.Tensor, dw: torch.Tensor) -> float:
    """docs/method.md §3 literally: C explicit, everything float64."""
    v, dw = v.double(), dw.double()
    c = v @ v.T / math.sqrt(float((v * v).sum()))
    cdw = c @ dw
    return float((cdw * dw).sum() / (torch.linalg.norm(cdw) * torch.linalg.norm(dw)))


def truncated(v: torch.Tensor, k: int) -> torch.Tensor:
    """V cut to its top-k singular triplets (float64 SVD)."""
    u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def spectrum_matrix(d_out: int, d_in: int, sigmas: torch.Tensor, seed: int) -> torch.Tensor:
    """A V with the given singular values and random singular vectors (float32)."""
    g = torch.Generator().manual_seed(seed)
    n = sigmas.numel()
    u = torch.linalg.qr(torch.randn(d_out, n, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=torch.float64)).Q
    return ((u * sigmas.double()) @ w.T).float()


def lora(d_out: int, d_in: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)


# --- maths -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("d_out", "d_in"), [(40, 24), (24, 40), (48, 48), (16, 64)])
def test_full_rank_sketch_equals_exact_rho(d_out: int, d_in: int) -> None:
    g = torch.Generator().manual_seed(d_out * d_in)
    v = torch.randn(d_out, d_in, generator=g)
    sk = sketch_matrix(v, rank=10_000, seed=0)
    assert sk.u.shape == (d_out, min(d_out, d_in)) and sk.energy == pytest.approx(1.0, abs=1e-12)
    assert sk.frobenius == pytest.approx(float(torch.linalg.norm(v.double())), rel=1e-12)
    for seed in range(3):
        a, b = lora(d_out, d_in, 4, seed)
        ref = dense_rho(v, b @ a)
        # measured |Δρ| ≤ 6.5e-9 (low-rank) and 2.1e-8 (dense: X = UᵀΔW in float32); U is stored in
        # float32. 2e-7 leaves a 10× margin.
        assert sketch_similarity_lowrank(sk.u, sk.s, a, b).rho == pytest.approx(ref, abs=2e-7)
        assert sketch_similarity_dense(sk.u, sk.s, b @ a).rho == pytest.approx(ref, abs=2e-7)


@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_rank_k_sketch_equals_rho_of_the_truncated_v(k: int) -> None:
    v = spectrum_matrix(64, 48, torch.logspace(0, -2, 48), seed=1)  # a decaying spectrum
    sk = sketch_matrix(v, rank=k, seed=0)
    assert sk.method == "exact" and sk.u.shape == (64, k)
    vk = truncated(v, k)
    s_all = torch.linalg.svdvals(v.double())
    assert sk.energy == pytest.approx(float((s_all[:k] ** 2).sum() / (s_all**2).sum()), rel=1e-9)
    gaps = []
    for seed in range(4):
        a, b = lora(64, 48, 8, seed)
        got = sketch_similarity_lowrank(sk.u, sk.s, a, b).rho
        assert got == pytest.approx(dense_rho(vk, b @ a), abs=2e-8)  # measured ≤ 1.9e-9
        gaps.append(abs(dense_rho(v, b @ a) - got))
    assert min(gaps) > 1e-3  # the test has teeth: truncation changes ρ at these K (measured ≥ 7e-3)


def test_truncation_never_raises_rho() -> None:
    """docs/subspace.md "A sketch only lowers ρ": ρ of V cut to its top-K never exceeds ρ of V cut to its
    top-(K+1) (dense float64 oracle), so at τ a sketch can only add modules to the selection."""
    v = spectrum_matrix(40, 30, torch.linspace(2, 0.05, 30), seed=5)
    u, s, vh = torch.linalg.svd(v.double(), full_matrices=False)
    cuts = [(u[:, :k] * s[:k]) @ vh[:k] for k in range(1, 31)]
    for seed in range(5):
        a, b = lora(40, 30, 3, seed)
        rhos = [dense_rho(vk, b @ a) for vk in cuts]
        assert all(x <= y + 1e-12 for x, y in itertools.pairwise(rhos)), rhos
        sk = [sketch_matrix(v, k, 0) for k in (2, 10, 30)]
        got = [sketch_similarity_lowrank(x.u, x.s, a, b).rho for x in sk]
        assert got[0] <= got[1] <= got[2] + 1e-7


def test_randomized_svd_matches_the_truncated_v(monkeypatch: pytest.MonkeyPatch) -> None:
    """The randomised path (forced at a small size) finds the top-K subspace of a decaying spectrum."""
    monkeypatch.setattr(sub, "EXACT_MAX_DIM", 16)
    v = spectrum_matrix(200, 150, 0.85 ** torch.arange(150.0), seed=2)
    sk = sketch_matrix(v, rank=8, seed=0)
    assert sk.method == "randomized" and sk.u.shape == (200, 8)
    assert torch.allclose(
        sk.u.T.double() @ sk.u.double(), torch.eye(8, dtype=torch.float64), atol=3e-6
    )  # measured 3.2e-7
    v8 = truncated(v, 8)
    for seed in range(4):
        a, b = lora(200, 150, 8, seed)
        # measured |Δρ| ≤ 9.5e-9 (4 power iterations on a 0.85^j spectrum); 1e-7 leaves a 10× margin
        want = dense_rho(v8, b @ a)
        assert sketch_similarity_lowrank(sk.u, sk.s, a, b).rho == pytest.approx(want, abs=1e-7)
    again = sketch_matrix(v, rank=8, seed=0)
    assert torch.equal(again.u, sk.u) and torch.equal(again.s, sk.s)


def test_rank_deficient_v_is_exact_and_k_is_clamped() -> None:
    g = torch.Generator().manual_seed(3)
    v = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3
    for k in (3, 8, 100):
        sk = sketch_matrix(v, rank=k, seed=0)
        assert sk.u.shape == (30, min(k, 20)) and sk.s.shape == (min(k, 20),)
        a, b = lora(30, 20, 4, k)
        want = dense_rho(v, b @ a)
        assert sketch_similarity_lowrank(sk.u, sk.s, a, b).rho == pytest.approx(
            want, abs=5e-8
        )  # measured 5.2e-9


def test_lowrank_route_equals_dense_route() -> None:
    v = spectrum_matrix(72, 56, torch.linspace(3, 0.1, 56), seed=4)
    sk = sketch_matrix(v, rank=12, seed=0)
    for seed in range(5):
        a, b = lora(72, 56, 6, seed)
        low = sketch_similarity_lowrank(sk.u, sk.s, a * 0.01, b * 3.0)  # scaling must not matter
        dense = sketch_similarity_dense(sk.u, sk.s, b @ a)
        assert low.rho == pytest.approx(dense.rho, abs=1e-7)  # measured ≤ 1.1e-8


def test_weights_are_s_squared_not_s() -> None:
    """Two directions with σ = 2 and 1: the hand-derived ρ of ΔW = e1 + e2 (one column) is
    (4 + 1) / (√(16 + 1) · √2) = 0.857…; with S instead of S² it would be (2 + 1)/(√5 √2) = 0.949."""
    u = torch.eye(3)[:, :2]
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    delta = torch.tensor([[1.0], [1.0], [0.0]])
    want = 5 / (math.sqrt(17) * math.sqrt(2))
    assert sketch_similarity_dense(u, s, delta).rho == pytest.approx(want, abs=1e-12)
    assert sketch_similarity_lowrank(u, s, torch.ones(1, 1), delta).rho == pytest.approx(want, abs=1e-12)


def test_degenerate_cases_follow_the_criterion() -> None:
    u = torch.eye(4)[:, :2]
    s = torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = torch.ones(1, 3)
    assert sketch_similarity_lowrank(u, s, a, torch.zeros(4, 1)).degenerate == "zero-update"
    assert (
        sketch_similarity_lowrank(u, torch.zeros(2, dtype=torch.float64), a, torch.ones(4, 1)).degenerate
        == "zero-V"
    )
    ortho = sketch_similarity_lowrank(u, s, a, torch.tensor([[0.0], [0.0], [1.0], [0.0]]))
    assert ortho.rho == 0.0 and ortho.degenerate == "orthogonal"
    assert sketch_similarity_dense(u, s, torch.zeros(4, 3)).degenerate == "zero-update"
    with pytest.raises(ValueError, match="does not fit"):
        sketch_similarity_lowrank(u, s, a, torch.ones(5, 1))


def test_near_threshold_and_measured_error() -> None:
    assert near_threshold(0.34, 0.35, 0.02) and near_threshold(0.365, 0.35, 0.02)
    assert not near_threshold(0.30, 0.35, 0.02)
    assert measured_error(1) == 1.0
    ks = sorted(sub.MEASURED_RHO_ERROR)
    assert measured_error(ks[0]) == sub.MEASURED_RHO_ERROR[ks[0]]
    assert measured_error(ks[-1] * 100) == sub.MEASURED_RHO_ERROR[ks[-1]]
    errs = [sub.MEASURED_RHO_ERROR[k] for k in ks]
    assert errs == sorted(errs, reverse=True)  # the error falls as K grows


# --- the sketch directory ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("subspace")
    al, un = save_pair(root, "llama", torch.float32)
    gal, gun = save_pair(root, "gpt2", torch.float32)
    return {
        "root": root, "aligned": al, "unaligned": un, "task": save_adapter(al, root / "task", seed=1),
        "gpt2_aligned": gal, "gpt2_unaligned": gun,
        "gpt2_task": save_adapter(gal, root / "gpt2_task", seed=1, arch="gpt2", targets=["c_attn", "c_proj"],
                                  fan_in_fan_out=True),
    }  # fmt: skip


def build(pairs: dict[str, Path], out: Path, arch: str = "", **opts: object) -> Sketch:
    prefix = f"{arch}_" if arch else ""
    cfg = SubspaceConfig(
        aligned=str(pairs[f"{prefix}aligned"]),
        unaligned=str(pairs[f"{prefix}unaligned"]),
        out=str(out),
        **opts,
    )
    subspace(cfg)
    return load_sketch(out)


def test_full_rank_sketch_of_a_model_pair_gives_exact_rho(pairs: dict[str, Path], tmp_path: Path) -> None:
    sketch = build(pairs, tmp_path / "sk", rank=1000)
    task = LoraAdapter.load(pairs["task"])
    al, un = Checkpoint(pairs["aligned"]), Checkpoint(pairs["unaligned"])
    sketch.require(task.lora_modules)
    for m in task.lora_modules:
        f = task.factors(m)
        v = al.get(f"{m}.weight").double() - un.get(f"{m}.weight").double()
        got = sketch.similarity(m, f.A, f.B)
        # measured ≤ 6.3e-9 (V formed in float32, U stored in float32); 1e-7 leaves a 15× margin
        assert got.rho == pytest.approx(dense_rho(v, f.B @ f.A), abs=1e-7)
        assert sketch.energy(m) == pytest.approx(1.0, abs=1e-9) and sketch.rank_of(m) == min(v.shape)
        # V is formed in float32 (docs/engine.md "Precision"): measured relative error ≤ 1.2e-9
        assert sketch.frobenius(m) == pytest.approx(float(torch.linalg.norm(v)), rel=1e-7)
    assert sketch.check_fingerprint(al) is None


def test_gpt2_conv1d_weights_are_transposed(pairs: dict[str, Path], tmp_path: Path) -> None:
    sketch = build(pairs, tmp_path / "sk", "gpt2", rank=1000)
    assert sketch.transposed
    task = LoraAdapter.load(pairs["gpt2_task"])
    al, un = Checkpoint(pairs["gpt2_aligned"]), Checkpoint(pairs["gpt2_unaligned"])
    mods = task.lora_modules
    assert any(m.endswith("c_proj") for m in mods) and any(m.endswith("c_attn") for m in mods)
    for m in mods:
        f = task.factors(m)
        stored = al.get(f"{m}.weight").double() - un.get(f"{m}.weight").double()  # d_in × d_out
        v = stored.T  # nn.Linear orientation (docs/method.md §2)
        assert sketch.shape(m) == tuple(v.shape) and sketch.basis(m)[0].shape[0] == v.shape[0]
        # measured ≤ 9.0e-9; with the weight not transposed, c_proj (square) is off by 0.047, c_attn fails
        assert sketch.similarity(m, f.A, f.B).rho == pytest.approx(dense_rho(v, f.B @ f.A), abs=1e-7)


def test_float16_u_halves_u_and_stays_close(pairs: dict[str, Path], tmp_path: Path) -> None:
    full = build(pairs, tmp_path / "f32", rank=1000)
    half = build(pairs, tmp_path / "f16", rank=1000, u_dtype="float16")
    assert half.meta["dtype"]["U"] == "float16"
    with safe_open(str(tmp_path / "f16" / "subspace.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.U").dtype == torch.float16
    size = {k: (tmp_path / k / "subspace.safetensors").stat().st_size for k in ("f32", "f16")}
    assert size["f16"] < 0.6 * size["f32"]
    task = LoraAdapter.load(pairs["task"])
    worst = 0.0
    for m in task.lora_modules:
        f = task.factors(m)
        u, _ = half.basis(m)
        assert u.dtype == torch.float32
        worst = max(worst, abs(half.similarity(m, f.A, f.B).rho - full.similarity(m, f.A, f.B).rho))
    assert 0.0 < worst < 3e-4  # measured 2.8e-5 (float16 keeps 11 significant bits)


def test_sketch_files_are_byte_identical_for_a_seed(pairs: dict[str, Path], tmp_path: Path) -> None:
    build(pairs, tmp_path / "one", rank=5, seed=7)
    build(pairs, tmp_path / "two", rank=5, seed=7)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["README.md", "subspace.json", "subspace.safetensors"]
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_fingerprint_mismatch_is_an_input_error(pairs: dict[str, Path], tmp_path: Path) -> None:
    sketch = build(pairs, tmp_path / "sk", rank=4)
    unaligned = Checkpoint(pairs["unaligned"])
    # same layout, so the header fingerprints agree: the content probe must tell them apart
    assert unaligned.fingerprint() == Checkpoint(pairs["aligned"]).fingerprint()
    with pytest.raises(InputError, match="fingerprint") as err:
        sketch.check_fingerprint(unaligned)
    assert sketch.meta["aligned"]["fingerprint"] in str(err.value)
    other = Checkpoint(pairs["gpt2_aligned"])
    with pytest.raises(InputError, match=other.fingerprint()):
        sketch.check_fingerprint(other)
    with pytest.warns(UserWarning, match="fingerprint"):
        assert sketch.check_fingerprint(other, ignore=True) is not None


def test_missing_module_names_it(pairs: dict[str, Path], tmp_path: Path) -> None:
    sketch = build(pairs, tmp_path / "sk", rank=4, modules=r"\.q_proj$")
    assert all(m.endswith("q_proj") for m in sketch.modules) and len(sketch.modules) == 3
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.v_proj"):
        sketch.require(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    with pytest.raises(InputError, match="not in the subspace sketch"):
        sketch.basis("model.layers.0.self_attn.v_proj")


def test_large_sketches_are_sharded(
    pairs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sub, "MAX_SHARD_BYTES", 20_000)  # q_proj at K = 32: 32·32·4 + 32·8 = 4352 bytes
    sharded = build(pairs, tmp_path / "sharded", rank=32)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"subspace-00001-of-{len(files):05d}.safetensors"
    monkeypatch.setattr(sub, "MAX_SHARD_BYTES", 2 * 10**9)
    single = build(pairs, tmp_path / "single", rank=32)
    assert sharded.modules == single.modules
    for m in single.modules:
        assert all(torch.equal(x, y) for x, y in zip(sharded.basis(m), single.basis(m), strict=True))


def test_layout_needs_config_json_or_the_option(pairs: dict[str, Path], tmp_path: Path) -> None:
    al = shutil.copytree(pairs["gpt2_aligned"], tmp_path / "al")
    (al / "config.json").unlink()
    cfg = {"aligned": str(al), "unaligned": str(pairs["gpt2_unaligned"]), "rank": 4}
    with pytest.raises(InputError, match="--layout"):
        subspace(SubspaceConfig(out=str(tmp_path / "sk"), **cfg))
    assert not (tmp_path / "sk").exists()
    subspace(SubspaceConfig(out=str(tmp_path / "sk"), layout="conv1d", **cfg))
    assert load_sketch(tmp_path / "sk").transposed


def test_adapter_names_with_a_base_model_prefix_resolve() -> None:
    sketch = Sketch(Path("x"), {"modules": {"h.0.attn.c_attn": {}}, "rank": 4})
    assert sketch.resolve("transformer.h.0.attn.c_attn") == "h.0.attn.c_attn"
    assert sketch.resolve("h.0.attn.c_attn") == "h.0.attn.c_attn"
    assert sketch.resolve("transformer.h.0.attn.c_at") is None  # never by substring


def test_load_sketch_refuses_bad_directories(pairs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"subspace\.json missing"):
        load_sketch(tmp_path)
    build(pairs, tmp_path / "sk", rank=2)
    meta_path = tmp_path / "sk" / "subspace.json"
    meta = json.loads(meta_path.read_text())
    for broken, message in [
        ({**meta, "format_version": 99}, "format version 99"),
        ({k: v for k, v in meta.items() if k != "layout"}, "keys layout"),
        ({**meta, "modules": {"x": {"rank": 2}}}, "module entries x"),
        ({**meta, "modules": []}, "modules"),
    ]:
        meta_path.write_text(json.dumps(broken))
        with pytest.raises(InputError, match=message):
            load_sketch(tmp_path / "sk")
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "sk" / "subspace.safetensors").unlink()
    with pytest.raises(InputError, match="does not exist"):
        load_sketch(tmp_path / "sk")


# --- the command line --------------------------------------------------------------------------------
def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": "300", "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def cli_args(pairs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["subspace", "-a", str(pairs["aligned"]), "-u", str(pairs["unaligned"]), "-o", str(out), *extra]


def test_cli_end_to_end(pairs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sk"
    code, text = invoke(cli_args(pairs, out, "--rank", "20"))
    assert code == 0, text
    assert "21 modules, K = 20 (6 clamped" in text and "on disk" in text
    meta = json.loads((out / "subspace.json").read_text())
    assert meta["rank"] == 20 and meta["seed"] == 0 and meta["layout"] == "linear"
    assert meta["aligned"]["path"] == str(pairs["aligned"]) and meta["aligned"]["revision"] is None
    assert meta["aligned"]["fingerprint"] == Checkpoint(pairs["aligned"]).fingerprint()
    assert meta["unaligned"]["fingerprint"] == Checkpoint(pairs["unaligned"]).fingerprint()
    q = meta["modules"]["model.layers.0.self_attn.q_proj"]
    k = meta["modules"]["model.layers.0.self_attn.k_proj"]
    assert q["shape"] == [32, 32] and q["rank"] == 20 and k["shape"] == [16, 32] and k["rank"] == 16
    assert 0.0 < q["energy"] < 1.0 and k["energy"] == pytest.approx(1.0)
    with safe_open(str(out / "subspace.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.U").dtype == torch.float32
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.S").dtype == torch.float64
        assert len(list(fh.keys())) == 2 * 21
    card = (out / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {pairs['aligned']}\n") and "top-20" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    # YAML + flags, and --force
    yaml_path = tmp_path / "cfg.yaml"
    yaml_path.write_text(
        f"aligned: {pairs['aligned']}\nunaligned: {pairs['unaligned']}\nrank: 3\nmodules: v_proj\n"
    )
    code, text = invoke(["subspace", str(yaml_path), "-o", str(out), "--force", "-q", "--u-dtype", "float16"])
    assert code == 0, text
    sketch = load_sketch(out)
    assert len(sketch.modules) == 3 and sketch.rank == 3 and sketch.meta["dtype"]["U"] == "float16"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rank", "0"], "rank"),
        (["--rank", "4", "--modules", "nothing_matches"], "matches no"),
        (["--rank", "4", "--modules", "(unclosed"], "regular expression"),
        (["--rank", "4", "--layout", "sideways"], "layout"),
        (["--rank", "4", "--u-dtype", "int8"], "u_dtype"),
        ([], "rank"),
    ],
)
def test_cli_bad_options_exit_2(
    pairs: dict[str, Path], tmp_path: Path, extra: list[str], message: str
) -> None:
    code, text = invoke(cli_args(pairs, tmp_path / "sk", *extra))
    assert code == 2 and message in text, text
    assert not (tmp_path / "sk").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_cuda_exits_2(pairs: dict[str, Path], tmp_path: Path) -> None:
    code, text = invoke(cli_args(pairs, tmp_path / "sk", "-k", "4", "--device", "cuda"))
    assert code == 2 and "CUDA" in text


def test_cli_missing_model_and_existing_out_exit_2(pairs: dict[str, Path], tmp_path: Path) -> None:
    code, text = invoke(["subspace", "-a", str(tmp_path / "nope"), "-u", str(pairs["unaligned"]),
                         "-o", str(tmp_path / "sk"), "-k", "4"])  # fmt: skip
    assert code == 2 and "nope" in text
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = invoke(cli_args(pairs, out, "-k", "4"))
    assert code == 2 and "--force" in text
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_pair_of_different_architectures_exit_2(pairs: dict[str, Path], tmp_path: Path) -> None:
    code, text = invoke(["subspace", "-a", str(pairs["aligned"]), "-u", str(pairs["gpt2_unaligned"]),
                         "-o", str(tmp_path / "sk"), "-k", "4"])  # fmt: skip
    assert code == 2 and "only one model" in text


# --- the benchmark scripts still run -----------------------------------------------------------------
def _script(name: str) -> Any:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_scripts_run_on_small_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    fid = _script("subspace_fidelity")
    cases = [fid.synthetic_case("m", 96, 64, 0.5, 4, seed=0)]
    rows = fid.score(cases, 0, (8, None))
    assert rows["full"].changed == 0 and max(rows["full"].errors) < 1e-6 and rows["8"].total == 4
    fid.print_table("t", rows)
    bench = _script("bench_subspace")
    bench.bench_rho([(128, 96)], 16, 1, 0)
    out = capsys.readouterr().out
    assert "| full |" in out and "| 128 × 96 |" in out
