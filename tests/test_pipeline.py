"""End to end on tiny random models: scan and merge against PEFT's own adapters and merges."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import adapter_config, save_adapter, save_pair
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from safemerge.common.errors import InputError
from safemerge.engine.config import MergeConfig, ScanConfig
from safemerge.engine.pipeline import merge, scan

F64 = torch.float64


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    prefix = "base_model.model."
    return {n[len(prefix) :]: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_deltas(base: Path, adapters: dict[str, Path], combine: dict | None = None) -> dict[str, dict]:
    """ΔW per adapter name and module as PEFT computes it (base-weight layout), optionally after
    `add_weighted_adapter(**combine)` into an adapter named 'combined'."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    if combine:
        peft_model.add_weighted_adapter(adapter_name="combined", **combine)
        names.append("combined")
    out: dict[str, dict] = {n: {} for n in names}
    for module, layer in lora_layers(peft_model).items():
        for n in names:
            if n in layer.lora_A:
                out[n][module] = layer.get_delta_weight(n).detach().to(F64)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    al, un = save_pair(root, "llama", torch.float32, shard="40KB")
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "safety": save_adapter(al, root / "safety", seed=2, r=4, alpha=16),
    }


def cfg(env: dict[str, Path], out: Path, **kw: object) -> MergeConfig:
    return MergeConfig(
        aligned=str(env["aligned"]),
        unaligned=str(env["unaligned"]),
        task_adapter=str(env["task"]),
        safety_adapter=str(env["safety"]),
        out=str(out),
        plot=False,
        **kw,
    )


@pytest.mark.parametrize(
    ("arch", "dtype", "shard"),
    [
        ("llama", torch.float32, None),
        ("llama", torch.bfloat16, "40KB"),
        ("qwen2", torch.bfloat16, None),
        ("qwen2", torch.float32, "30KB"),
        ("gpt2", torch.float32, None),
        ("gpt2", torch.bfloat16, "50KB"),
    ],
)
def test_exact_mode_matches_peft_cat_and_the_formula(
    tmp_path: Path, arch: str, dtype: torch.dtype, shard
) -> None:
    al, un = save_pair(tmp_path, arch, dtype, shard=shard)
    kw = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    task = save_adapter(al, tmp_path / "task", seed=1, r=4, alpha=8, arch=arch, **kw)
    safety = save_adapter(al, tmp_path / "safety", seed=2, r=2, alpha=2, arch=arch, **kw)
    env = {"aligned": al, "unaligned": un, "task": task, "safety": safety}
    report = merge(cfg(env, tmp_path / "out", threshold=1.0))
    assert report.summary["selected"] == report.summary["merged"] == len(report.modules) > 0
    if arch == "qwen2":  # q/k/v biases exist in the checkpoint but are never paired with LoRA factors
        assert any(k.endswith("q_proj.bias") for k in _keys(al))
    ref = peft_deltas(
        al,
        {"task": task, "safety": safety, "out": tmp_path / "out"},
        combine={"adapters": ["task", "safety"], "weights": [0.8, 0.2], "combination_type": "cat"},
    )
    assert set(ref["out"]) == {m.name for m in report.modules}
    for module, got in ref["out"].items():
        expected = 0.8 * ref["task"][module] + 0.2 * ref["safety"][module]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, ref["combined"][module], rtol=1e-5, atol=1e-6)
    assert adapter_config(tmp_path / "out")["r"] == 6


def _keys(directory: Path) -> list[str]:
    from safemerge.engine.checkpoint import Checkpoint

    return Checkpoint(directory).keys()


def test_threshold_zero_keeps_the_task_adapter_exactly(llama: dict[str, Path], tmp_path: Path) -> None:
    report = merge(cfg(llama, tmp_path / "out", threshold=0.0))
    assert report.summary["selected"] == 0 and report.summary["merged"] == 0
    ref = peft_deltas(llama["aligned"], {"task": llama["task"], "out": tmp_path / "out"})
    for module, got in ref["out"].items():
        assert torch.equal(got, ref["task"][module]), module
    # and the stored factors are the task's, bit for bit, zero-padded to the shared rank
    from safetensors.torch import load_file

    t = load_file(llama["task"] / "adapter_model.safetensors")
    o = load_file(tmp_path / "out" / "adapter_model.safetensors")
    for key, value in t.items():
        if key.endswith("lora_A.weight"):
            assert torch.equal(o[key][: value.shape[0]], value) and not o[key][value.shape[0] :].any()
        else:
            assert torch.equal(o[key][:, : value.shape[1]], value)


