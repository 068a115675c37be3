"""Full fine-tunes (`--task-model`, `--safety-model`; docs/method.md §3.7, docs/engine.md).

Oracles: ρ from a dense float64 C = V Vᵀ / ‖V‖_F written here; the module set and the weight layout from
the transformers model itself (nn.Linear vs Conv1D); ΔW_s of a safety LoRA from PEFT's own
`get_delta_weight`; merged weights from the formula evaluated here in float64; untouched tensors compared
byte for byte with the task model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import edited_copy, save_adapter, save_pair
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.defenses import DefendConfig, defend, get_defense
from safemerge.engine.config import MergeConfig, ScanConfig
from safemerge.engine.criterion import update_route, update_similarity
from safemerge.engine.pipeline import merge, scan

F64 = torch.float64
PROJ = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "c_attn",
    "c_proj",
    "c_fc",
}


# --- builders ----------------------------------------------------------------------------------------
def save_finetune(
    base: Path, out: Path, seed: int, scale: float = 0.03, dtype: torch.dtype = torch.float32, shard: str = ""
) -> Path:
    """A 'full fine-tune' of `base`: every parameter moved by seeded noise, saved like a trained model."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.to(dtype).save_pretrained(out, **kwargs)
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (all shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def layouts(base: Path) -> dict[str, bool]:
    """The projections of the transformers model: module name → stored transposed (Conv1D)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return {
        name: isinstance(mod, Conv1D)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear | Conv1D) and name.rsplit(".", 1)[-1] in PROJ
    }


def dense_rho(v: torch.Tensor, d: torch.Tensor) -> float:
    """ρ as docs/method.md §3.1 writes it, in float64, with C formed densely (d_out × d_out)."""
    v, d = v.to(F64), d.to(F64)
    c = (v @ v.T) / torch.linalg.vector_norm(v)
    cd = c @ d
    return float((cd * d).sum() / (torch.linalg.vector_norm(cd) * torch.linalg.vector_norm(d)))


def oriented(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A stored weight in the d_out × d_in layout of nn.Linear."""
    return (w.T if transposed else w).to(F64)


def peft_safety_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW_s per module as PEFT computes it (in the base weight's stored layout)."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    prefix = "base_model.model."
    return {
        n[len(prefix) :]: m.get_delta_weight("default").detach().to(F64)
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per architecture: aligned / unaligned pair, a task and a safety full fine-tune, a safety LoRA on
    every projection type the architecture has."""
    root = tmp_path_factory.mktemp("fullft")
    envs = {}
    for arch, targets, kw in (
        ("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {}),
        ("qwen2", ["q_proj", "v_proj", "down_proj"], {}),
        ("gpt2", ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
    ):
        d = root / arch
        al, un = save_pair(d, arch, torch.float32)
        envs[arch] = {
            "aligned": al,
            "unaligned": un,
            "task": save_finetune(al, d / "task", seed=11, shard="60KB"),
            "safety_model": save_finetune(al, d / "safety_model", seed=12, scale=0.02),
            "safety": save_adapter(al, d / "safety", seed=3, r=4, alpha=8, targets=targets, arch=arch, **kw),
        }
    return envs


def merge_cfg(env: dict[str, Path], out: Path, safety: str = "adapter", **kw: object) -> MergeConfig:
    key = {"adapter": "safety_adapter", "model": "safety_model"}[safety]
    src = env["safety" if safety == "adapter" else "safety_model"]
    return MergeConfig.from_flat(
        aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_model=str(env["task"]),
        out=str(out), plot=False, **{key: str(src)}, **kw,
    )  # fmt: skip


# --- ρ -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_rho_of_a_full_finetune_matches_the_dense_reference(setups: dict, arch: str) -> None:
    env = setups[arch]
    report = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(env["unaligned"]),
                                       task_model=str(env["task"]), plot=False))  # fmt: skip
    layout = layouts(env["aligned"])
    assert [m.name for m in report.modules] == sorted(layout, key=_natural)  # every projection, by name
    al, un, ft = (tensors(env[k]) for k in ("aligned", "unaligned", "task"))
    for m in report.modules:
        key, flip = m.name + ".weight", layout[m.name]
        v = oriented(al[key], flip) - oriented(un[key], flip)
        d = oriented(ft[key], flip) - oriented(al[key], flip)
        assert abs(m.rho - dense_rho(v, d)) < 1e-7, m.name
        assert m.shape == tuple(d.shape) and m.rank_task is None
        assert abs(m.delta_norm_in - float(torch.linalg.vector_norm(d))) < 1e-6 * m.delta_norm_in
        assert m.route == ("input" if d.shape[1] <= d.shape[0] else "output")


def _natural(name: str) -> list[object]:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@pytest.mark.parametrize("shape", [(24, 9), (9, 24), (16, 16)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("route", ["input", "output"])
def test_both_routes_match_the_dense_reference(shape: tuple[int, int], transposed: bool, route: str) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + transposed)
    un = torch.randn(shape, generator=gen)
    al = (un + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    ft = (al.float() + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    sim, norm = update_similarity(al, un.to(torch.bfloat16), ft, transposed, block_rows=4, route=route)
    v = oriented(al, transposed) - oriented(un.to(torch.bfloat16), transposed)
    d = oriented(ft, transposed) - oriented(al, transposed)
    assert abs(sim.rho - dense_rho(v, d)) < 1e-7
    assert abs(norm - float(torch.linalg.vector_norm(d))) < 1e-6 * norm


def test_the_cheaper_route_is_chosen_by_the_smaller_side() -> None:
    # V(VᵀΔW) costs 2·d_out·d_in², (VVᵀ)ΔW 2·d_out²·d_in (docs/engine.md)
    assert update_route(11008, 4096) == "input" and update_route(4096, 4096) == "input"
    assert update_route(4096, 11008) == "output"


def test_degenerate_updates_are_flagged() -> None:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    sim, norm = update_similarity(w + 1, w, w + 1)  # ΔW = 0
    assert (sim.rho, sim.degenerate, norm) == (0.0, "zero-update", 0.0)
    assert update_similarity(w, w, w + 1)[0].degenerate == "zero-V"
    w = torch.arange(30.0).reshape(6, 5)  # integers: every difference below is exact
    v = torch.zeros(6, 5)
    v[0] = 1.0  # V = e_0 1ᵀ and ΔW = e_1 1ᵀ: the columns of ΔW are orthogonal to V's, so VᵀΔW = 0
    d = torch.zeros(6, 5)
    d[1] = 1.0
    assert update_similarity(w + v, w, w + v + d)[0].degenerate == "orthogonal"


# --- merge -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # qwen2: q/k/v biases stay the task's
@pytest.mark.parametrize("safety", ["adapter", "model"])
def test_merge_follows_the_formula_and_keeps_every_other_tensor(
    setups: dict, tmp_path: Path, arch: str, safety: str
) -> None:
    env = setups[arch]
    out = tmp_path / "out"
    partial = {"allow_partial": True} if safety == "adapter" else {}  # the q/v safety LoRA: a partial merge
    report = merge(
        merge_cfg(
            env,
            out,
            safety,
            fraction=0.5,
            weights=(0.7, 0.4),
            allow_any_weights=True,
            max_shard_size="50KB",
            **partial,
        )
    )
    chosen = {m.name for m in report.modules if m.selected}
    al, ft, got = tensors(env["aligned"]), tensors(env["task"]), tensors(out)
    if safety == "adapter":
        ds = peft_safety_deltas(env["aligned"], env["safety"])
        kept = {m.name for m in report.modules if "no-safety-counterpart" in m.flags}
        assert kept == chosen - set(ds) and not any(m.merged for m in report.modules if m.name in kept)
        chosen -= kept
    else:
        sm = tensors(env["safety_model"])
        ds = {m: sm[m + ".weight"].to(F64) - al[m + ".weight"].to(F64) for m in chosen}
    assert set(got) == set(ft)
    assert len(chosen) > 0 and chosen == {m.name for m in report.modules if m.merged}
    if arch == "qwen2":
        assert any(k.endswith("q_proj.bias") for k in ft)
    for key, t in ft.items():
        module = key.removesuffix(".weight")
        if module in chosen:
            want = al[key].to(F64) + 0.7 * (t.to(F64) - al[key].to(F64)) + 0.4 * ds[module]
            torch.testing.assert_close(got[key].to(F64), want, rtol=0, atol=1e-6)
        else:  # the task model's tensor, bit for bit
            assert got[key].dtype == t.dtype and got[key].numpy().tobytes() == t.numpy().tobytes(), key
    assert (out / "model.safetensors.index.json").exists() and (out / "config.json").exists()
    assert (out / "config.json").read_bytes() == (env["task"] / "config.json").read_bytes()
    AutoModelForCausalLM.from_pretrained(out)  # loads as a model


def test_merge_keeps_the_task_dtype_and_merged_records(setups: dict, tmp_path: Path) -> None:
    env = dict(setups["llama"])
    env["task"] = save_finetune(env["aligned"], tmp_path / "task16", seed=5, dtype=torch.bfloat16)
    report = merge(merge_cfg(env, tmp_path / "out", threshold=1.0))
    got = tensors(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    al = tensors(env["aligned"])
    for m in report.modules:
        assert m.merged and (m.w_task, m.w_safety) == (0.8, 0.2)
        change = got[m.name + ".weight"].to(F64) - al[m.name + ".weight"].to(F64)
        assert m.delta_norm_out == pytest.approx(float(torch.linalg.vector_norm(change)), rel=1e-12)
    data = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert data["inputs"]["task_model"]["path"] == str(env["task"])
    assert data["modules"][0]["rank_task"] is None and "route" in data["modules"][0]


def test_modules_regex_narrows_the_scan(setups: dict) -> None:
    env = setups["llama"]
    report = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(env["unaligned"]),
                                       task_model=str(env["task"]), modules=r"layers\.1\..*(q|v)_proj",
                                       plot=False))  # fmt: skip
    assert [m.name for m in report.modules] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_ties_on_a_full_finetune_is_the_dense_operator(setups: dict, tmp_path: Path) -> None:
    from peft.utils.merge_utils import ties

    env = setups["llama"]
    report = merge(merge_cfg(env, tmp_path / "out", "model", top_k=2, method="ties", density=0.5))
    al, ft, sm, got = (
        tensors(p) for p in (env["aligned"], env["task"], env["safety_model"], tmp_path / "out")
    )
    for m in (m for m in report.modules if m.selected):
        key = m.name + ".weight"
        dt, ds = ft[key] - al[key], sm[key] - al[key]
        want = al[key] + ties([dt, ds], torch.tensor([0.8, 0.2]), 0.5, "total")
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6)


# --- defences ----------------------------------------------------------------------------------------
def defend_cfg(env: dict[str, Path], out: Path, method: str, **kw: object) -> DefendConfig:
    return DefendConfig.model_validate(
        {"method": method, "aligned": str(env["aligned"]), "unaligned": str(env["unaligned"]),
         "task_model": str(env["task"]), "out": str(out), "plot": False, **kw}
    )  # fmt: skip


def test_defend_safemerge_equals_merge_and_merge_all_merges_everything(setups: dict, tmp_path: Path) -> None:
    env = setups["qwen2"]
    merge(merge_cfg(env, tmp_path / "m", top_k=2, allow_partial=True))  # the q/v safety LoRA lacks gate/up
    res = defend(defend_cfg(env, tmp_path / "d", "safemerge", top_k=2, safety_adapter=str(env["safety"]),
                            allow_partial=True))  # fmt: skip
    assert res.kind == "model" and res.model_dir == tmp_path / "d"
    for f in (tmp_path / "m").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "d" / f.name).read_bytes()
    res = defend(defend_cfg(env, tmp_path / "all", "merge-all", safety_model=str(env["safety_model"])))
    assert res.modified == len(res.report.modules) > 0
    # the resolved defense.yaml reruns it (task_model and safety_model are in it)
    rerun = ["defend", str(tmp_path / "all" / "defense.yaml"), "--out", str(tmp_path / "again"), "-q"]
    code, text = invoke(rerun)
    assert code == 0, text
    for f in (tmp_path / "all").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("preserve_norm", [False, True])
def test_safelora_projects_the_dense_update(
    setups: dict, tmp_path: Path, arch: str, preserve_norm: bool
) -> None:
    env = setups[arch]
    res = defend(defend_cfg(env, tmp_path / "out", "safelora", top_k=3, preserve_norm=preserve_norm))
    chosen = {m.name for m in res.report.modules if m.selected}
    assert len(chosen) == 3 and res.modified == 3 and res.kind == "model"
    layout = layouts(env["aligned"])
    al, un, ft, got = (tensors(p) for p in (env["aligned"], env["unaligned"], env["task"], tmp_path / "out"))
    for key, t in ft.items():
        module = key.removesuffix(".weight")
        if module not in chosen:
            assert got[key].numpy().tobytes() == t.numpy().tobytes(), key
            continue
        flip = layout[module]
        v = oriented(al[key], flip) - oriented(un[key], flip)
        d = oriented(t, flip) - oriented(al[key], flip)
        cd = (v @ v.T) / torch.linalg.vector_norm(v) @ d  # dense C, formed here
        if preserve_norm:
            cd = cd * torch.linalg.vector_norm(d) / torch.linalg.vector_norm(cd)
        want = al[key].to(F64) + (cd.T if flip else cd)
        torch.testing.assert_close(got[key].to(F64), want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dare", [False, True])
def test_resta_adds_beta_v_to_the_task_model(setups: dict, tmp_path: Path, dare: bool) -> None:
    env = setups["llama"]
    kw = {"dare": True, "density": 0.5, "seed": 1} if dare else {}
    res = defend(defend_cfg(env, tmp_path / "out", "resta", beta=0.5, **kw))
    al, un, ft, got = (tensors(p) for p in (env["aligned"], env["unaligned"], env["task"], tmp_path / "out"))
    scanned = {m.name + ".weight" for m in res.report.modules}
    for key, t in ft.items():
        linear = t.dim() == 2 and not any(s in key for s in ("embed", "lm_head", "norm"))
        if not linear:
            assert got[key].numpy().tobytes() == t.numpy().tobytes(), key
            continue
        bv = 0.5 * (al[key].to(F64) - un[key].to(F64))
        if dare and key in scanned:  # each entry of ΔW_f dropped or scaled by 1/p
            kept = got[key].to(F64) - al[key].to(F64) - bv
            dt = t.to(F64) - al[key].to(F64)
            dropped, scaled = kept.abs() < 1e-5, (kept - dt / 0.5).abs() < 1e-5
            assert bool((dropped | scaled).all()) and 0.3 < float(dropped.double().mean()) < 0.7
        else:
            torch.testing.assert_close(got[key].to(F64), t.to(F64) + bv, rtol=0, atol=1e-6)


def test_none_passes_the_task_model_through(setups: dict, tmp_path: Path) -> None:
    env = setups["llama"]
    res = defend(defend_cfg(env, tmp_path / "out", "none"))
    assert res.kind == "model" and res.modified == 0
    for f in env["task"].iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


# --- the command line: bad input, determinism ----------------------------------------------------
def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def base_args(env: dict[str, Path], command: str = "merge") -> list[str]:
    return [command, "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "--no-plot"]


def assert_exit_2(args: list[str], out: Path, *needles: str) -> None:
    code, text = invoke([*args, "--out", str(out)])
    assert code == 2, text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, (needle, text)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_inputs_exit_2_without_output(setups: dict, tmp_path: Path) -> None:
    env = setups["llama"]
    task, safety = ["--task-model", str(env["task"])], ["--safety-model", str(env["safety_model"])]
    out = tmp_path / "out"
    key = "model.layers.1.mlp.up_proj.weight"
    renamed = edited_copy(
        env["safety_model"], tmp_path / "renamed", lambda t: t.update({key + "_x": t.pop(key)})
    )
    reshaped = edited_copy(env["safety_model"], tmp_path / "reshaped", lambda t: t.update({key: t[key][:-1]}))
    args = base_args(env)
    assert_exit_2([*args, "--task-model", str(renamed), *safety], out, key, "task model")
    assert_exit_2([*args, "--task-model", str(reshaped), *safety], out, key, "shape")
    assert_exit_2([*args, *task, "--safety-model", str(reshaped)], out, key, "safety model")
    assert_exit_2([*args, *task, "-t", str(env["safety"]), *safety], out, "exactly one of --task-adapter")
    assert_exit_2([*args, *task, *safety, "-s", str(env["safety"])], out, "exactly one of --safety-adapter")
    assert_exit_2([*args, *task], out, "missing required option: --safety-adapter or --safety-model")
    assert_exit_2([*args, *task, *safety, "--modules", "("], out, "--modules")
    assert_exit_2([*args, *task, *safety, "--modules", "nothing_matches"], out, "no linear-layer weights")
    assert_exit_2([*args, *task, *safety, "--mode", "peft-linear"], out, "peft-linear")
    assert_exit_2(
        [*args, *task, *safety, "--merge-into-base"], out, "--merge-into-base does not apply to --task-model"
    )
    defend_args = base_args(env, "defend")
    assert_exit_2([*defend_args, *task, "-m", "safemerge"], out, "needs --safety-adapter or --safety-model")
    assert_exit_2([*defend_args, *task, *safety, "-s", str(env["safety"])], out, "not both")
    assert_exit_2([*defend_args, *task, "-m", "resta", *safety], out, "--safety-model do not apply")


def test_a_defence_without_full_finetune_support_says_so(
    setups: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(get_defense("none"), "full_finetune", False)
    env = setups["llama"]
    args = [*base_args(env, "defend"), "-m", "none", "--task-model", str(env["task"])]
    assert_exit_2(args, tmp_path / "out", "method none takes a task LoRA only")


def test_two_runs_are_byte_identical(setups: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = setups["gpt2"]
    args = [*base_args(env), "--task-model", str(env["task"]), "-s", str(env["safety"]), "--plot", "--top-k",
            "3", "--method", "dare_ties", "--max-shard-size", "40KB", "--quiet", "--out", "out"]  # fmt: skip
    trees = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        code, text = invoke(args)
        assert code == 0, text
        here = f"{(tmp_path / run).resolve()}/".encode()  # safemerge.yaml records absolute paths
        trees.append(
            {p.name: p.read_bytes().replace(here, b"") for p in sorted((tmp_path / run / "out").iterdir())}
        )
    assert trees[0] == trees[1] and "similarity.png" in trees[0] and "safemerge.yaml" in trees[0]
    assert len([n for n in trees[0] if n.endswith(".safetensors")]) > 1
    # the resolved config reruns the same merge
    monkeypatch.chdir(tmp_path / "a")
    code, text = invoke(["merge", "out/safemerge.yaml", "--out", "again", "--quiet"])
    assert code == 0, text
    for name, data in trees[0].items():
        if name.endswith(".safetensors"):
            assert (tmp_path / "a" / "again" / name).read_bytes() == data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scan_matches_cpu(setups: dict) -> None:
    env = setups["gpt2"]
    kw = {"aligned": str(env["aligned"]), "unaligned": str(env["unaligned"]), "task_model": str(env["task"])}
    cpu = scan(ScanConfig.from_flat(**kw, plot=False))
    gpu = scan(ScanConfig.from_flat(**kw, plot=False, device="cuda"))
    for a, b in zip(cpu.modules, gpu.modules, strict=True):
        assert abs(a.rho - b.rho) < 1e-7 and a.selected == b.selected


# --- --subspace: ρ from a sketch of V (engine/subspace.py) -------------------------------------------
@pytest.fixture(scope="module")
def sketched(setups: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The llama setup with a task LoRA, a full-rank sketch of V and one holding only q_proj."""
    from safemerge.engine.subspace import SubspaceConfig, subspace

    root = tmp_path_factory.mktemp("sketch")
    env = dict(setups["llama"])
    env["task_adapter"] = save_adapter(env["aligned"], root / "task_lora", seed=7, r=4, alpha=8)
    pair = {"aligned": str(env["aligned"]), "unaligned": str(env["unaligned"])}
    subspace(SubspaceConfig(**pair, rank=64, out=str(root / "full")))  # ≥ min(d_out, d_in): exact
    subspace(SubspaceConfig(**pair, rank=64, out=str(root / "q_only"), modules="q_proj"))
    subspace(SubspaceConfig(**pair, rank=2, out=str(root / "rank2")))
    env["sketch"], env["sketch_q"], env["sketch_2"] = root / "full", root / "q_only", root / "rank2"
    return env


def report_of(args: list[str], out: Path) -> dict:
    code, text = invoke([*args, "--out", str(out), "--quiet", "--no-plot"])
    assert code == 0, text
    return dict(json.loads((out / "safemerge_report.json").read_text()))


def test_full_rank_sketch_gives_the_exact_rho_through_the_cli(sketched: dict, tmp_path: Path) -> None:
    env = sketched
    lora = ["scan", "-t", str(env["task_adapter"])]
    exact = report_of([*lora, "-a", str(env["aligned"]), "-u", str(env["unaligned"])], tmp_path / "exact")
    sk = report_of([*lora, "--subspace", str(env["sketch"])], tmp_path / "sk")  # no base model at all
    assert "aligned" not in sk["inputs"] and sk["inputs"]["subspace"]["rank"] == 64
    assert sk["options"]["rho_source"].startswith("rank-64 sketch")
    for a, b in zip(exact["modules"], sk["modules"], strict=True):
        assert a["name"] == b["name"] and abs(a["rho"] - b["rho"]) < 1e-7 and a["selected"] == b["selected"]
        assert b["sketch_energy"] == pytest.approx(1.0, abs=1e-12) and "sketch_energy" not in a
    full = ["scan", "-a", str(env["aligned"]), "--task-model", str(env["task"])]
    exact = report_of([*full, "-u", str(env["unaligned"])], tmp_path / "exact_full")
    sk = report_of([*full, "--subspace", str(env["sketch"])], tmp_path / "sk_full")
    assert sk["inputs"]["subspace"]["fingerprint_matches"] is True
    for a, b in zip(exact["modules"], sk["modules"], strict=True):
        assert a["name"] == b["name"] and abs(a["rho"] - b["rho"]) < 1e-7
        assert a["delta_norm_in"] == pytest.approx(b["delta_norm_in"], rel=1e-6)


def test_merge_of_a_full_finetune_with_a_sketch_equals_the_exact_merge(
    sketched: dict, tmp_path: Path
) -> None:
    env = sketched
    args = ["merge", "-a", str(env["aligned"]), "--task-model", str(env["task"]), "--top-k", "5",
            "--safety-model", str(env["safety_model"])]  # fmt: skip
    report_of([*args, "-u", str(env["unaligned"])], tmp_path / "exact")
    report_of([*args, "--subspace", str(env["sketch"])], tmp_path / "sk")
    for f in (tmp_path / "exact").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "sk" / f.name).read_bytes()


def test_sketch_fingerprint_and_coverage_are_checked(sketched: dict, tmp_path: Path) -> None:
    env = sketched
    other = tmp_path / "resaved"  # the same weights, saved in shards: another fingerprint
    AutoModelForCausalLM.from_pretrained(env["aligned"]).save_pretrained(other, max_shard_size="60KB")
    lora = ["scan", "-t", str(env["task_adapter"]), "--subspace", str(env["sketch"])]
    out = tmp_path / "out"
    assert_exit_2([*lora, "-a", str(other)], out, "fingerprint")
    assert_exit_2(["scan", "-a", str(other), "--task-model", str(env["task"]), "--subspace",
                   str(env["sketch"])], out, "fingerprint")  # fmt: skip
    rep = report_of([*lora, "-a", str(other), "--ignore-fingerprint"], out)
    assert rep["options"]["ignore_fingerprint"] is True
    assert rep["inputs"]["subspace"]["fingerprint_matches"] is False
    assert any("fingerprint" in w and "ignore_fingerprint" in w for w in rep["warnings"])
    q_only = ["scan", "-t", str(env["task_adapter"]), "--subspace", str(env["sketch_q"])]
    assert_exit_2(q_only, tmp_path / "o2", "model.layers.0.self_attn.v_proj")
    assert_exit_2([*lora, "-u", str(env["unaligned"])], tmp_path / "o3", "either --unaligned or --subspace")
    assert_exit_2(["scan", "--task-model", str(env["task"]), "--subspace", str(env["sketch"])],
                  tmp_path / "o4", "missing required option: --aligned")  # fmt: skip
    assert_exit_2(
        ["merge", *lora[1:], "-s", str(env["safety"]), "--merge-into-base"], tmp_path / "o5", "needs aligned"
    )


def test_defences_that_need_v_itself_refuse_a_sketch(sketched: dict, tmp_path: Path) -> None:
    env = sketched
    base = [
        "defend",
        "-a",
        str(env["aligned"]),
        "-t",
        str(env["task_adapter"]),
        "--subspace",
        str(env["sketch"]),
    ]
    for method in ("safelora", "resta"):
        assert_exit_2([*base, "-m", method], tmp_path / method, f"method {method} needs --unaligned")
    rep = report_of([*base, "-m", "safemerge", "-s", str(env["safety"])], tmp_path / "ok")
    assert rep["summary"]["merged"] == rep["summary"]["selected"]


def test_a_low_rank_sketch_reports_its_energy_and_warns_near_the_threshold(
    sketched: dict, tmp_path: Path
) -> None:
    env = sketched
    args = ["scan", "-t", str(env["task_adapter"]), "--subspace", str(env["sketch_2"])]
    first = report_of(args, tmp_path / "a")
    assert all(0 < m["sketch_energy"] < 1 for m in first["modules"])
    assert first["options"]["rho_source"].startswith("rank-2 sketch")
    tau = first["modules"][0]["rho"]  # a threshold right at a module's ρ: within any sketch error
    again = report_of([*args, "--threshold", str(tau)], tmp_path / "b")
    near = [w for w in again["warnings"] if "measured sketch error" in w]
    assert len(near) == 1 and first["modules"][0]["name"] in near[0]


def test_the_benchmark_runs_end_to_end_on_small_shapes(tmp_path: Path) -> None:
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fullft.py"
    args = ["--hidden", "32", "--mlp", "48", "--layers", "1", "--repeats", "1", "--data", str(tmp_path / "d")]
    subprocess.run([sys.executable, str(bench), *args, "--json", str(tmp_path / "r.json")], check=True)
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["by_layers"]["1"]["modules"] == 7
    assert set(res["by_layers"]["1"]["routes"].values()) == {"input", "output"}  # down_proj: d_in > d_out
    assert all(a["abs_diff"] < 1e-7 for a in res["accuracy"].values())


def test_the_rate_benchmark_counts_the_code_s_products(tmp_path: Path) -> None:
    """bench_fullft_rate.py end to end on small shapes: the flops counted from the products the scan runs
    equal 4 · rows · cols² per module (the docs' count), and every figure of the report is there."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fullft_rate.py"
    args = ["--hidden", "32", "--mlp", "48", "--threads", "1", "--repeats", "1", "--data", str(tmp_path)]
    subprocess.run([sys.executable, str(bench), *args, "--json", str(tmp_path / "r.json")], check=True)
    res = json.loads((tmp_path / "r.json").read_text())["by_threads"]["1"]
    want = 4 * 4 * 32**3 + 3 * 4 * 48 * 32**2  # q/k/v/o 32 × 32; gate/up 48 × 32, down 32 × 48
    assert res["flops_per_layer_counted"] == res["flops_per_layer_formula"] == want
    assert res["ratio"] > 0 and res["scan_peak_rss_gib"] > 0 and len(res["rho"]) == 7
    assert set(res["profiled"]["split_s"]) == {"products", "read_convert", "float64_sums", "rest"}
