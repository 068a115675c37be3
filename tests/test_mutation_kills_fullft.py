"""Tests written to kill the survivors of the mutation run of the fullft modules (docs/testing.md,
"Mutation testing"); the same rules as tests/test_mutation_kills.py: each test names the mutants it was
written for and uses an independent oracle (a hand-derived value or a dense float64 computation written
here), never the helper under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import edited_copy, pickle_copy, save_adapter, save_pair
from peft.utils.merge_utils import dare_linear, random_pruning
from safetensors.torch import load_file, save_file
from test_fullft import F64, dense_rho, oriented, peft_safety_deltas, save_finetune, tensors

from safemerge.common.errors import InputError
from safemerge.defenses import DefendConfig, DefenseResult, defend
from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.config import MergeConfig, ScanConfig
from safemerge.engine.fullft import (
    FullModel,
    LoraSafety,
    check_same_tensors,
    full_sketch_similarities,
    linear_modules,
    model_type,
)
from safemerge.engine.lora import LoraAdapter
from safemerge.engine.pipeline import merge, scan
from safemerge.engine.subspace import SubspaceConfig, load_sketch, subspace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bf16_sketched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """bfloat16 aligned / unaligned / task models (llama and GPT-2's Conv1D layout) and a full-rank sketch
    of V of each (rank 64 ≥ every side of the tiny models: the sketch is exact)."""
    root = tmp_path_factory.mktemp("kills_fullft")
    envs = {}
    for arch in ("llama", "gpt2"):
        al, un = save_pair(root / arch, arch, torch.bfloat16)
        task = save_finetune(al, root / arch / "task", seed=21, dtype=torch.bfloat16)
        sketch = root / arch / "sketch"
        subspace(SubspaceConfig(aligned=str(al), unaligned=str(un), rank=64, out=str(sketch)))
        safety = root / arch / "safety"
        targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
        kw = {"fan_in_fan_out": True} if arch == "gpt2" else {}
        save_adapter(al, safety, seed=5, r=4, alpha=8, targets=targets, arch=arch, **kw)
        envs[arch] = {"aligned": al, "unaligned": un, "task": task, "sketch": sketch, "safety": safety}
    return envs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sketch_scan_of_a_bfloat16_full_finetune_is_exact(bf16_sketched: dict, arch: str) -> None:
    """`fullft.full_sketch_similarities` 38, 40 (ΔW_f formed in bfloat16), 50 (Conv1D weights not turned
    to d_out × d_in), 69, 71 (‖ΔW_f‖ in float32): ρ and ‖ΔW_f‖_F against float64 computed here from the
    stored weights. ΔW_f of two bfloat16 weights is exact in float32, so the measured error is the
    float32 ρ's (< 1e-7) and ‖ΔW_f‖ agrees to float64 rounding; a bfloat16 difference moves ρ by ~1e-3
    and a float32 norm by ~1e-7 relative."""
    env = bf16_sketched[arch]
    report = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), subspace=str(env["sketch"]),
                                       task_model=str(env["task"]), plot=False))  # fmt: skip
    al, un, ft = (tensors(env[k]) for k in ("aligned", "unaligned", "task"))
    flip = arch == "gpt2"
    assert report.modules
    for m in report.modules:
        key = m.name + ".weight"
        v = oriented(al[key], flip) - oriented(un[key], flip)
        d = oriented(ft[key], flip) - oriented(al[key], flip)
        assert abs(m.rho - dense_rho(v, d)) < 1e-6, m.name
        norm = float(torch.linalg.vector_norm(d))
        assert abs(m.delta_norm_in - norm) <= 1e-12 * norm, m.name


def test_sketch_scan_names_a_non_finite_task_tensor(bf16_sketched: dict, tmp_path: Path) -> None:
    """`fullft.full_sketch_similarities` 64, 65 and `fullft.full_similarities` 37: a NaN in the task model
    fails naming the tensor, with a sketch and with the unaligned model."""
    env = bf16_sketched["llama"]
    bad = tmp_path / "task_nan"
    key = "model.layers.1.mlp.up_proj.weight"
    edited_copy(env["task"], bad, lambda t: t[key].__setitem__((0, 0), float("nan")))
    named = r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' of the task model .* has NaN"
    for source in ({"subspace": str(env["sketch"])}, {"unaligned": str(env["unaligned"])}):
        with pytest.raises(InputError, match=named):
            scan(ScanConfig.from_flat(aligned=str(env["aligned"]), task_model=str(bad), plot=False, **source))


def test_sketch_layout_and_shape_refusals_are_worded(bf16_sketched: dict) -> None:
    """`fullft.full_sketch_similarities` 2-13, 34, 35: the two refusals of a sketch that does not fit the
    task model, word for word (the sketch of the other architecture: its layout and module shapes)."""
    env, other = bf16_sketched["llama"], bf16_sketched["gpt2"]
    aligned = Checkpoint(env["aligned"])
    task = FullModel.open(Checkpoint(env["task"]), aligned, None, None)
    sketch = load_sketch(other["sketch"])
    with pytest.raises(InputError) as info:
        full_sketch_similarities(aligned, sketch, task, CPU, False)
    assert str(info.value) == (
        f"the subspace sketch {other['sketch']} has layout conv1d, but the aligned model {env['aligned']} "
        "stores Linear weights"
    )
    gpt2_aligned = Checkpoint(other["aligned"])
    gpt2_task = FullModel.open(Checkpoint(other["task"]), gpt2_aligned, None, None)
    gpt2_task.transposed = False  # a Linear-layout model with the Conv1D model's names and shapes
    sketch.meta["layout"] = "linear"
    with pytest.raises(InputError) as info:
        full_sketch_similarities(gpt2_aligned, sketch, gpt2_task, CPU, False)
    module = gpt2_task.modules[0]
    rows, cols = gpt2_aligned.shape(module + ".weight")
    assert str(info.value) == (
        f"module {module}: (d_out, d_in) = {(rows, cols)} in {other['aligned']}, but the subspace sketch "
        f"{other['sketch']} holds {(cols, rows)}"
    )
    gpt2_task.transposed = True
    sketch.meta["layout"] = "conv1d"
    with pytest.raises(InputError, match="stores Conv1D weights"):
        full_sketch_similarities(gpt2_aligned, load_sketch(env["sketch"]), gpt2_task, CPU, False)


# --- module discovery and the checks of a full fine-tune (synthetic checkpoints) ----------------------
def _checkpoint(directory: Path, shapes: dict[str, tuple[int, ...]], config: str | None = None) -> Checkpoint:
    directory.mkdir(parents=True)
    save_file({k: torch.ones(s) for k, s in shapes.items()}, directory / "model.safetensors")
    if config is not None:
        (directory / "config.json").write_text(config)
    return Checkpoint(directory, label="task model")


LAYERS = {
    "model.layers.10.self_attn.q_proj.weight": (4, 4),
    "model.layers.9.self_attn.q_proj.weight": (4, 4),
    "model.layers.2.mlp.up_proj.weight": (6, 4),
    "model.layers.2.mlp.up_proj.bias": (6, 4),  # 2-D, but not a weight
    "model.layers.2.mlp.scale.weight": (4,),  # a weight, but 1-D
    "model.Embed_tokens.weight": (8, 4),  # upper case: markers are matched case-insensitively
    "lm_head.weight": (8, 4),
    "model.norm.weight": (4,),
}


def test_linear_modules_are_the_2d_weights_in_natural_order(tmp_path: Path) -> None:
    """`fullft.is_linear_weight` 1, 6, 11 and `fullft.linear_modules` 25, 31, 35: only 2-D `.weight`
    tensors outside embeddings / heads / norms, in natural order (layer 9 before layer 10), and the modules
    the unaligned model lacks listed as missing. Expected lists written by hand."""
    aligned = _checkpoint(tmp_path / "al", LAYERS)
    want = [
        "model.layers.2.mlp.up_proj",
        "model.layers.9.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
    ]
    assert linear_modules(aligned, None, None) == (want, [])
    assert linear_modules(aligned, None, ".") == (want, [])  # every linear weight: the same three
    lacking = {k: v for k, v in LAYERS.items() if "layers.9." not in k}
    unaligned = _checkpoint(tmp_path / "un", lacking)
    assert linear_modules(aligned, unaligned, None) == (
        ["model.layers.2.mlp.up_proj", "model.layers.10.self_attn.q_proj"],
        ["model.layers.9.self_attn.q_proj"],
    )


def test_module_discovery_refusals_are_worded(tmp_path: Path) -> None:
    """`fullft.linear_modules` 37-44, `fullft.check_same_shapes` 4-6, `fullft.model_type` 11: word for
    word."""
    aligned = _checkpoint(tmp_path / "al", LAYERS, config="{not json")
    unaligned = _checkpoint(tmp_path / "un", {**LAYERS, "model.layers.9.self_attn.q_proj.weight": (4, 5)})
    al, un = tmp_path / "al", tmp_path / "un"
    with pytest.raises(InputError) as info:
        linear_modules(aligned, None, "k_proj")
    assert (
        str(info.value)
        == f"no linear-layer weights matching --modules 'k_proj' found in the aligned model {al}"
    )
    with pytest.raises(InputError) as info:
        linear_modules(aligned, unaligned, "gate")
    assert str(info.value) == (
        f"no linear-layer weights matching --modules 'gate' found in the aligned model {al} and the "
        "unaligned "
        f"model {un}"
    )
    heads = _checkpoint(tmp_path / "heads", {"lm_head.weight": (8, 4)})
    with pytest.raises(InputError) as info:
        linear_modules(heads, None, None)
    assert str(info.value) == (
        "no linear-layer weights (attention / MLP projections) found in the aligned model "
        f"{tmp_path / 'heads'}"
    )
    with pytest.raises(InputError) as info:
        linear_modules(aligned, unaligned, None)
    assert str(info.value) == (
        f"model.layers.9.self_attn.q_proj.weight: aligned shape (4, 4) ({al}) differs from unaligned shape "
        f"(4, 5) ({un})"
    )
    with pytest.raises(InputError) as info:
        model_type(aligned)
    assert str(info.value).startswith(f"{al / 'config.json'}: not a valid config.json (")


def test_same_tensors_check_names_the_first_in_natural_order(tmp_path: Path) -> None:
    """`fullft.check_same_tensors` 5, 7, 11, 13, 15, 17, 19: the first differing tensor in natural order
    (layer 9 before layer 10, where plain sorting puts 10 first), and the missing-tensor message word for
    word."""
    base = {"model.layers.0.mlp.up_proj.weight": (2, 2)}
    aligned = _checkpoint(tmp_path / "al", base)
    extra = {"model.layers.10.x.weight": (2, 2), "model.layers.9.x.weight": (2, 2)}
    with pytest.raises(InputError, match=r"'model\.layers\.9\.x\.weight' of the task model .* is not in"):
        check_same_tensors(_checkpoint(tmp_path / "extra", {**base, **extra}), aligned)
    with pytest.raises(InputError) as info:
        check_same_tensors(aligned, _checkpoint(tmp_path / "more", {**base, **extra}))
    assert str(info.value) == (
        f"tensor 'model.layers.9.x.weight' of the aligned model {tmp_path / 'more'} is missing from the task "
        f"model {tmp_path / 'al'}"
    )
    both = _checkpoint(tmp_path / "both", {**base, **extra})
    reshaped = _checkpoint(tmp_path / "reshaped", {**base, **{k: (3, 2) for k in extra}})
    with pytest.raises(InputError, match=r"'model\.layers\.9\.x\.weight' has shape \(3, 2\)"):
        check_same_tensors(reshaped, both)


# --- records and merges of a full fine-tune --------------------------------------------------------------
FROZEN = "model.layers.1.self_attn.o_proj.weight"


def _frozen_task(env: dict[str, Path], out: Path) -> Path:
    """A copy of the task model in which the fine-tune left one module (`FROZEN`) unchanged: ΔW_f = 0,
    so its ρ is 0 ("zero-update") and ρ < τ selects it."""
    aligned = load_file(env["aligned"] / "model.safetensors")
    return edited_copy(env["task"], out, lambda t: t.update({FROZEN: aligned[FROZEN]}))


def test_full_records_carry_layer_type_rounding_selection_and_flags(
    bf16_sketched: dict, tmp_path: Path
) -> None:
    """`fullft.full_record` 2, 3, 6, 7, 20, 22, 24, 25: every field of a scanned module's row, checked
    against values derived here (layer and type from the name, ρ rounded to 5 places, selected iff
    round(ρ, 5) < τ), and a module the fine-tune left unchanged flagged "zero-update"."""
    env = bf16_sketched["llama"]
    frozen, key = _frozen_task(env, tmp_path / "task_frozen"), FROZEN
    first = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(env["unaligned"]),
                                      task_model=str(frozen), plot=False))  # fmt: skip
    tau = sorted(m.rho for m in first.modules)[len(first.modules) // 2]
    report = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(env["unaligned"]),
                                       task_model=str(frozen), plot=False, threshold=tau))  # fmt: skip
    assert any(m.selected for m in report.modules) and not all(m.selected for m in report.modules)
    for m in report.modules:
        assert m.layer == int(m.name.split(".")[2]) and m.module_type == m.name.split(".")[-1]
        assert m.rho_rounded == round(m.rho, 5)
        assert m.selected is (m.rho_rounded < tau), m.name
        assert m.flags == (["zero-update"] if m.name + ".weight" == key else []), m.name


def test_safety_lora_rank_and_unused_modules_of_a_full_merge(bf16_sketched: dict, tmp_path: Path) -> None:
    """`LoraSafety.rank` 1, 3, `LoraSafety.unused` 3 and `pipeline.record_full_merge` 5, 7, 18: a full
    merge with a safety LoRA reports the LoRA's rank (4) on the modules it has and none elsewhere, keeps
    (flags, warns about) selected modules the LoRA lacks with ‖ΔW‖ out = in, and warns about the LoRA's
    modules outside the scanned set (`--modules "q_proj|o_proj"` leaves out the adapter's v_proj of the 3
    layers)."""
    env = bf16_sketched["llama"]
    report = merge(MergeConfig.from_flat(
        aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_model=str(env["task"]),
        safety_adapter=str(env["safety"]), modules="q_proj|o_proj", out=str(tmp_path / "out"), plot=False,
        fraction=1.0, allow_partial=True,  # the LoRA has no o_proj: a partial merge
    ))  # fmt: skip
    for m in report.modules:
        assert m.rank_safety == (4 if m.module_type == "q_proj" else None), m.name
        if m.module_type == "o_proj":  # selected, but the LoRA has no o_proj: kept as fine-tuned
            assert not m.merged and m.flags == ["no-safety-counterpart"], m.name
            assert m.delta_norm_out == m.delta_norm_in, m.name
    kept = [w for w in report.warnings if "have no safety counterpart" in w]
    assert kept == [
        "3 selected module(s) have no safety counterpart and are kept as fine-tuned (allow_partial): "
        "model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj, model.layers.2.self_attn.o_proj"
    ]
    unused = [w for w in report.warnings if "of the safety adapter are not scanned" in w]
    assert len(unused) == 1 and unused[0].startswith("3 module(s)") and "v_proj" in unused[0], report.warnings
    assert "q_proj" not in unused[0]
    # `report.markdown` 20, 27, 28, 62, 66-70 and `report.write_report` 6, 8, 10: the Markdown report of a
    # full merge says so, lists the warnings under their heading *after* everything above them (a real
    # bug class: `lines = [...]` for `lines += [...]` dropped the summary and table), and the JSON report
    # is written with a 2-space indent, byte for byte.
    text = (tmp_path / "out" / "safemerge_report.md").read_text()
    assert text.startswith("# ") and ", output: a full model\n" in text
    block = "## Warnings\n\n" + "".join(f"- {w}\n" for w in report.warnings) + "\n"
    assert block in text and text.index("- merge: mode") < text.index(block)
    assert text.index(block) < text.index("| module")
    raw = (tmp_path / "out" / "safemerge_report.json").read_text()
    assert raw == json.dumps(json.loads(raw), indent=2) + "\n"
    # `report.full_model_card` 1-26: the merged full model's card has the hub's front matter as written
    # here (local models whose configs name no hub id: no base_model) and names the task model and the
    # safety adapter it was made from by their basenames (a card never shows a local path)
    card = (tmp_path / "out" / "README.md").read_text()
    front = (
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- safemerge\n- safety\n---\n"
    )
    assert card.startswith(front)
    assert f"model `{env['task'].name}`" in card and f"safety update of `{env['safety'].name}`" in card
    policy, merged = report.options["selection_policy"], report.summary["merged"]
    assert f"(selection: {policy}) and {merged} of them were set to" in card
    assert "The other 3 selected modules have no counterpart in the safety update" in card


def test_safety_lora_layout_refusal_is_worded(bf16_sketched: dict, tmp_path: Path) -> None:
    """`LoraSafety.__init__` 2-10: an adapter whose fan_in_fan_out does not match the weights' layout."""
    for arch, stored in (("llama", "d_out × d_in"), ("gpt2", "d_in × d_out (Conv1D)")):
        env = bf16_sketched[arch]
        flipped = tmp_path / arch
        shutil.copytree(env["safety"], flipped)
        config = json.loads((flipped / "adapter_config.json").read_text())
        config["fan_in_fan_out"] = not config.get("fan_in_fan_out", False)
        (flipped / "adapter_config.json").write_text(json.dumps(config))
        adapter = LoraAdapter.load(flipped, label="safety adapter")
        with pytest.raises(InputError) as info:
            LoraSafety(adapter, Checkpoint(env["aligned"]), arch == "gpt2")
        assert str(info.value) == (
            f"fan_in_fan_out of the safety adapter {flipped} is {config['fan_in_fan_out']}, but the aligned "
            f"model's linear weights are stored {stored}"
        )


def _documented_seed(seed: int, module: str) -> int:
    """docs/method.md §4.3: sha256 of "seed:module", first 8 bytes little-endian, top bit cleared."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little") & (2**63 - 1)


def test_dare_masks_of_a_full_merge_follow_the_module_seed_on_d_out_by_d_in(
    bf16_sketched: dict, tmp_path: Path
) -> None:
    """`fullft.merged_update` 24, 25 and `fullft.write_full_merge` 20, 26, 27: DARE on a full fine-tune
    draws each module's masks from its documented seed, on the d_out × d_in update (GPT-2 stores the
    transpose). Oracle: PEFT's own `dare_linear` after `torch.manual_seed`, in float64 from the stored
    weights."""
    env = bf16_sketched["gpt2"]
    report = merge(MergeConfig.from_flat(
        aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_model=str(env["task"]),
        safety_adapter=str(env["safety"]), out=str(tmp_path / "out"), plot=False, fraction=1.0,
        method="dare_linear", density=0.5, seed=3, weights="0.7,0.4", allow_any_weights=True,
        allow_partial=True,  # c_attn only
    ))  # fmt: skip
    al, ft, got = (tensors(p) for p in (env["aligned"], env["task"], tmp_path / "out"))
    peft_deltas = peft_safety_deltas(env["aligned"], env["safety"])
    merged = [m.name for m in report.modules if m.merged]
    assert len(merged) == 2  # the two c_attn modules
    for name in merged:
        key = name + ".weight"
        d_task = (ft[key].to(F64) - al[key].to(F64)).T.float()  # d_out × d_in
        d_safety = peft_deltas[name].T.float()  # PEFT gives it in the stored (Conv1D) layout
        torch.manual_seed(_documented_seed(3, name))
        want = dare_linear([d_task, d_safety], torch.tensor([0.7, 0.4]), 0.5).T.to(F64) + al[key].to(F64)
        # stored in bfloat16 (8 significant bits): a relative 2^-7 bounds its rounding; a wrong mask moves
        # an entry by w·ΔW/p, of the order of the entries themselves
        torch.testing.assert_close(got[key].to(F64), want, rtol=2**-7, atol=1e-6)


def test_modules_the_unaligned_model_lacks_are_listed_not_scanned(
    bf16_sketched: dict, tmp_path: Path
) -> None:
    """`FullModel.open` 7, 15, 19: a module whose weight the unaligned model lacks is left out of the scan
    and named in a warning (not read, which would fail)."""
    env = bf16_sketched["llama"]
    unaligned = tmp_path / "unaligned"
    edited_copy(env["unaligned"], unaligned, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    report = scan(ScanConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(unaligned),
                                       task_model=str(env["task"]), plot=False))  # fmt: skip
    names = [m.name for m in report.modules]
    assert "model.layers.0.mlp.down_proj" not in names and "model.layers.1.mlp.down_proj" in names
    assert [w for w in report.warnings if "not in the unaligned model" in w] == [
        "1 module(s) are not in the unaligned model and were not scanned: model.layers.0.mlp.down_proj"
    ]


def test_a_bfloat16_safety_lora_is_applied_in_float32(tmp_path: Path) -> None:
    """A safety LoRA stored in bfloat16 merged into a float32 full fine-tune: ΔW_s = s·B A is formed in
    float32 from the exact float32 values of its factors. Oracle: W_al + w_f ΔW_f + w_s s B A in float64
    from the stored tensors; measured error of the float32 sum < 1e-6. (Written for `LoraSafety.delta`
    5, which turned out equivalent: `LoraAdapter.factors` already returns float32 factors.)"""
    al, un = save_pair(tmp_path, "llama", torch.float32)
    task = save_finetune(al, tmp_path / "task", seed=21)
    safety = save_adapter(al, tmp_path / "safety", seed=5, r=4, alpha=8, targets=["q_proj"])
    lora = {k: v.to(torch.bfloat16) for k, v in load_file(safety / "adapter_model.safetensors").items()}
    save_file(lora, safety / "adapter_model.safetensors")
    report = merge(MergeConfig.from_flat(
        aligned=str(al), unaligned=str(un), task_model=str(task), safety_adapter=str(safety),
        out=str(tmp_path / "out"), plot=False, modules="q_proj", fraction=1.0,
    ))  # fmt: skip
    w_al, w_ft, got = (tensors(p) for p in (al, task, tmp_path / "out"))
    assert [m.name for m in report.modules if m.merged]
    for m in report.modules:
        key, prefix = m.name + ".weight", f"base_model.model.{m.name}"
        d_s = 2.0 * lora[f"{prefix}.lora_B.weight"].to(F64) @ lora[f"{prefix}.lora_A.weight"].to(F64)
        want = w_al[key].to(F64) + 0.8 * (w_ft[key].to(F64) - w_al[key].to(F64)) + 0.2 * d_s
        torch.testing.assert_close(got[key].to(F64), want, rtol=0, atol=1e-6)


# --- the full-fine-tune branches of the defences ------------------------------------------------------
def _defend(env: dict[str, Path], out: Path, method: str, **kw: object) -> DefenseResult:
    return defend(DefendConfig.model_validate({
        "method": method, "aligned": str(env["aligned"]), "unaligned": str(env["unaligned"]),
        "task_model": str(env["task"]), "out": str(out), "plot": False, **kw,
    }))  # fmt: skip


def test_resta_dare_on_a_conv1d_full_finetune(bf16_sketched: dict, tmp_path: Path) -> None:
    """`Resta.run_full` 60, 62, 63, 73, 76, 79, 101, 102: with DARE, each scanned module is
    W_al + DARE(ΔW_f) + β V, the mask drawn from the module's documented seed on the d_out × d_in update
    (GPT-2 stores the transpose), stored in the model's bfloat16; the report's per-tensor norms are
    ‖DARE(ΔW_f)‖ and |β| ‖V‖. Oracle: PEFT's `random_pruning` after `torch.manual_seed`, float64 here."""
    env = bf16_sketched["gpt2"]
    out = tmp_path / "out"
    res = _defend(env, out, "resta", beta=0.5, dare=True, density=0.5, seed=4)
    al, un, ft, got = (tensors(p) for p in (env["aligned"], env["unaligned"], env["task"], out))
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    edits = {e["key"]: e for e in json.loads((out / "safemerge_report.json").read_text())["tensors"]}
    assert len(edits) == len(res.report.modules) > 0
    for m in res.report.modules:
        key = m.name + ".weight"
        d_task = (ft[key].to(F64) - al[key].to(F64)).T.float()  # d_out × d_in, exact in float32
        torch.manual_seed(_documented_seed(4, m.name))
        dropped = random_pruning(d_task, 0.5, rescale=True).T.to(F64)
        v = al[key].to(F64) - un[key].to(F64)
        want = al[key].to(F64) + dropped + 0.5 * v
        torch.testing.assert_close(got[key].to(F64), want, rtol=2**-7, atol=1e-6)
        assert edits[key]["task_norm"] == pytest.approx(float(torch.linalg.vector_norm(dropped)), rel=1e-6)
        assert edits[key]["safety_norm"] == pytest.approx(0.5 * float(torch.linalg.vector_norm(v)), rel=1e-9)


