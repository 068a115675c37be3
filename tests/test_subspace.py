"""Safety-subspace sketches (docs/subspace.md) against dense float64 oracles written here.

Oracles: ρ as docs/method.md §3 writes it (C = V Vᵀ / ‖V‖_F formed explicitly, float64), applied to the
full V (a full-rank sketch must match it) and to V truncated to its top-K by a float64 SVD computed in the
test (a rank-K sketch must match that). Bugs planted and seen to fail: the Conv1D weight not transposed,
S instead of S² as the weights, K not clamped to min(d_out, d_in) (docs/testing.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import edited_copy, pickle_copy, record_hub_downloads, save_adapter, save_pair
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.engine import subspace as sub
from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.criterion import Similarity
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
    assert names == [".safemerge-output", "README.md", "subspace.json", "subspace.safetensors"]
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
        (["--rank", "4", "--u-dtype", "int8"], "--u-dtype"),
        ([], "missing required option: --rank"),
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


# --- edge cases found by mutation testing (docs/testing.md) ----------------------------------------------
def test_degenerate_similarities_have_rho_zero_on_both_routes() -> None:
    """docs/method.md §3.3 through a sketch: the value *and* the reason, for the low-rank and the dense
    route alike — a zero update (ρ 0, "zero-update") before a zero V (ρ 0, "zero-V"), a sketch holding no
    direction at all (K = 0) counting as V = 0, and an update of norm below 1 not taken for a zero one."""
    u = torch.eye(4)[:, :2]
    s = torch.tensor([1.0, 0.5], dtype=torch.float64)
    s0 = torch.zeros(2, dtype=torch.float64)
    a, b0, small = torch.ones(1, 3), torch.zeros(4, 1), torch.full((4, 1), 0.1)  # ‖B A‖² = 0.12
    cases = [
        (u, s, b0, Similarity(0.0, "zero-update")),
        (u, s0, b0, Similarity(0.0, "zero-update")),  # both zero: the update's reason first
        (u, s0, small, Similarity(0.0, "zero-V")),
        (torch.zeros(4, 0), torch.zeros(0, dtype=torch.float64), small, Similarity(0.0, "zero-V")),
    ]
    for basis, values, b_, want in cases:
        assert sketch_similarity_lowrank(basis, values, a, b_) == want
        assert sketch_similarity_dense(basis, values, b_ @ a) == want


def test_finish_clamps_and_names_non_finite_values() -> None:
    """ρ from its three terms: a rounding excess above 1 is clamped to 1 (ρ is a cosine), a zero update is
    (0, "zero-update"), and NaN/Inf is refused with a message saying where it comes from."""
    assert sub._finish(1.0 + 1e-9, 1.0, 1.0) == Similarity(1.0)
    assert sub._finish(0.5, 1.0, 0.0) == Similarity(0.0, "zero-update")
    for bad in ((math.nan, 1.0, 1.0), (1.0, math.inf, 1.0), (1.0, 1.0, math.nan)):
        with pytest.raises(ValueError, match=r"^non-finite values in the sketch or in the update$"):
            sub._finish(*bad)


def test_basis_and_factor_shapes_are_checked_with_a_message() -> None:
    """A U, S or LoRA factor of the wrong shape or number of dimensions is refused, with the shapes named."""
    msg = r"^basis U \(4, 2\), S \(2, 1\) does not fit d_out = 4$"
    with pytest.raises(ValueError, match=msg):
        sub._check_basis(torch.zeros(4, 2), torch.zeros(2, 1), 4)  # S 2-D whose rows match U's columns
    with pytest.raises(ValueError, match=r"^basis U \(4, 2, 1\), S \(2,\) does not fit d_out = 4$"):
        sub._check_basis(torch.zeros(4, 2, 1), torch.zeros(2), 4)  # U 3-D, the rest fitting
    u, s = torch.eye(5)[:, :2], torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^A \(3, 6\) does not fit B \(5, 2\)$"):
        sketch_similarity_lowrank(u, s, torch.ones(3, 6), torch.ones(5, 2))


def test_float32_and_bfloat16_inputs_are_computed_in_float64() -> None:
    """The low-rank route works in float64 whatever the factors' and S's dtypes (float32 here): within
    1e-12 of a float64 oracle written here (measured: equal to the last bit; S or A taken in float32
    fails). The dense route takes a bfloat16 update and a float64 U as they come (X = Uᵀ ΔW in float32)."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64)).Q.float()
    s = torch.tensor([3.1, 2.3, 1.7, 0.9, 0.31, 0.07], dtype=torch.float32)
    a, b = torch.randn(5, 30, generator=g), torch.randn(40, 5, generator=g)
    dw = b.double() @ a.double()
    x = u.double().T @ dw  # X = Uᵀ ΔW, dense; ρ_K = ‖S X‖² / (‖S² X‖ ‖ΔW‖) (docs/subspace.md)
    s64 = s.double()[:, None]
    want = float((s64 * x).norm() ** 2 / ((s64**2 * x).norm() * dw.norm()))
    assert abs(sketch_similarity_lowrank(u, s, a, b).rho - want) < 1e-12
    bf = dw.to(torch.bfloat16)
    got = sketch_similarity_dense(u.double(), s.double(), bf)
    assert got.rho == pytest.approx(sketch_similarity_dense(u, s.double(), bf.float()).rho, abs=1e-7)


