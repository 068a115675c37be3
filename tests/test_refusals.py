"""Adapters and settings that safemerge refuses, its warnings and the dtype of merged factors
(docs/engine.md, "Adapters and settings that are refused").

Oracles: PEFT itself (its PiSSA / OLoRA initialisation, its conversion to a plain LoRA, its merged
weights), float64 products formed here, and the words of the messages.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from builders import edited_copy, merge_args, pair_with_adapters, save_adapter
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import SafemergeWarning
from safemerge.defenses import DefendConfig
from safemerge.engine.config import MergeConfig
from safemerge.engine.pipeline import merge

runner = CliRunner()
F64 = torch.float64
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    return pair_with_adapters(root)


def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def assert_refused(args: list[str], out: Path | None, *words: str) -> str:
    code, text = invoke(args)
    assert code == 2, text
    flat = " ".join(text.split())
    for word in words:
        assert word in flat, (word, text)
    assert "Traceback" not in text
    if out is not None:
        assert not out.exists()
    return flat


# --- PiSSA / OLoRA: PEFT rewrites the base weights when it loads them ------------------------------
def peft_init_adapter(al: Path, out: Path, init: str, convert: bool) -> Path:
    """An adapter initialised by PEFT with `init` (PiSSA / OLoRA), its factors then moved as by training.
    `convert`: saved as PEFT documents for a plain LoRA (the initial adapter saved first with
    init_lora_weights=True, then `path_initial_model_for_weight_conversion`); else the default way."""
    model = AutoModelForCausalLM.from_pretrained(al, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    peft_model = get_peft_model(model, cfg)
    initial = out.parent / f"{out.name}-initial"
    if convert:
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = init
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    if convert:
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
    else:
        peft_model.save_pretrained(out)
    return out


def peft_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The linear weights of `base` with `adapter` loaded and merged by PEFT (float64), by module."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k.removesuffix(".weight"): v.to(F64) for k, v in merged.state_dict().items() if "proj" in k}


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".weight"): v.to(F64) for k, v in load_file(base / "model.safetensors").items()}


def stored_delta(adapter: Path, module: str) -> torch.Tensor:
    """s · B A of one module, from the adapter's files (float64)."""
    t, cfg = (
        load_file(adapter / "adapter_model.safetensors"),
        json.loads((adapter / "adapter_config.json").read_text()),
    )
    a, b = (t[f"{PREFIX}{module}.lora_{w}.weight"].to(F64) for w in "AB")
    return cfg["lora_alpha"] / cfg["r"] * (b @ a)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_adapter_saved_the_default_way_is_refused(
    env: dict[str, Path], tmp_path: Path, init: str
) -> None:
    task = peft_init_adapter(env["aligned"], tmp_path / init, init, convert=False)
    # premise: PEFT loads it as something else than W + s·B A (it rewrote the base weight)
    module = "model.layers.0.self_attn.q_proj"
    loaded = peft_weights(env["aligned"], task)[module] - base_weights(env["aligned"])[module]
    assert not torch.allclose(loaded, stored_delta(task, module), atol=1e-3)
    out = tmp_path / "out"
    flat = assert_refused(
        merge_args(env, out, task=task), out, "adapter_config.json", f"init_lora_weights '{init}'"
    )
    assert "path_initial_model_for_weight_conversion" in flat and "not s·B·A" in flat
    # the safety adapter and scan are refused the same way
    assert_refused(merge_args(env, out, safety=task), out, f"init_lora_weights '{init}'")
    scan = ["scan", "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(task)]
    assert_refused(scan, None, f"init_lora_weights '{init}'")


def test_pissa_niter_corda_loftq_lora_ga_and_unknown_inits_are_refused(
    env: dict[str, Path], tmp_path: Path
) -> None:
    for value, words in [
        ("pissa_niter_16", "path_initial_model_for_weight_conversion"),
        ("corda", "path_initial_model_for_weight_conversion"),
        ("lora_ga", "path_initial_model_for_weight_conversion"),
        ("loftq", "cannot be merged"),
        ("fancy", "unknown to safemerge"),
    ]:
        task = tmp_path / value
        shutil.copytree(env["task"], task)
        cfg = json.loads((task / "adapter_config.json").read_text())
        (task / "adapter_config.json").write_text(json.dumps(cfg | {"init_lora_weights": value}))
        out = tmp_path / f"out-{value}"
        assert_refused(merge_args(env, out, task=task), out, f"init_lora_weights '{value}'", words)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapter_merges_as_peft_loads_it(env: dict[str, Path], tmp_path: Path, init: str) -> None:
    """The same adapter converted by PEFT is a plain LoRA (rank 2r): the merge's unselected module is
    PEFT's loaded update of the converted adapter, the selected one 0.8 of it + 0.2 of the safety's."""
    task = peft_init_adapter(env["aligned"], tmp_path / init, init, convert=True)
    assert json.loads((task / "adapter_config.json").read_text())["init_lora_weights"] is True
    out = tmp_path / "out"
    code, text = invoke([*merge_args(env, out, task=task), "--top-k", "1"])
    assert code == 0, text
    report = json.loads((out / "safemerge_report.json").read_text())
    selected = [m["name"] for m in report["modules"] if m["selected"]]
    unselected = [m["name"] for m in report["modules"] if not m["selected"]]
    base = base_weights(env["aligned"])
    want_task, want_safety, got = (peft_weights(env["aligned"], a) for a in (task, env["safety"], out))
    for module in unselected[:1] + selected:
        expected = want_task[module] - base[module]
        if module in selected:
            expected = 0.8 * expected + 0.2 * (want_safety[module] - base[module])
        torch.testing.assert_close(got[module] - base[module], expected, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_output_config_says_init_lora_weights_true(env: dict[str, Path], tmp_path: Path) -> None:
    """An accepted init that is not PEFT's default (orthogonal, with a data-driven init's settings) is
    not carried into the merged adapter's config: it is PEFT's default True, the init's settings reset."""
    task = tmp_path / "task"
    shutil.copytree(env["task"], task)
    cfg = json.loads((task / "adapter_config.json").read_text())
    (task / "adapter_config.json").write_text(
        json.dumps(cfg | {"init_lora_weights": "orthogonal", "eva_config": {"rho": 2.0}})
    )
    out = tmp_path / "out"
    code, text = invoke(merge_args(env, out, task=task))
    assert code == 0, text
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["eva_config"] is None


# --- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--threshold", "-0.2"], ["threshold", "[0, 1]", "-0.2"]),
        (["--threshold", "1.5"], ["threshold", "[0, 1]", "1.5"]),
        (["--top-k", "0"], ["top_k", "at least 1"]),
        (["--top-k", "-3"], ["top_k", "at least 1"]),
        (["--fraction", "0"], ["fraction", "(0, 1]"]),
        (["--fraction", "1.5"], ["fraction", "(0, 1]"]),
        (["--weights", "2,-1"], ["weights", "[0, 1]", "sum to 1", "--allow-any-weights"]),
        (["--weights", "0.7,0.4"], ["weights", "sum to 1", "0.7,0.4"]),
        (["--weights", "0.8,0"], ["weights", "--allow-any-weights"]),
        (["--weights", "nan,1", "--allow-any-weights"], ["weights", "finite"]),
    ],
)
def test_meaningless_settings_are_refused(
    env: dict[str, Path], tmp_path: Path, flags: list[str], words: list[str]
) -> None:
    out = tmp_path / "out"
    assert_refused([*merge_args(env, out), *flags], out, *words)


