"""Baseline defences on tiny random models, checked against dense float64 computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import one_tensor_apart, save_adapter, save_pair
from safetensors.torch import load_file
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.defenses import (
    DefendConfig,
    defend,
    dense_projection,
    get_defense,
    linear_weight_keys,
    safelora_project,
)
from safemerge.engine.checkpoint import Checkpoint, find_module_weight
from safemerge.engine.config import ScanConfig
from safemerge.engine.criterion import dense_similarity, fraction_count, select_fraction, select_top_k
from safemerge.engine.lora import LoraAdapter
from safemerge.engine.merging import dare, module_seed
from safemerge.engine.pipeline import scan

F64 = torch.float64


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("defenses")
    al, un = save_pair(root, "llama", torch.float32, shard="40KB")
    return {
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "safety": save_adapter(al, root / "safety", seed=2, r=4, alpha=16),
    }


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    al, un = save_pair(root, "gpt2", torch.float32)
    task = save_adapter(al, root / "task", seed=1, r=4, alpha=8, arch="gpt2", fan_in_fan_out=True)
    return {"aligned": al, "unaligned": un, "task": task}


def dcfg(env: dict[str, Path], out: Path, **kw: object) -> DefendConfig:
    fields: dict[str, object] = {
        "aligned": str(env["aligned"]),
        "unaligned": str(env["unaligned"]),
        "task_adapter": str(env["task"]),
        "out": str(out),
        "plot": False,
    }
    if kw.get("method", "safemerge") in ("safemerge", "merge-all"):
        fields["safety_adapter"] = str(env["safety"])
    return DefendConfig.model_validate({**fields, **kw})


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = s · B A (Linear layout, float64) of every module of an adapter on disk."""
    ad = LoraAdapter.load(adapter)
    return {m: ad.factors(m).delta(F64) for m in ad.lora_modules}


def safety_vector(env: dict[str, Path], module: str, fan_in_fan_out: bool = False) -> torch.Tensor:
    """V = W_al − W_un in Linear layout (float64)."""
    al, un = Checkpoint(env["aligned"]), Checkpoint(env["unaligned"])
    v = al.get(find_module_weight(al, module)).to(F64) - un.get(find_module_weight(un, module)).to(F64)
    return v.T if fan_in_fan_out else v


def rhos(env: dict[str, Path]) -> dict[str, float]:
    report = scan(
        ScanConfig(
            aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_adapter=str(env["task"])
        )
    )
    return {m.name: m.rho for m in report.modules}