@pytest.mark.parametrize("scale", [1e-100, 1e100])
def test_rho_is_unchanged_by_the_scale_of_s(scale: float) -> None:
    """ρ is invariant to scaling V; S is divided by its largest value before S⁴ is formed, so singular
    values of 1e-100 (S⁴ underflows to 0) or 1e100 (overflows) give the ρ of S itself."""
    u = torch.eye(3)[:, :2]
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    a, b = torch.ones(1, 2), torch.tensor([[1.0], [1.0], [0.5]])
    want = sketch_similarity_lowrank(u, s, a, b).rho
    assert want == pytest.approx(10 / (math.sqrt(34) * math.sqrt(4.5)), abs=1e-12)  # by hand
    assert sketch_similarity_lowrank(u, s * scale, a, b).rho == pytest.approx(want, abs=1e-12)
    assert sketch_similarity_dense(u, s * scale, b @ a).rho == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_rho_is_unchanged_by_the_scale_of_the_update(scale: float) -> None:
    """ρ is invariant to scaling ΔW: a dense update of 1e-25 (its float32 squares underflow to 0: it must
    not read as a zero update) or 1e25 gives the ρ of the unscaled one, by hand 10 / (√34 · √4.5)."""
    u = torch.eye(3)[:, :2]
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    dw = torch.tensor([[1.0], [1.0], [0.5]]) @ torch.ones(1, 2)
    want = 10 / (math.sqrt(34) * math.sqrt(4.5))
    assert sketch_similarity_dense(u, s, dw * scale) == Similarity(pytest.approx(want, abs=1e-7))


def test_near_threshold_includes_its_boundary() -> None:
    """|ρ − τ| equal to the error is near the threshold (values exact in binary)."""
    assert near_threshold(0.75, 0.5, 0.25) and near_threshold(0.25, 0.5, 0.25)