@pytest.mark.parametrize("scope", ["targeted", "all-linear"])
def test_resta_scope_on_a_narrowed_full_finetune(bf16_sketched: dict, tmp_path: Path, scope: str) -> None:
    """`Resta.run_full` 5, 17, 18, 34-36, 38: with `--modules q_proj` only q_proj is scanned; "targeted"
    adds β V to those weights only, "all-linear" to every linear weight (7 per layer in 3 layers); every
    other tensor is the task model's bit for bit. Counts by hand from the tiny Llama's layout."""
    env = bf16_sketched["llama"]
    out = tmp_path / "out"
    res = _defend(env, out, "resta", beta=0.5, scope=scope, modules="q_proj")
    ft, got = tensors(env["task"]), tensors(out)
    changed = sorted(k for k in ft if not torch.equal(ft[k], got[k]))
    assert res.modified == len(changed) == {"targeted": 3, "all-linear": 21}[scope]
    if scope == "targeted":
        assert all(".q_proj." in k for k in changed)
    assert res.report.options["selection_policy"] == f"RESTA on {scope.replace('-', ' ')} weights"
    assert json.loads((out / "safemerge_report.json").read_text())["command"] == "defend"


def test_resta_full_reads_a_pickle_unaligned_model_when_allowed(bf16_sketched: dict, tmp_path: Path) -> None:
    """`Resta.run_full` 22: the unaligned checkpoint is opened with the run's `allow_pickle`."""
    env = dict(bf16_sketched["llama"])
    env["unaligned"] = pickle_copy(env["unaligned"], tmp_path / "unaligned")
    res = _defend(env, tmp_path / "out", "resta", beta=0.5, allow_pickle=True)
    assert res.modified > 0