# --- Safe LoRA -------------------------------------------------------------------------------------
def test_safelora_projection_matches_dense_c() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(24, 40, generator=gen)
    b = torch.randn(24, 4, generator=gen)
    got = safelora_project(v, b)
    assert got is not None and got.dtype == F64
    torch.testing.assert_close(got, dense_projection(v) @ b.to(F64), rtol=1e-12, atol=1e-12)
    assert safelora_project(torch.zeros(24, 40), b) is None
    # C is not a projector: C² ≠ C, eigenvalues σ² / ‖V‖_F
    c = dense_projection(v)
    assert not torch.allclose(c @ c, c)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_safelora_threshold_matches_dense_computation(
    arch: str, env: dict[str, Path], gpt2: dict[str, Path], tmp_path: Path
) -> None:
    e = env if arch == "llama" else gpt2
    fifo = arch == "gpt2"
    rho = rhos(e)
    tau = round(sorted(rho.values())[(len(rho) - 1) // 2], 5)  # a module sits exactly at τ: ρ ≤ τ selects it
    result = defend(dcfg(e, tmp_path / "out", method="safelora", threshold=tau))
    task, got = deltas(e["task"]), deltas(tmp_path / "out")
    selected = {m.name for m in result.report.modules if m.selected}
    assert selected == {m for m, r in rho.items() if round(r, 5) <= tau}
    assert 0 < len(selected) < len(rho)
    for m, dw in task.items():
        v = safety_vector(e, m, fifo)
        assert dense_similarity(v, dw) == pytest.approx(rho[m], abs=1e-6)
        expected = dense_projection(v) @ dw if m in selected else dw
        torch.testing.assert_close(got[m], expected, rtol=1e-5, atol=1e-7)
    for rec in result.report.modules:  # the report shows what C did to ‖ΔW‖
        assert rec.delta_norm_out == pytest.approx(float(torch.linalg.vector_norm(got[rec.name])), rel=1e-6)
    assert result.modified == len(selected)
    data = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert data["defense"]["method"] == "safelora" and data["defense"]["threshold"] == tau
    assert "‖ΔW‖ out" in (tmp_path / "out" / "safemerge_report.md").read_text()


def test_safelora_loads_in_peft_and_matches(env: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    defend(dcfg(env, tmp_path / "out", method="safelora", top_k=2))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(env["aligned"]), tmp_path / "out")
    ours = deltas(tmp_path / "out")
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(
                mod.get_delta_weight("default").to(F64), ours[key], rtol=1e-5, atol=1e-7
            )


def test_safelora_top_k_selects_exactly_k_lowest_from_unmodified_weights(
    env: dict[str, Path], tmp_path: Path
) -> None:
    rho = rhos(env)
    k = 3
    result = defend(dcfg(env, tmp_path / "out", method="safelora", top_k=k))
    selected = [m.name for m in result.report.modules if m.selected]
    assert len(selected) == k == result.modified
    assert set(selected) == set(sorted(rho, key=rho.__getitem__)[:k])
    for rec in result.report.modules:  # the report's ρ are the scan's: computed from the task adapter as is
        assert rec.rho == pytest.approx(rho[rec.name], abs=1e-12)


def test_safelora_default_threshold_preserve_norm_and_full_model(
    env: dict[str, Path], tmp_path: Path
) -> None:
    assert dcfg(env, tmp_path / "x", method="safelora").resolved_selection == {"threshold": 0.5}
    result = defend(
        dcfg(env, tmp_path / "out", method="safelora", top_k=3, preserve_norm=True, merge_into_base=True)
    )
    assert result.modified > 0
    for rec in result.report.modules:
        if rec.merged:
            assert rec.delta_norm_out == pytest.approx(rec.delta_norm_in, rel=1e-6)
    assert result.full_model == tmp_path / "out" / "full_model"
    full, al = Checkpoint(tmp_path / "out" / "full_model"), Checkpoint(env["aligned"])
    got = deltas(tmp_path / "out")
    for m, dw in got.items():
        key = find_module_weight(al, m)
        torch.testing.assert_close(full.get(key).to(F64) - al.get(key).to(F64), dw, rtol=1e-4, atol=1e-6)


def test_defense_yaml_reruns_the_same_defence(env: dict[str, Path], tmp_path: Path) -> None:
    defend(dcfg(env, tmp_path / "a", method="resta", beta=0.3, scope="targeted"))
    cfg = load_config(DefendConfig, tmp_path / "a" / "defense.yaml", {"out": str(tmp_path / "b")})
    assert cfg.method == "resta" and cfg.beta == 0.3 and cfg.scope == "targeted"
    defend(cfg)
    for f in ("model.safetensors",):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_safelora_zero_v_is_flagged_and_left_unchanged(env: dict[str, Path], tmp_path: Path) -> None:
    # V = 0 on every module but one: C is undefined there (V = 0 on all of them is refused, exit 2)
    apart = "model.layers.2.self_attn.v_proj"
    un = one_tensor_apart(env["aligned"], tmp_path / "un", f"{apart}.weight")
    e = {**env, "unaligned": un}
    result = defend(dcfg(e, tmp_path / "out", method="safelora", threshold=1.0))
    assert result.modified == 1
    zero = [m for m in result.report.modules if m.name != apart]
    assert zero and all(any("zero-V" in f for f in m.flags) and not m.merged for m in zero)
    task, got = deltas(env["task"]), deltas(tmp_path / "out")
    for m, dw in task.items():
        if m != apart:
            torch.testing.assert_close(got[m], dw, rtol=1e-6, atol=1e-8)


ZERO_V_MODULE = "model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def zero_v(env: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """env with the unaligned model's weight of one LoRA module set to the aligned one: V = 0 there only."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("zero_v")
    un = AutoModelForCausalLM.from_pretrained(env["unaligned"])
    al = AutoModelForCausalLM.from_pretrained(env["aligned"])
    with torch.no_grad():
        un.get_submodule(ZERO_V_MODULE).weight.copy_(al.get_submodule(ZERO_V_MODULE).weight)
    un.save_pretrained(root / "unaligned")
    return {**env, "unaligned": root / "unaligned"}


def test_select_top_k_ranks_the_given_indices_last() -> None:
    rhos = [0.0, 0.4, 0.1, 0.3, 0.0]
    assert select_top_k(rhos, 2, last={0}) == [False, False, True, False, True]
    assert select_top_k(rhos, 4, last={0, 4}) == [True, True, True, True, False]  # ties by order
    assert select_top_k(rhos, 5, last={0, 4}) == [True] * 5  # they still fill k when nothing else is left
    assert select_fraction(rhos, 0.4, last={0}) == select_top_k(rhos, 2, last={0})
    assert select_top_k(rhos, 2) == [True, False, False, False, True]  # no `last`: as before


@pytest.mark.parametrize("policy", [{"top_k": 3}, {"fraction": 0.5}])
def test_zero_v_modules_are_ranked_last(
    policy: dict[str, object], zero_v: dict[str, Path], tmp_path: Path
) -> None:
    """A zero-V module (ρ = 0 by convention) must not take one of the k places: Safe LoRA projects k
    modules, and SafeMERGE selects the same k measured modules (the official Safe LoRA code never
    projects a V = 0 module, whose C is NaN, and fills k from the rest)."""
    rho = rhos(zero_v)
    assert rho[ZERO_V_MODULE] == 0.0
    k = 3 if "top_k" in policy else fraction_count(len(rho), 0.5)
    measured = sorted((m for m in rho if m != ZERO_V_MODULE), key=rho.__getitem__)
    result = defend(dcfg(zero_v, tmp_path / "safelora", method="safelora", **policy))
    selected = {m.name for m in result.report.modules if m.selected}
    assert selected == set(measured[:k])
    assert result.modified == k
    flagged = next(m for m in result.report.modules if m.name == ZERO_V_MODULE)
    assert "zero-V" in flagged.flags and not flagged.selected and not flagged.merged
    scanned = scan(
        ScanConfig(
            aligned=str(zero_v["aligned"]),
            unaligned=str(zero_v["unaligned"]),
            task_adapter=str(zero_v["task"]),
            **policy,
        )
    )
    assert {m.name for m in scanned.modules if m.selected} == selected
    # the threshold never selects a zero-V module (published: its cosine is NaN, and NaN ≤ τ is false)
    by_tau = defend(dcfg(zero_v, tmp_path / "tau", method="safelora", threshold=0.5))
    rec = next(m for m in by_tau.report.modules if m.name == ZERO_V_MODULE)
    assert not rec.selected and not rec.merged and "zero-V: not selected (projection undefined)" in rec.flags


# --- RESTA ----------------------------------------------------------------------------------------
RESTA_CASES = [("llama", "all-linear", False), ("llama", "targeted", True), ("gpt2", "targeted", False)]


@pytest.mark.parametrize(("arch", "scope", "use_dare"), RESTA_CASES)
def test_resta_adds_beta_v_on_the_right_tensors_only(
    arch: str, scope: str, use_dare: bool, env: dict[str, Path], gpt2: dict[str, Path], tmp_path: Path
) -> None:
    e = env if arch == "llama" else gpt2
    beta = 0.7
    kw: dict[str, object] = {"method": "resta", "beta": beta, "scope": scope}
    if use_dare:
        kw.update(dare=True, density=0.6, seed=3)
    result = defend(dcfg(e, tmp_path / "out", **kw))
    assert result.kind == "model" and result.model_dir == tmp_path / "out"
    al, un, out = Checkpoint(e["aligned"]), Checkpoint(e["unaligned"]), Checkpoint(tmp_path / "out")
    task = LoraAdapter.load(e["task"])
    fifo = task.fan_in_fan_out
    lora = {find_module_weight(al, m): m for m in task.lora_modules}
    edited = set(lora) if scope == "targeted" else set(linear_weight_keys(al))
    assert set(lora) <= edited
    if arch == "llama" and scope == "all-linear":
        leaves = {k.split(".")[-2] for k in edited}
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(out.keys()) == set(al.keys())
    for key in al.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        w_al = al.get(key)
        if key not in edited:
            assert torch.equal(out.get(key), w_al), key  # untouched, bit for bit
            continue
        expected = w_al.to(torch.float32) + beta * (w_al.to(torch.float32) - un.get(key).to(torch.float32))
        if key in lora:
            dw = task.factors(lora[key]).delta(torch.float32)
            if use_dare:
                dw = dare(dw, 0.6, module_seed(3, lora[key]))
            expected = expected + (dw.T if fifo else dw)
        torch.testing.assert_close(out.get(key), expected, rtol=1e-6, atol=1e-6)
    assert result.modified == len(edited)
    assert (tmp_path / "out" / "config.json").is_file()
    data = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert len(data["tensors"]) == len(edited)


def test_resta_output_loads_as_a_model(env: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    defend(dcfg(env, tmp_path / "out", method="resta"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3


# --- merge-all, none, scale-only ------------------------------------------------------------------
def test_merge_all_equals_safemerge_with_tau_one(env: dict[str, Path], tmp_path: Path) -> None:
    a = defend(dcfg(env, tmp_path / "all", method="merge-all"))
    b = defend(dcfg(env, tmp_path / "tau", method="safemerge", threshold=1.0))
    assert a.modified == b.modified == len(a.report.modules)
    ta = load_file(tmp_path / "all" / "adapter_model.safetensors")
    tb = load_file(tmp_path / "tau" / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (
        json.loads((tmp_path / "all" / "safemerge_report.json").read_text())["defense"]["method"]
        == "merge-all"
    )


def test_none_is_the_identity(env: dict[str, Path], tmp_path: Path) -> None:
    result = defend(dcfg(env, tmp_path / "out", method="none"))
    assert result.modified == 0 and result.kind == "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (env["task"] / name).read_bytes()
    assert (tmp_path / "out" / "safemerge_report.json").is_file()


def test_scale_only_control_scales_the_safemerge_selection(env: dict[str, Path], tmp_path: Path) -> None:
    tau = sorted(rhos(env).values())[3] + 1e-4
    sm = defend(dcfg(env, tmp_path / "sm", threshold=tau))
    ctl = defend(dcfg(env, tmp_path / "ctl", threshold=tau, weights=(0.8, 0.0), allow_any_weights=True))
    sel = {m.name for m in sm.report.modules if m.merged}
    assert sel == {m.name for m in ctl.report.modules if m.merged} and len(sel) == 4
    task, got = deltas(env["task"]), deltas(tmp_path / "ctl")
    for m, dw in task.items():
        torch.testing.assert_close(got[m], 0.8 * dw if m in sel else dw, rtol=1e-5, atol=1e-7)


def test_safemerge_defence_equals_the_merge_command(env: dict[str, Path], tmp_path: Path) -> None:
    from safemerge.engine.pipeline import merge

    defend(dcfg(env, tmp_path / "d", threshold=0.4, weights=(0.7, 0.3)))
    merge(dcfg(env, tmp_path / "unused", threshold=0.4, weights=(0.7, 0.3)).merge_config(str(tmp_path / "m")))
    ta = load_file(tmp_path / "d" / "adapter_model.safetensors")
    tm = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert all(torch.equal(ta[k], tm[k]) for k in tm)
    for f in ("safemerge_report.md", "defense.yaml", "README.md", "safemerge.yaml"):
        assert (tmp_path / "d" / f).is_file(), f
    assert not (tmp_path / "d" / "_merge").exists()


# --- configuration and CLI ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "safelora", "beta": 0.3}, "`beta` do not apply to method safelora"),
        ({"method": "resta", "weights": "0.7,0.3"}, "do not apply to method resta"),
        ({"method": "resta", "weights": "0.8,0.2"}, None),  # defaults of other methods are tolerated
        ({"method": "merge-all", "threshold": 0.3}, "`threshold` do not apply"),
        ({"method": "safemerge", "threshold": 0.3, "top_k": 2}, "only one of"),
        ({"method": "safemerge"}, "needs `safety_adapter`"),
        ({"method": "resta", "density": 0.3}, "only with `dare`"),
        ({"method": "bogus"}, "method"),
        ({"method": "none", "typo": 1}, "typo"),
    ],
)
def test_bad_options_are_rejected(overrides: dict[str, object], message: str | None) -> None:
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"}
    if message is None:
        load_config(DefendConfig, None, {**base, **overrides})
        return
    with pytest.raises(InputError, match=message):
        load_config(DefendConfig, None, {**base, **overrides})


def test_cli_defend(env: dict[str, Path], tmp_path: Path) -> None:
    inputs = ["-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(env["task"])]
    args = [
        "defend",
        "--method",
        "safelora",
        "--top-k",
        "2",
        *inputs,
        "-o",
        str(tmp_path / "out"),
        "--no-plot",
        "-q",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    res = CliRunner().invoke(app, args)  # exists, no --force
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(
        app, [*args[:2], "resta", *args[3:5], "--beta", "0.1", *args[5:11], "-o", str(tmp_path / "x")]
    )
    assert res.exit_code == 2 and "option(s) --top-k do not apply to method resta" in res.output
    help_text = CliRunner().invoke(app, ["defend", "--help"]).output
    for opt in ("--method", "--beta", "--scope", "--dare", "--preserve-norm", "--weights"):
        assert opt in help_text


# --- the registered defences --------------------------------------------------------------------------
# Which options applied to which method in 0.1.0 (its config's APPLIES table), copied as the oracle.
_COMMON = {"method", "aligned", "unaligned", "task_adapter", "out", "device", "allow_pickle", "force", "plot"}
_SELECTION = {"threshold", "top_k", "fraction"}
# Added after 0.1.0: allow_any_weights, the permission for weights outside the convex pairs (docs/engine.md).
_MERGE = {"safety_adapter", "weights", "allow_any_weights", "mode", "merge_method", "density", "seed", "rank"}
_FULL = {"merge_into_base", "max_shard_size"}
# Added after 0.1.0: full fine-tunes and sketches as inputs of every defence (docs/defenses.md).
_INPUTS = {"task_model", "modules", "subspace", "ignore_fingerprint"}
# Added after 0.1.0: partial merges are refused unless allowed (docs/engine.md, "Partial merges").
_PARTIAL = {"allow_partial"}
# Added later: the selection controls' order of a ranking policy (docs/defenses.md, "Selection controls").
_ORDER = {"order", "order_seed"}
APPLIES_0_1_0 = {
    "safemerge": _COMMON | _SELECTION | _MERGE | _FULL | _INPUTS | _PARTIAL | {"safety_model"} | _ORDER,
    "merge-all": _COMMON | _MERGE | _FULL | _INPUTS | _PARTIAL | {"safety_model"},
    "safelora": _COMMON | _SELECTION | _FULL | {"preserve_norm"} | _INPUTS,
    "resta": _COMMON | {"beta", "scope", "dare", "density", "seed", "max_shard_size"} | _INPUTS,
    "none": _COMMON | _INPUTS,
}


@pytest.mark.parametrize("method", sorted(APPLIES_0_1_0))
def test_defences_know_their_options_outputs_and_default_selection(method: str) -> None:
    defense = get_defense(method)
    assert defense.name == method and defense.applies == APPLIES_0_1_0[method]
    assert defense.output == ("model" if method == "resta" else "adapter")
    assert defense.needs == (("safety_adapter",) if method in ("safemerge", "merge-all") else ())
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o", "method": method}
    if defense.needs:
        base["safety_adapter"] = "s"
    default = {"safelora": {"threshold": 0.5}, "merge-all": {"fraction": 1.0}}.get(
        method, {"threshold": 0.35}
    )
    assert load_config(DefendConfig, None, base).resolved_selection == default