def test_randomized_svd_draws_k_plus_oversample_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The randomised SVD's test matrix has K + OVERSAMPLE = K + 16 columns (Halko et al. 2011, Alg. 4.4),
    not one per dimension of V (which gives the same vectors at up to ~100 times the cost)."""
    shapes: list[tuple[int, ...]] = []
    randn = torch.randn

    def spy(*size: int, **kw: Any) -> torch.Tensor:
        shapes.append(size)
        return randn(*size, **kw)

    v = spectrum_matrix(1100, 1030, torch.linspace(5, 1, 40), seed=0)
    monkeypatch.setattr(torch, "randn", spy)
    u, s = sub._randomized_svd(v, 8, seed=1)
    assert shapes == [(1030, 8 + 16)] and u.shape == (1100, 8) and s.shape == (8,)


def test_shards_are_planned_greedily_up_to_the_limit() -> None:
    """`_plan_shards` by hand, with the 2 GB limit: a module that fills a shard exactly stays in it, one
    byte more opens the next; each new shard starts empty."""
    g = 10**9
    assert sub._plan_shards({"a": g, "b": g}) == {"a": "subspace.safetensors", "b": "subspace.safetensors"}
    two = {"a": "subspace-00001-of-00002.safetensors", "b": "subspace-00002-of-00002.safetensors"}
    assert sub._plan_shards({"a": g, "b": g + 1}) == two
    assert sub._plan_shards({"a": 3 * g // 2, "b": g}) == two
    three = sub._plan_shards({"a": 2 * g, "b": g, "c": g, "d": 1})
    assert three == {
        m: f"subspace-0000{i}-of-00003.safetensors" for m, i in zip("abcd", (1, 2, 2, 3), strict=True)
    }


@pytest.mark.parametrize("extra", [0, -1])
def test_shard_sizes_count_u_and_s_bytes(
    pairs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: int
) -> None:
    """A shard holds as many modules as fit: the up_proj modules (48 × 32, K = 4) hold U 48·4·4 and S 4·8
    bytes = 800 each (read back from the files here); with a limit of exactly two modules two share a
    shard, one byte less and each is alone."""
    size = 48 * 4 * 4 + 4 * 8
    monkeypatch.setattr(sub, "MAX_SHARD_BYTES", 2 * size + extra)
    sketch = build(pairs, tmp_path / "sk", rank=4, modules=r"up_proj$")
    per_file: dict[str, int] = {}
    for m in sketch.modules:
        u, s = sketch.basis(m)
        assert u.numel() * 4 + s.numel() * 8 == size
        f = sketch.meta["modules"][m]["file"]
        per_file[f] = per_file.get(f, 0) + 1
    assert sorted(per_file.values()) == ([1, 2] if extra == 0 else [1, 1, 1])


BIG_SIGMAS = torch.cat([torch.linspace(10, 3, 8), torch.linspace(1, 0.5, 40)])  # a gap after the top 8


def _big_pair(root: Path, same_v: bool) -> tuple[Path, Path]:
    """A two-layer 'model' whose q_proj weights are 1,040 × 1,040 (randomised-SVD size); with `same_v` both
    layers get the same V."""
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]
    vs = [spectrum_matrix(1040, 1040, BIG_SIGMAS, seed=i if not same_v else 0) for i in range(2)]
    dirs = []
    for label, weights in (("aligned", vs), ("unaligned", [torch.zeros_like(v) for v in vs])):
        d = root / label
        d.mkdir(parents=True)
        save_file(dict(zip(names, weights, strict=True)), str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
        dirs.append(d)
    return dirs[0], dirs[1]


def test_randomized_sketches_are_seeded_per_module(tmp_path: Path) -> None:
    """Modules wider than 1,024 get the randomised SVD, whose random matrix is drawn from the seed and
    the module's name (docs/subspace.md): `--seed` changes the files, the same seed reproduces them byte
    for byte, a module's sketch does not depend on which other modules are sketched, and two modules with
    the same V get different draws. Each U spans V's top-8 directions (checked against an exact SVD)."""
    al, un = _big_pair(tmp_path / "same", same_v=True)

    def run(name: str, **opts: Any) -> Path:
        out = tmp_path / name
        subspace(SubspaceConfig(aligned=str(al), unaligned=str(un), out=str(out), rank=8, **opts))
        return out / "subspace.safetensors"

    runs = [("s0", {}), ("s0b", {}), ("s1", {"seed": 1}), ("one", {"modules": r"layers\.1\."})]
    files = {name: run(name, **opts) for name, opts in runs}
    assert files["s0"].read_bytes() == files["s0b"].read_bytes()
    assert files["s0"].read_bytes() != files["s1"].read_bytes()
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj.U" for i in range(2))
    with safe_open(str(files["s0"]), "pt") as fh, safe_open(str(files["one"]), "pt") as one:
        u0, u1 = fh.get_tensor(q0), fh.get_tensor(q1)
        assert torch.equal(u1, one.get_tensor(q1))
    assert not torch.equal(u0, u1)
    exact = torch.linalg.svd(spectrum_matrix(1040, 1040, BIG_SIGMAS, seed=0).double())[0][:, :8]
    for u in (u0, u1):  # the projection of the exact top-8 onto the sketch's span keeps (almost) all of it
        assert float(torch.linalg.norm(u.double().T @ exact) ** 2) == pytest.approx(8.0, abs=1e-3)
    entries = json.loads((tmp_path / "s0" / "subspace.json").read_text())["modules"]
    assert {e["svd"] for e in entries.values()} == {"randomized"}