def test_defend_and_experiment_cells_validate_the_same_settings(env: dict[str, Path], tmp_path: Path) -> None:
    base = [
        "defend", "-m", "safemerge", "-a", str(env["aligned"]), "-u", str(env["unaligned"]),
        "-t", str(env["task"]), "--safety-adapter", str(env["safety"]), "--out", str(tmp_path / "d"),
    ]  # fmt: skip
    assert_refused([*base, "--threshold", "-0.2"], tmp_path / "d", "threshold", "[0, 1]")
    assert_refused([*base, "--weights", "2,-1"], tmp_path / "d", "weights", "--allow-any-weights")
    flat = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "safety_adapter": "s", "out": "o"}
    for bad in ({"top_k": 0}, {"fraction": 0.0}, {"threshold": 2.0}, {"weights": [0.9, 0.3]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DefendConfig.from_flat(**flat, **bad)
    # the scale-only control and task arithmetic's negation, asked for explicitly
    for weights in ([0.8, 0.0], [1.0, -0.5]):
        cfg = DefendConfig.from_flat(**flat, weights=weights, allow_any_weights=True)
        assert cfg.merge.weights == tuple(weights)
        assert "allow_any_weights" not in cfg.settings()  # permits a value; not part of a cell's key


def test_any_weights_when_asked_for(env: dict[str, Path], tmp_path: Path) -> None:
    """--allow-any-weights: weights (1, -1) subtract the safety update from the selected modules."""
    out = tmp_path / "out"
    code, text = invoke([*merge_args(env, out), "--top-k", "2", "--weights", "1,-1", "--allow-any-weights"])
    assert code == 0, text
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["options"]["weights"] == [1.0, -1.0] and report["options"]["allow_any_weights"] is True
    module = next(m["name"] for m in report["modules"] if m["selected"])
    want = stored_delta(env["task"], module) - stored_delta(env["safety"], module)
    torch.testing.assert_close(
        peft_weights(env["aligned"], out)[module] - base_weights(env["aligned"])[module], want
    )


def test_top_k_above_the_number_of_modules_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_refused([*merge_args(env, out), "--top-k", "100"], out, "top_k 100", "6 modules")
    code, text = invoke([*merge_args(env, out), "--top-k", "6"])  # every module: allowed
    assert code == 0, text
    # a full fine-tune: 3 layers x 7 projections
    ft = edited_copy(env["aligned"], tmp_path / "ft", lambda t: t.update({k: v + 0.01 for k, v in t.items()}))
    scan = ["scan", "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "--task-model", str(ft)]
    assert_refused([*scan, "--top-k", "22"], None, "top_k 22", "21 modules")
    code, text = invoke([*scan, "--top-k", "21"])
    assert code == 0, text


# --- an adapter where a model is expected ----------------------------------------------------------
def test_eval_and_train_refuse_an_adapter_as_the_model(env: dict[str, Path], tmp_path: Path) -> None:
    task = str(env["task"])
    out = tmp_path / "eval"
    flat = assert_refused(
        ["eval", "--model", task, "--benchmarks", "harmbench", "--out", str(out)], out,
        f"{task} is a PEFT adapter, not a model", f"--adapter {task}",
    )  # fmt: skip
    assert "sentencepiece" not in flat
    out = tmp_path / "train"
    assert_refused(
        ["train", "--model", task, "--recipe", "arithmetic", "--out", str(out)], out,
        f"{task} is a PEFT adapter, not a model",
    )  # fmt: skip


# --- warnings --------------------------------------------------------------------------------------
def test_warnings_are_printed_once_styled_and_all_reported(env: dict[str, Path], tmp_path: Path) -> None:
    """A task adapter with modules_to_save and a safety adapter with 9 modules the task lacks: each
    warning once on the console, as `warning: …` without Python's source line; the report lists every
    module (no "...")."""
    al = env["aligned"]
    task = save_adapter(al, tmp_path / "task", seed=1, targets=["q_proj"], modules_to_save=["lm_head"])
    safety = save_adapter(al, tmp_path / "safety", seed=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    out = tmp_path / "out"
    result = runner.invoke(app, merge_args(env, out, task=task, safety=safety), env={"COLUMNS": "400"})
    text = result.output  # stdout and stderr as the user sees them, interleaved
    assert result.exit_code == 0, text
    report = json.loads((out / "safemerge_report.json").read_text())
    warned = report["warnings"]
    only_safety = [
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("k_proj", "v_proj", "o_proj")
    ]
    assert any("modules_to_save" in w and "lm_head" in w for w in warned)
    (ignored,) = [w for w in warned if "targeted only by the safety adapter" in w]
    assert all(m in ignored for m in only_safety) and "..." not in ignored
    flat = " ".join(text.split())
    for w in warned:
        assert flat.count(" ".join(w.split())) == 1, (w, text)
        assert f"warning: {' '.join(w.split())}" in flat
    assert "UserWarning" not in text and "SafemergeWarning" not in text
    assert not re.search(r"\.py:\d+", text), text


def test_a_warning_raised_per_module_is_printed_once(env: dict[str, Path], tmp_path: Path) -> None:
    """DARE at density 1 warns for each merged module (merging.merge_dense): the console shows it once,
    the report has it once."""
    out = tmp_path / "out"
    args = [*merge_args(env, out), "--top-k", "3", "--method", "dare_linear", "--density", "1"]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    words = "The density 1.0 is greater than or equal to 1, no pruning will be performed."
    assert result.output.count(words) == 1, result.output
    assert json.loads((out / "safemerge_report.json").read_text())["warnings"] == [words]


def test_python_api_users_still_get_python_warnings(env: dict[str, Path], tmp_path: Path) -> None:
    task = save_adapter(env["aligned"], tmp_path / "task", seed=1, modules_to_save=["lm_head"])
    cfg = MergeConfig.from_flat(
        aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_adapter=str(task),
        safety_adapter=str(env["safety"]), out=str(tmp_path / "out"), plot=False,
    )  # fmt: skip
    with pytest.warns(SafemergeWarning, match="modules_to_save") as rec:
        report = merge(cfg)
    assert [str(w.message) for w in rec if "modules_to_save" in str(w.message)] == [
        w for w in report.warnings if "modules_to_save" in w
    ]


# --- dtype -----------------------------------------------------------------------------------------
def test_bfloat16_adapter_merges_into_float32_factors(env: dict[str, Path], tmp_path: Path) -> None:
    """Merged factors of bfloat16 adapters are written in float32 (rounding them to bfloat16 would err by
    ~1e-3·‖ΔW‖); an unselected module is the task's factors upcast exactly; the report says float32."""

    def to_bf16(t: dict[str, torch.Tensor]) -> None:
        t.update({k: v.to(torch.bfloat16) for k, v in t.items()})

    task, safety = (
        edited_copy(env[n], tmp_path / n, to_bf16, weights="adapter_model.safetensors")
        for n in ("task", "safety")
    )
    out = tmp_path / "out"
    code, text = invoke([*merge_args(env, out, task=task, safety=safety), "--top-k", "3"])
    assert code == 0, text
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["options"]["output_dtype"] == "float32"
    merged, given = (
        load_file(out / "adapter_model.safetensors"),
        load_file(task / "adapter_model.safetensors"),
    )
    assert {t.dtype for t in merged.values()} == {torch.float32}
    for m in report["modules"]:
        a = merged[f"{PREFIX}{m['name']}.lora_A.weight"].to(F64)
        b = merged[f"{PREFIX}{m['name']}.lora_B.weight"].to(F64)
        if not m["selected"]:  # zero-padded task factors, bit for bit
            a_task = given[f"{PREFIX}{m['name']}.lora_A.weight"]
            assert torch.equal(
                merged[f"{PREFIX}{m['name']}.lora_A.weight"][: a_task.shape[0]], a_task.float()
            )
            continue
        want = 0.8 * stored_delta(task, m["name"]) + 0.2 * stored_delta(safety, m["name"])
        scale = report["options"]["output_scaling"]
        err = float((scale * (b @ a) - want).norm() / want.norm())
        assert err < 1e-6, err  # in bfloat16 the factors alone would err by ~1e-3


def test_bfloat16_stored_input_premise(env: dict[str, Path], tmp_path: Path) -> None:
    """Premise of the test above: the merged factors rounded to bfloat16 would err by more than 1e-4."""
    task = load_file(env["task"] / "adapter_model.safetensors")
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
    a = task[key].to(F64)
    rounded = a.to(torch.bfloat16).to(F64)
    assert float((rounded - a).norm() / a.norm()) > 1e-4