def test_top_k_merges_exactly_k_and_keeps_the_rest(llama: dict[str, Path], tmp_path: Path) -> None:
    report = merge(cfg(llama, tmp_path / "out", top_k=2))
    chosen = [m for m in report.modules if m.selected]
    assert len(chosen) == 2 and all(m.merged for m in chosen)
    rest = sorted(m.rho for m in report.modules if not m.selected)
    assert max(m.rho for m in chosen) <= rest[0]
    ref = peft_deltas(
        llama["aligned"], {"task": llama["task"], "safety": llama["safety"], "out": tmp_path / "out"}
    )
    for m in report.modules:
        got = ref["out"][m.name]
        if m.selected:
            expected = 0.8 * ref["task"][m.name] + 0.2 * ref["safety"][m.name]
        else:
            expected = ref["task"][m.name]
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_fraction_policy(llama: dict[str, Path], tmp_path: Path) -> None:
    report = scan(ScanConfig(aligned=str(llama["aligned"]), unaligned=str(llama["unaligned"]),
                             task_adapter=str(llama["task"]), fraction=0.5))  # fmt: skip
    assert sum(m.selected for m in report.modules) == 3  # ⌈0.5 · 6⌉


def test_peft_linear_mode_matches_peft_linear(llama: dict[str, Path], tmp_path: Path) -> None:
    merge(cfg(llama, tmp_path / "out", threshold=1.0, mode="peft-linear"))
    ref = peft_deltas(
        llama["aligned"],
        {"task": llama["task"], "safety": llama["safety"], "out": tmp_path / "out"},
        combine={"adapters": ["task", "safety"], "weights": [0.8, 0.2], "combination_type": "linear"},
    )
    for module, got in ref["out"].items():
        torch.testing.assert_close(got, ref["combined"][module], rtol=1e-5, atol=1e-6)
        # and it is NOT the weighted sum of products: the cross terms are there
        plain = 0.8 * ref["task"][module] + 0.2 * ref["safety"][module]
        assert (got - plain).norm() > 1e-3 * plain.norm()