def test_load_sketch_messages_name_what_is_wrong(pairs: dict[str, Path], tmp_path: Path) -> None:
    """Each refusal of a broken sketch directory says exactly what is wrong (texts written here): invalid
    JSON, JSON that is not a sketch (a list, another format), the missing keys comma-separated, a
    `modules` that is missing (named once) or not a mapping, the first three malformed module entries, a
    file outside the directory, a tensor missing from its file."""
    d = tmp_path / "sk"
    build(pairs, d, rank=2)
    meta_path = d / "subspace.json"
    meta = json.loads(meta_path.read_text())
    mp = re.escape(str(meta_path))
    not_a_sketch = f"^{mp}: not a safemerge subspace sketch \\(format 'safemerge-subspace' expected\\)$"
    incomplete = f"^{mp}: incomplete subspace sketch metadata \\(missing or malformed "
    bad_entries = {m: {"rank": 2} for m in ("a", "b", "c", "d")}
    cases: list[tuple[str, str]] = [
        ("{", f"^{mp}: invalid JSON \\("),
        ("[1, 2]", not_a_sketch),
        (json.dumps({**meta, "format": "other"}), not_a_sketch),
        (json.dumps({k: v for k, v in meta.items() if k not in ("layout", "rank")}),
         incomplete + r"keys rank, layout\)$"),
        (json.dumps({k: v for k, v in meta.items() if k != "modules"}), incomplete + r"keys modules\)$"),
        (json.dumps({**meta, "modules": []}), incomplete + r"keys modules \(a mapping\)\)$"),
        (json.dumps({**meta, "modules": bad_entries}), incomplete + r"module entries a, b, c\)$"),
    ]  # fmt: skip
    for text, message in cases:
        meta_path.write_text(text)
        with pytest.raises(InputError, match=message):
            load_sketch(d)
    (tmp_path / "outside.safetensors").write_bytes((d / "subspace.safetensors").read_bytes())
    first = next(iter(meta["modules"]))
    outside = {**meta, "modules": {first: {**meta["modules"][first], "file": "../outside.safetensors"}}}
    meta_path.write_text(json.dumps(outside))
    with pytest.raises(
        InputError, match=f"^{mp} lists '../outside.safetensors' for {re.escape(first)}, but "
    ):
        load_sketch(d)
    save_file({f"{first}.U": torch.zeros(2, 2)}, str(d / "subspace.safetensors"))
    meta_path.write_text(json.dumps({**meta, "modules": {first: meta["modules"][first]}}))
    shard = re.escape(str(d / "subspace.safetensors"))
    want = f"^{shard} has no tensor {re.escape(first)}.S \\(listed in {mp}\\)$"
    with pytest.raises(InputError, match=want):
        load_sketch(d)