def test_none_passes_a_full_finetune_through_with_its_report(bf16_sketched: dict, tmp_path: Path) -> None:
    """`NoDefense._run_full` 3, 9, 11, 14-16, 30, 34-47, 58: the report of `none` on a full fine-tune: the
    scan's command, no module selected, ‖ΔW‖ out = in, its selection policy and outputs; the result
    carries the report."""
    env = bf16_sketched["llama"]
    out = tmp_path / "out"
    env = {**env, "task": _frozen_task(env, tmp_path / "task")}  # the default τ 0.35 would select FROZEN
    res = _defend(env, out, "none")
    assert res.report is not None and res.report.command == "defend"
    assert res.report.modules and not any(m.selected for m in res.report.modules)
    assert all(m.delta_norm_out == m.delta_norm_in for m in res.report.modules)
    assert res.report.options["selection_policy"] == "none (task model passed through)"
    assert res.report.outputs == {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    data = json.loads((out / "safemerge_report.json").read_text())
    assert data["options"]["selection_policy"] == "none (task model passed through)"
    assert data["outputs"] == res.report.outputs


@pytest.mark.parametrize("method", ["safemerge", "merge-all"])
def test_safemerge_full_result_fields(bf16_sketched: dict, tmp_path: Path, method: str) -> None:
    """`SafeMerge.run` 47, 52, 58: on a full fine-tune the result names the defence, and its full model is
    the output directory itself."""
    env = bf16_sketched["llama"]
    out = tmp_path / "out"
    res = _defend(env, out, method, safety_adapter=str(env["safety"]), allow_partial=True)  # q/v LoRA
    assert (res.method, res.out, res.kind, res.full_model) == (method, out, "model", out)
    assert (out / "config.json").is_file() and (out / "safemerge_report.json").is_file()


def test_none_refuses_a_pickle_task_model(bf16_sketched: dict, tmp_path: Path) -> None:
    """`NoDefense._run_full` 20: `none` copies safetensors files; a pickle-only task model is refused."""
    env = dict(bf16_sketched["llama"])
    env["task"] = pickled = pickle_copy(env["task"], tmp_path / "task")
    with pytest.raises(InputError) as info:
        _defend(env, tmp_path / "out", "none", allow_pickle=True)
    assert str(info.value) == f"method none copies safetensors files; {pickled} has pickle weights only"
    assert not (tmp_path / "out").exists()


def test_a_full_merge_of_pickle_checkpoints_equals_the_safetensors_one(
    bf16_sketched: dict, tmp_path: Path
) -> None:
    """`pipeline.open_safety` 5, 15: with `allow_pickle`, the aligned model and the full safety model are
    opened with it too; the merge of pickle copies writes the same bytes as that of the originals."""
    env = bf16_sketched["llama"]
    safety = save_finetune(env["aligned"], tmp_path / "safety_model", seed=12, dtype=torch.bfloat16)
    kw = {"unaligned": str(env["unaligned"]), "task_model": str(env["task"]), "plot": False, "fraction": 0.5}
    a, b = tmp_path / "a", tmp_path / "b"
    merge(MergeConfig.from_flat(aligned=str(env["aligned"]), safety_model=str(safety), out=str(a), **kw))
    aligned_pkl = pickle_copy(env["aligned"], tmp_path / "aligned_pkl")
    safety_pkl = pickle_copy(safety, tmp_path / "safety_pkl")
    merge(MergeConfig.from_flat(aligned=str(aligned_pkl), safety_model=str(safety_pkl), out=str(b),
                                allow_pickle=True, **kw))  # fmt: skip
    assert sorted(a.glob("*.safetensors"))
    for f in a.glob("*.safetensors"):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    # `report.full_model_card` 8, 13-15: with a full safety model the card names it as the safety update
    assert f"safety update of `{safety.name}`" in (a / "README.md").read_text()


def test_a_safety_lora_module_the_aligned_model_lacks_names_it(bf16_sketched: dict, tmp_path: Path) -> None:
    """`pipeline.open_safety` 4, 9, 10: the aligned checkpoint is opened under its label, which the error
    for a safety LoRA module it does not have names."""
    env = bf16_sketched["llama"]
    safety = tmp_path / "safety"
    shutil.copytree(env["safety"], safety)
    lora = load_file(safety / "adapter_model.safetensors")
    renamed = {
        k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.zz_proj"): v for k, v in lora.items()
    }
    save_file(renamed, safety / "adapter_model.safetensors")
    with pytest.raises(InputError) as info:
        merge(MergeConfig.from_flat(aligned=str(env["aligned"]), unaligned=str(env["unaligned"]),
                                    task_model=str(env["task"]), safety_adapter=str(safety),
                                    out=str(tmp_path / "out"), plot=False))  # fmt: skip
    assert str(info.value).startswith(
        "module 'model.layers.0.self_attn.zz_proj': no weight model.layers.0.self_attn.zz_proj.weight in the "
        f"aligned checkpoint {env['aligned']}"
    )


def test_full_merge_report_and_force(bf16_sketched: dict, tmp_path: Path) -> None:
    """`pipeline.merge_full` 5, 13, 18, 19: the report of a full merge says "merge"; an existing output
    is refused, and replaced with `force`."""
    env = bf16_sketched["llama"]
    out = tmp_path / "out"
    kw = {"aligned": str(env["aligned"]), "unaligned": str(env["unaligned"]), "task_model": str(env["task"]),
          "safety_adapter": str(env["safety"]), "out": str(out), "plot": False}  # fmt: skip
    merge(MergeConfig.from_flat(**kw))
    assert json.loads((out / "safemerge_report.json").read_text())["command"] == "merge"
    with pytest.raises(InputError, match="exists"):
        merge(MergeConfig.from_flat(**kw))
    (out / "README.md").write_text("old")  # a file of the earlier output: replaced with the rest
    merge(MergeConfig.from_flat(**kw, force=True))
    assert (out / "README.md").read_text() != "old"


def test_full_merge_outputs_inputs_and_labels(bf16_sketched: dict, tmp_path: Path) -> None:
    """`pipeline.merge_full` 67-80, 92 and `pipeline.open_safety` 19, 25, 30, 43, 46: a full merge's
    outputs, model card and plot option; the report's key and path for either kind of safety input; and
    the labels that the safety inputs' errors name."""
    env = bf16_sketched["llama"]
    base = {
        "aligned": str(env["aligned"]),
        "unaligned": str(env["unaligned"]),
        "task_model": str(env["task"]),
    }
    out = tmp_path / "lora"
    report = merge(MergeConfig.from_flat(**base, safety_adapter=str(env["safety"]), out=str(out), plot=False))
    assert report.outputs == {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    assert (out / "README.md").exists() and not (out / "similarity.png").exists()
    assert (
        report.inputs["safety_adapter"]["path"] == str(env["safety"]) and "safety_model" not in report.inputs
    )
    safety_model = save_finetune(env["aligned"], tmp_path / "safety_model", seed=12, dtype=torch.bfloat16)
    out = tmp_path / "model"
    report = merge(MergeConfig.from_flat(**base, safety_model=str(safety_model), out=str(out), plot=True))
    assert report.inputs["safety_model"]["path"] == str(safety_model) and (out / "similarity.png").exists()
    (safety_model / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"\(safety model\)$"):
        merge(MergeConfig.from_flat(**base, safety_model=str(safety_model), out=str(tmp_path / "x")))
    broken = tmp_path / "broken"
    shutil.copytree(env["safety"], broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError) as info:
        merge(MergeConfig.from_flat(**base, safety_adapter=str(broken), out=str(tmp_path / "y")))
    assert str(info.value) == f"{broken}: adapter_model.safetensors is missing — safety adapter"


# --- defenses/safelora.py: Safe LoRA on a full fine-tune --------------------------------------------------
def test_safelora_full_result_report_and_output_dtype(bf16_sketched: dict, tmp_path: Path) -> None:
    """`safelora.run_full`: what a user reads after Safe LoRA on a bfloat16 full fine-tune — the result
    (method name, output directory = the model), the report's command and outputs (in memory and in the
    JSON), every tensor in the task model's dtype, and ‖ΔW‖ out = ‖W_out − W_al‖ (float64 here) for the
    projected modules, ‖ΔW‖ in for the others; `merge_into_base` is refused in words."""
    env = bf16_sketched["llama"]
    out = tmp_path / "out"
    res = _defend(env, out, "safelora", top_k=3)
    assert (res.method, res.out, res.kind, res.full_model) == ("safelora", out, "model", out)
    outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
    saved = json.loads((out / "safemerge_report.json").read_text())
    assert res.report.command == saved["command"] == "defend"
    assert res.report.outputs == saved["outputs"] == outputs
    al, got = tensors(env["aligned"]), tensors(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for rec in res.report.modules:
        key = rec.name + ".weight"
        if rec.selected:
            want = float(torch.linalg.vector_norm(got[key].to(F64) - al[key].to(F64)))
            assert rec.merged and rec.delta_norm_out == pytest.approx(want, rel=1e-12)
        else:
            assert not rec.merged and rec.delta_norm_out == rec.delta_norm_in
    with pytest.raises(InputError) as err:
        _defend(env, tmp_path / "again", "safelora", top_k=3, merge_into_base=True)
    assert (
        str(err.value)
        == "`merge_into_base` does not apply to `task_model`: the output is already a full model"
    )


def test_safelora_full_zero_v_module_is_ranked_last_and_flagged(bf16_sketched: dict, tmp_path: Path) -> None:
    """A module the alignment left unchanged (V = 0, ρ 0) is ranked last, so top-3 projects three other
    modules; selected anyway (fraction 1), it is flagged and written unchanged (Safe LoRA's projection is
    undefined for C = 0). The unaligned model is a pickle here, read because `allow_pickle` is passed on."""
    env = dict(bf16_sketched["llama"])
    key = "model.layers.0.self_attn.q_proj.weight"
    same = edited_copy(
        env["unaligned"],
        tmp_path / "same",
        lambda t: t.update({key: load_file(env["aligned"] / "model.safetensors")[key]}),
    )
    env["unaligned"] = pickle_copy(same, tmp_path / "unaligned")
    top = _defend(env, tmp_path / "top", "safelora", top_k=3, allow_pickle=True)
    zero = next(m for m in top.report.modules if m.name + ".weight" == key)
    assert zero.rho == 0.0 and not zero.selected and top.modified == 3
    every = _defend(env, tmp_path / "all", "safelora", fraction=1.0, allow_pickle=True)
    zero = next(m for m in every.report.modules if m.name + ".weight" == key)
    assert zero.selected and not zero.merged
    assert "zero-V: projection undefined, module left unchanged" in zero.flags
    assert torch.equal(tensors(tmp_path / "all")[key], tensors(env["task"])[key])