def test_logits_of_output_adapter_match_weights_edited_by_the_formula(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    report = merge(cfg(llama, tmp_path / "out", top_k=3, weights=(0.7, 0.4), allow_any_weights=True))
    tokens = torch.tensor([[1, 5, 9, 22, 40, 3]])
    model = AutoModelForCausalLM.from_pretrained(llama["aligned"], dtype=torch.float32)
    with torch.no_grad():
        merged = PeftModel.from_pretrained(model, tmp_path / "out")
        got = merged(tokens).logits
    # independent edit: W + w_f s_f B_f A_f + w_s s_s B_s A_s on selected modules, W + s_f B_f A_f elsewhere
    from safetensors.torch import load_file

    edited = AutoModelForCausalLM.from_pretrained(llama["aligned"], dtype=torch.float64)
    tf = load_file(llama["task"] / "adapter_model.safetensors")
    sf = load_file(llama["safety"] / "adapter_model.safetensors")
    s_t, s_s = 8 / 4, 16 / 4
    with torch.no_grad():
        for m in report.modules:
            key = f"base_model.model.{m.name}"
            d_t = s_t * tf[f"{key}.lora_B.weight"].double() @ tf[f"{key}.lora_A.weight"].double()
            d_s = s_s * sf[f"{key}.lora_B.weight"].double() @ sf[f"{key}.lora_A.weight"].double()
            delta = 0.7 * d_t + 0.4 * d_s if m.selected else d_t
            edited.get_submodule(m.name).weight.add_(delta)
        want = edited(tokens).logits
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_base_loads_and_matches_adapter_logits(tmp_path: Path, dtype: torch.dtype) -> None:
    al, un = save_pair(tmp_path, "llama", dtype, shard="40KB")
    env = {
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, tmp_path / "task", seed=1),
        "safety": save_adapter(al, tmp_path / "safety", seed=2),
    }
    merge(cfg(env, tmp_path / "out", top_k=3, merge_into_base=True, max_shard_size="30KB"))
    full = tmp_path / "out" / "full_model"
    assert (full / "model.safetensors.index.json").exists() and (full / "config.json").exists()
    tokens = torch.tensor([[2, 7, 11, 30]])
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(full)
        assert next(model.parameters()).dtype == dtype
        got = model.float()(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(al, dtype=torch.float32)
        want = PeftModel.from_pretrained(base, tmp_path / "out")(tokens).logits
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_dense_methods_are_reproducible_and_report_svd_error(
    llama: dict[str, Path], tmp_path: Path, method: str
) -> None:
    r1 = merge(cfg(llama, tmp_path / "a", top_k=3, method=method, seed=3))
    merge(cfg(llama, tmp_path / "b", top_k=3, method=method, seed=3))
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    for m in r1.modules:
        assert (m.svd_rel_error is not None) == m.selected
    merge(cfg(llama, tmp_path / "c", top_k=3, method=method, seed=4))
    if method != "ties":
        assert a != (tmp_path / "c" / "adapter_model.safetensors").read_bytes()


def test_svd_error_is_zero_for_linear_through_svd_with_enough_rank(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    # DARE at density 1 drops nothing: the merge is w_f ΔW_f + w_s ΔW_s, rank 4 + 4 = the output rank.
    with pytest.warns(UserWarning, match="no pruning"):
        report = merge(cfg(llama, tmp_path / "out", threshold=1.0, method="dare_linear", density=1.0))
    assert all(m.svd_rel_error is not None and m.svd_rel_error < 1e-6 for m in report.modules)
    ref = peft_deltas(
        llama["aligned"], {"task": llama["task"], "safety": llama["safety"], "out": tmp_path / "out"}
    )
    for m in report.modules:
        expected = 0.8 * ref["task"][m.name] + 0.2 * ref["safety"][m.name]
        torch.testing.assert_close(ref["out"][m.name], expected, rtol=1e-5, atol=1e-5)


def test_report_files_and_fields(llama: dict[str, Path], tmp_path: Path) -> None:
    c = cfg(llama, tmp_path / "out")
    c.run.plot = True
    merge(c)
    out = tmp_path / "out"
    for f in (
        "safemerge_report.json",
        "safemerge_report.md",
        "similarity.png",
        "README.md",
        "safemerge.yaml",
    ):
        assert (out / f).exists(), f
    data = json.loads((out / "safemerge_report.json").read_text())
    assert {
        "name",
        "rho",
        "selected",
        "merged",
        "layer",
        "module_type",
        "delta_norm_in",
        "delta_norm_out",
    } <= set(data["modules"][0])
    assert data["modules"][0]["name"] == "model.layers.0.self_attn.q_proj"
    assert len(data["inputs"]["task_adapter"]["sha256"]) == 64
    assert data["options"]["threshold"] == 0.35 and data["versions"]["peft"]
    card = (out / "README.md").read_text()
    # a local aligned model whose config names no hub id: the card leaves `base_model` out (no local path)
    assert card.startswith("---\nlibrary_name: peft\npipeline_tag: text-generation\n")
    assert str(llama["aligned"]) not in card


def test_scan_writes_report_without_merge_fields(llama: dict[str, Path], tmp_path: Path) -> None:
    report = scan(ScanConfig(aligned=str(llama["aligned"]), unaligned=str(llama["unaligned"]),
                             task_adapter=str(llama["task"]), out=str(tmp_path / "scan")))  # fmt: skip
    data = json.loads((tmp_path / "scan" / "safemerge_report.json").read_text())
    assert data["command"] == "scan" and len(data["modules"]) == len(report.modules) == 6
    assert (tmp_path / "scan" / "similarity.png").exists()
    assert not any(m["merged"] for m in data["modules"])


def test_same_inputs_give_byte_identical_outputs(llama: dict[str, Path], tmp_path: Path) -> None:
    merge(cfg(llama, tmp_path / "out", top_k=2))
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    merge(cfg(llama, tmp_path / "out", top_k=2, force=True))
    second = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert first == second


def test_modules_only_in_one_adapter(llama: dict[str, Path], tmp_path: Path) -> None:
    al = llama["aligned"]
    safety_q = save_adapter(al, tmp_path / "safety_q", seed=5, targets=["q_proj", "k_proj"])
    env = dict(llama, safety=safety_q)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge(cfg(env, tmp_path / "out", threshold=1.0, allow_partial=True))  # a partial merge
    text = " ".join(str(w.message) for w in caught)
    assert "targeted only by the safety adapter are ignored" in text
    assert "no safety counterpart" in text
    ref = peft_deltas(al, {"task": llama["task"], "out": tmp_path / "out"})
    for m in report.modules:
        if m.module_type == "v_proj":
            assert m.selected and not m.merged and "no-safety-counterpart" in m.flags
            torch.testing.assert_close(ref["out"][m.name], ref["task"][m.name], rtol=0, atol=1e-7)
        else:
            assert m.merged


def test_rank_and_alpha_patterns_and_rslora(llama: dict[str, Path], tmp_path: Path) -> None:
    al = llama["aligned"]
    task = save_adapter(al, tmp_path / "task", seed=1, r=4, alpha=8, rank_pattern={"v_proj": 2},
                        alpha_pattern={"v_proj": 3})  # fmt: skip
    safety = save_adapter(al, tmp_path / "safety", seed=2, r=4, alpha=4, use_rslora=True)
    env = dict(llama, task=task, safety=safety)
    merge(cfg(env, tmp_path / "out", top_k=4))
    ref = peft_deltas(al, {"task": task, "safety": safety, "out": tmp_path / "out"})
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert report["options"]["output_scaling"] == 1.0  # scalings differ per module: baked into A
    for m in report["modules"]:
        expected = ref["task"][m["name"]]
        if m["selected"]:
            expected = 0.8 * expected + 0.2 * ref["safety"][m["name"]]
        torch.testing.assert_close(ref["out"][m["name"]], expected, rtol=1e-5, atol=1e-6)


def test_modules_to_save_are_carried_through(llama: dict[str, Path], tmp_path: Path) -> None:
    task = save_adapter(llama["aligned"], tmp_path / "task", seed=1, modules_to_save=["lm_head"])
    with pytest.warns(UserWarning, match="modules_to_save"):
        merge(cfg(dict(llama, task=task), tmp_path / "out"))
    from safetensors.torch import load_file

    t = load_file(task / "adapter_model.safetensors")
    o = load_file(tmp_path / "out" / "adapter_model.safetensors")
    extra = [k for k in t if "lora_" not in k]
    assert extra and all(torch.equal(t[k], o[k]) for k in extra)
    model = AutoModelForCausalLM.from_pretrained(llama["aligned"], dtype=torch.float32)
    PeftModel.from_pretrained(model, tmp_path / "out")  # loads


def test_hub_ids_resolve_from_the_local_cache_offline(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    for repo, src in (("acme--aligned", "aligned"), ("acme--unaligned", "unaligned"), ("acme--task", "task")):
        root = cache / f"models--{repo}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(revision)
        shutil.copytree(llama[src], root / "snapshots" / revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    report = scan(ScanConfig(aligned="acme/aligned", unaligned="acme/unaligned", task_adapter="acme/task"))
    local = scan(ScanConfig(aligned=str(llama["aligned"]), unaligned=str(llama["unaligned"]),
                            task_adapter=str(llama["task"])))  # fmt: skip
    assert [m.rho for m in report.modules] == [m.rho for m in local.modules]
    assert report.inputs["aligned"]["revision"] == revision
    with pytest.raises(InputError, match="acme/missing"):
        scan(ScanConfig(aligned="acme/missing", unaligned="acme/unaligned", task_adapter="acme/task"))