def _one_module_sketch(
    pairs: dict[str, Path], d: Path, u: torch.Tensor | None, s: torch.Tensor | None
) -> str:
    """A rank-2 sketch of the q_proj modules with the first module's U or S replaced; returns its name."""
    build(pairs, d, rank=2, modules=r"q_proj$")
    path = d / "subspace.safetensors"
    with safe_open(str(path), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    first = sorted(tensors)[0].removesuffix(".S").removesuffix(".U")
    tensors[f"{first}.U"] = tensors[f"{first}.U"] if u is None else u
    tensors[f"{first}.S"] = tensors[f"{first}.S"] if s is None else s
    save_file(tensors, str(path))
    return first


@pytest.mark.parametrize(
    ("u", "s", "message"),
    [
        (torch.zeros(32, 3), None, r"has U \(32, 3\), S \(2,\); subspace\.json says k=2$"),
        (None, torch.ones(3, dtype=torch.float64), r"has U \(32, 2\), S \(3,\); subspace\.json says k=2$"),
        (torch.full((32, 2), math.nan), None, r"has NaN or Inf$"),
        (None, torch.tensor([1.0, math.inf], dtype=torch.float64), r"has NaN or Inf$"),
    ],
)
def test_basis_refuses_tensors_of_the_wrong_shape_or_non_finite(
    pairs: dict[str, Path], tmp_path: Path, u: torch.Tensor | None, s: torch.Tensor | None, message: str
) -> None:
    """`Sketch.basis` checks U's and S's shapes against subspace.json, each on its own, and refuses NaN or
    Inf in either, naming the file and module."""
    name = _one_module_sketch(pairs, tmp_path / "sk", u, s)
    sketch = load_sketch(tmp_path / "sk")
    prefix = re.escape(str(tmp_path / "sk" / "subspace.safetensors")) + ": "
    with pytest.raises(InputError, match=prefix + ".*" + re.escape(name) + ".*" + message):
        sketch.basis(name)


def test_basis_names_a_file_it_cannot_read(pairs: dict[str, Path], tmp_path: Path) -> None:
    """A shard cut short after the sketch was opened: the error names the file and the module."""
    d = tmp_path / "sk"
    sketch = build(pairs, d, rank=2)
    path = d / "subspace.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    name = sketch.modules[-1]
    with pytest.raises(
        InputError, match=f"^{re.escape(str(path))}: cannot read the sketch of '{re.escape(name)}': "
    ):
        sketch.basis(name)


def test_fingerprint_messages_say_what_differs(pairs: dict[str, Path], tmp_path: Path) -> None:
    """Same layout, other content: the message names the probed weight and its recorded sha256, says the
    checkpoint's has another content and what that may mean; with `ignore` the same text is warned,
    attributed to the caller."""
    sketch = build(pairs, tmp_path / "sk", rank=2)
    probe, fp = sketch.meta["aligned"]["probe"], sketch.meta["aligned"]["fingerprint"]
    unaligned = Checkpoint(pairs["unaligned"])
    want = (
        f"the subspace sketch {tmp_path / 'sk'} was built from an aligned model with fingerprint {fp} with "
        f"{probe['key']} of sha256 {probe['sha256']}, but {pairs['unaligned']} has fingerprint {fp} with "
        f"{probe['key']} of another content"
    )
    with pytest.raises(InputError) as err:
        sketch.check_fingerprint(unaligned)
    assert str(err.value) == want + " (a different model, or a re-saved one)"
    with pytest.warns(UserWarning) as record:
        assert sketch.check_fingerprint(unaligned, ignore=True) == want
    assert [str(w.message) for w in record] == [want]
    # attributed to a caller (stacklevel 2), not to subspace.py; the exact frame is this file, or mutmut's
    # trampoline when run under mutation testing
    assert record[0].filename != sub.__file__


@pytest.mark.parametrize("n", [5, 6, 7])
def test_require_lists_five_missing_modules_then_counts(n: int) -> None:
    """Up to five missing modules are named, comma-separated; the rest are counted."""
    sketch = Sketch(Path("sk"), {"modules": {"kept": {}}, "rank": 2})
    missing = [f"m{i}" for i in range(n)]
    listed = "m0, m1, m2, m3, m4" + {5: "", 6: " and 1 more", 7: " and 2 more"}[n]
    want = (
        f"the subspace sketch sk has no module {listed}; rebuild it with `safemerge subspace` covering "
        "these modules (see its --modules)"
    )
    with pytest.raises(InputError) as err:
        sketch.require(["kept", *missing])
    assert str(err.value) == want


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_result_counts_the_sketched_weights_bytes(tmp_path: Path, dtype: torch.dtype) -> None:
    """The size `safemerge subspace` compares the sketch with: the sketched weights' bytes in both models
    (numel × element size, here from the files' tensors; the embeddings and norms are not sketched)."""
    al, un = save_pair(tmp_path, "llama", dtype)
    res = subspace(SubspaceConfig(aligned=str(al), unaligned=str(un), out=str(tmp_path / "sk"), rank=2))
    want = 0
    for d in (al, un):
        with safe_open(str(d / "model.safetensors"), "pt") as fh:
            want += sum(fh.get_tensor(k).nbytes for k in fh.keys() if k.endswith("proj.weight"))  # noqa: SIM118
    assert res.model_bytes == want and res.modules == 21


def test_subspace_json_holds_the_documented_fields(pairs: dict[str, Path], tmp_path: Path) -> None:
    """subspace.json as docs/subspace.md §3 lists it: the top-level keys and their values for a float16-U
    sketch of the q_proj modules (torch's version read here, the SVD settings of Halko et al. as
    documented), and per module the documented keys."""
    build(pairs, tmp_path / "sk", rank=3, modules=r"q_proj$", u_dtype="float16", seed=5)
    meta = json.loads((tmp_path / "sk" / "subspace.json").read_text())
    assert list(meta) == ["format", "format_version", "safemerge_version", "torch_version", "aligned",
                          "unaligned", "rank", "seed", "modules_regex", "layout", "device", "dtype", "svd",
                          "modules"]  # fmt: skip
    assert meta["torch_version"] == torch.__version__ and meta["modules_regex"] == "q_proj$"
    assert (meta["rank"], meta["seed"], meta["layout"], meta["device"]) == (3, 5, "linear", "cpu")
    assert meta["dtype"] == {"U": "float16", "S": "float64"}
    assert meta["svd"] == {"oversample": 16, "power_iterations": 4, "exact_max_dim": 1024}
    assert list(meta["aligned"]) == ["path", "revision", "fingerprint", "probe"]
    for entry in meta["modules"].values():
        assert list(entry) == ["key", "shape", "rank", "svd", "frobenius", "energy", "file"]


def test_sketch_card_text(tmp_path: Path) -> None:
    """The sketch's README.md for a hand-made metadata, every line written here: front matter, the
    clamped-module note only when a module holds fewer than K directions, the energy range."""
    meta = {
        "rank": 4, "seed": 1, "layout": "linear", "safemerge_version": "9.9",
        "aligned": {"path": "org/al", "fingerprint": "a" * 64},
        "unaligned": {"path": "org/un", "fingerprint": "b" * 64},
        "dtype": {"U": "float32", "S": "float64"},
        "modules": {"m1": {"rank": 4, "energy": 0.5}, "m2": {"rank": 2, "energy": 0.25},
                    "m3": {"rank": 4, "energy": 1.0}},
    }  # fmt: skip
    want = """---
base_model: org/al
tags:
- safemerge
- safety
---

# SafeMERGE safety-subspace sketch

The top-4 left singular vectors and singular values of V = W_aligned − W_unaligned for
3 modules, made by [safemerge](https://arxiv.org/abs/2503.17239) `subspace` (version
9.9, seed 1, layout `linear`, 1 modules clamped to min(d_out, d_in)).

- aligned: `org/al` (fingerprint `aaaaaaaaaaaaaaaa…`)
- unaligned: `org/un` (fingerprint `bbbbbbbbbbbbbbbb…`)
- share of ‖V‖²_F kept per module: 0.2500 (lowest) to 1.0000 (highest)

It stands in for the model pair when computing SafeMERGE's similarity ρ (`safemerge scan --subspace DIR`):
it holds C = V Vᵀ / ‖V‖_F up to its top-4 directions, so ρ of a LoRA needs neither model.
How close ρ from a sketch stays to the exact ρ, and where a sketch is not safe to use, is in
safemerge's docs/subspace.md. Per module: `subspace.json`; tensors
`<module>.U` (d_out × K, float32) and `<module>.S` (K, float64) in the safetensors files.
"""
    assert sub.sketch_card(meta) == want
    meta["modules"]["m2"]["rank"] = 4
    assert sub.sketch_card(meta) == want.replace(", 1 modules clamped to min(d_out, d_in)", "")


def _names_ckpt(d: Path, names: list[str], shape: tuple[int, ...] = (4, 4)) -> Checkpoint:
    """A checkpoint holding a zero weight of `shape` under each name (plus a 1-D norm weight)."""
    d.mkdir()
    tensors = {n: torch.zeros(shape) for n in names} | {"model.norm.weight": torch.zeros(4)}
    save_file(tensors, str(d / "model.safetensors"))
    return Checkpoint(d)


def test_discover_modules_orders_naturally_and_words_its_refusals(tmp_path: Path) -> None:
    """Modules come in natural order (layers.2 before layers.10) and each refusal says what is wrong, in
    words written here: the first five modules present in one model only (natural order, then "..."),
    no projection at all (with and without a regex), and a shape that differs between the models."""
    q = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(12)]
    al = _names_ckpt(tmp_path / "al", q)
    found = sub.discover_modules(al, _names_ckpt(tmp_path / "un", q), None)
    assert list(found) == [n.removesuffix(".weight") for n in q]
    cases = [(q[:7], ""), (q[:6], " ..."), (q[:7] + q[8:], "")]  # 5, 6 and 1 modules missing
    for i, (names, more) in enumerate(cases):
        missing = [n.removesuffix(".weight") for n in q if n not in names]
        with pytest.raises(InputError) as err:
            sub.discover_modules(al, _names_ckpt(tmp_path / f"part{i}", names), None)
        where = f" (aligned {al.directory}, unaligned {tmp_path / f'part{i}'})"
        assert str(err.value) == f"modules present in only one model: {', '.join(missing[:5])}{more}{where}"
    none = _names_ckpt(tmp_path / "none", ["model.embed_tokens.weight"])
    tail = f" attention/MLP projection weights in {none.directory} "
    tail += "(q/k/v/o/gate/up/down_proj, c_attn/c_proj/c_fc)"
    with pytest.raises(InputError) as err:
        sub.discover_modules(none, none, None)
    assert str(err.value) == "no" + tail
    with pytest.raises(InputError) as err:
        sub.discover_modules(none, none, "q_proj")
    assert str(err.value) == "the regex 'q_proj' matches no" + tail
    wide = _names_ckpt(tmp_path / "wide", q, shape=(4, 5))
    with pytest.raises(InputError) as err:
        sub.discover_modules(al, wide, None)
    want = f"{q[0]}: aligned shape (4, 4) ({al.directory}) differs from unaligned shape (4, 5) "
    want += f"({wide.directory})"
    assert str(err.value) == want


def test_sketch_matrix_refuses_a_rank_below_one() -> None:
    with pytest.raises(ValueError, match=r"^rank must be ≥ 1, got 0$"):
        sub.sketch_matrix(torch.ones(3, 3), 0, seed=0)


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` is CUDA when torch sees one and the CPU otherwise; `cuda` without one is refused in words."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sub._device("auto") == torch.device("cpu") and sub._device("cpu") == torch.device("cpu")
    with pytest.raises(InputError) as err:
        sub._device("cuda")
    assert str(err.value) == "--device cuda was asked for, but torch sees no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sub._device("auto") == torch.device("cuda")


def test_layout_names_an_invalid_config_json(pairs: dict[str, Path], tmp_path: Path) -> None:
    al = shutil.copytree(pairs["aligned"], tmp_path / "al")
    (al / "config.json").write_text("{")
    with pytest.raises(InputError, match=f"^{re.escape(str(al / 'config.json'))}: invalid JSON \\("):
        sub._layout(Checkpoint(al), "auto")


def test_pickle_pair_and_the_checkpoints_labels(pairs: dict[str, Path], tmp_path: Path) -> None:
    """A pickle-only pair is sketched with allow_pickle (byte-identical U and S to the safetensors pair),
    and an error in either model names it as the aligned or the unaligned checkpoint."""
    al, un = pickle_copy(pairs["aligned"], tmp_path / "al"), pickle_copy(pairs["unaligned"], tmp_path / "un")
    opts = {"rank": 3, "modules": "q_proj$"}
    subspace(
        SubspaceConfig(aligned=str(al), unaligned=str(un), out=str(tmp_path / "p"), allow_pickle=True, **opts)
    )
    build(pairs, tmp_path / "s", **opts)
    assert (tmp_path / "p" / "subspace.safetensors").read_bytes() == (
        tmp_path / "s" / "subspace.safetensors"
    ).read_bytes()
    key = "model.layers.0.self_attn.q_proj.weight"
    for label in ("aligned", "unaligned"):
        bad = edited_copy(pairs[label], tmp_path / f"bad-{label}", lambda t: t[key].fill_(math.nan))
        paths = {"aligned": str(pairs["aligned"]), "unaligned": str(pairs["unaligned"]), label: str(bad)}
        with pytest.raises(InputError) as err:
            subspace(SubspaceConfig(out=str(tmp_path / f"o-{label}"), **paths, **opts))
        assert str(err.value) == f"tensor {key!r} of the {label} checkpoint {bad} has NaN or Inf"


def test_result_and_json_text(pairs: dict[str, Path], tmp_path: Path) -> None:
    """`subspace()` returns where it wrote and how long it took (between 0 and the wall time measured
    here); subspace.json is indented by two spaces and ends with a newline; both models' probes are
    the sha256 of their first sketched weight."""
    import time

    out = tmp_path / "sk"
    start = time.perf_counter()
    res = subspace(
        SubspaceConfig(aligned=str(pairs["aligned"]), unaligned=str(pairs["unaligned"]), out=str(out), rank=2)
    )
    wall = time.perf_counter() - start
    assert res.out == out and 0 < res.seconds <= wall
    text = (out / "subspace.json").read_text()
    assert text.startswith(
        '{\n  "format": "safemerge-subspace",\n  "format_version": 1,\n'
    ) and text.endswith("}\n")
    meta = json.loads(text)
    first = next(iter(meta["modules"].values()))["key"]
    for label in ("aligned", "unaligned"):
        raw = Checkpoint(pairs[label]).get(first)
        h = hashlib.sha256(f"{raw.dtype}{tuple(raw.shape)}".encode() + raw.contiguous().numpy().tobytes())
        assert meta[label]["probe"] == {"key": first, "sha256": h.hexdigest()}


def test_sketch_matrix_exact_below_and_at_the_limits() -> None:
    """The exact SVD is used up to min(d_out, d_in) = 1,024 and whenever K + 16 reaches it; U is float32,
    S float64; the energy of V = 0 is 1, of a small V (‖V‖ < 1) its true share, and never above 1 (a
    full-rank sketch whose Σσ² exceeds ‖V‖² by rounding: 1 + 4e-16 for this V)."""
    g = torch.Generator().manual_seed(1)
    assert sub.sketch_matrix(torch.randn(1100, 1024, generator=g), 4, seed=0).method == "exact"
    assert (
        sub.sketch_matrix(torch.randn(1040, 1030, generator=g), 1014, seed=0).method == "exact"
    )  # K + 16 = n
    sk = sub.sketch_matrix(torch.randn(7, 5, generator=torch.Generator().manual_seed(1)), 5, seed=0)
    assert sk.energy == 1.0 and sk.u.dtype == torch.float32 and sk.s.dtype == torch.float64
    zero = sub.sketch_matrix(torch.zeros(4, 3), 2, seed=0)
    assert zero.energy == 1.0 and zero.frobenius == 0.0
    small = sub.sketch_matrix(torch.diag(torch.tensor([0.3, 0.4])), 1, seed=0)  # ‖V‖² = 0.25
    assert small.energy == pytest.approx(0.16 / 0.25, abs=1e-7)


def test_hub_pickle_pair_fetches_the_pickle_files(
    pairs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub pair with allow_pickle asks the hub for the pickle files too (`*.bin`, `*.pt`), without it
    for safetensors only; `snapshot_download` is replaced by a recorder serving the local pair."""
    asked = record_hub_downloads(monkeypatch, pairs)
    for allow in (False, True):
        out = tmp_path / f"sk-{allow}"
        subspace(SubspaceConfig(aligned="org/aligned", unaligned="org/unaligned", out=str(out), rank=2,
                                modules="q_proj$", allow_pickle=allow))  # fmt: skip
    assert ["*.bin" in p and "*.pt" in p for p in asked] == [False, False, True, True]


def test_sketch_shards_carry_the_pytorch_format_metadata(pairs: dict[str, Path], tmp_path: Path) -> None:
    """Each shard's safetensors header says `format: pt`, as transformers' own files do."""
    build(pairs, tmp_path / "sk", rank=2)
    with safe_open(str(tmp_path / "sk" / "subspace.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
