"""`safemerge.add_safelora_adapter`: Safe LoRA on a PeftModel in memory equals `safemerge defend --method
safelora` on the same adapter and checkpoints, bit for bit (the factors PEFT would save, the rank and
alpha, the report's rows), for every selection policy, `preserve_norm`, GPT-2's fan_in_fan_out, rsLoRA
with rank/alpha patterns and zero-V modules; bad options add nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import one_tensor_apart, save_adapter, save_pair
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import safemerge
from safemerge.common.errors import InputError
from safemerge.defenses import DefendConfig, defend
from safemerge.engine.report import Report


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-safelora")
    al, un = save_pair(root, "llama", torch.float32)
    return {"aligned": al, "unaligned": un, "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8)}


def task_model(aligned: Path, task: Path) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    return PeftModel.from_pretrained(base, task, adapter_name="default")


def file_safelora(aligned: Path, unaligned: Path, task: Path, out: Path, **options: Any) -> Path:
    """`safemerge defend --method safelora` (its Python entry point) into `out`."""
    cfg = DefendConfig.model_validate(
        {"method": "safelora", "aligned": str(aligned), "unaligned": str(unaligned),
         "task_adapter": str(task), "out": str(out), "plot": False, **options}
    )  # fmt: skip
    defend(cfg)
    return out


def assert_same(model: PeftModel, name: str, out: Path, report: Report) -> None:
    ours, theirs = (
        get_peft_model_state_dict(model, adapter_name=name),
        load_file(out / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key].cpu(), t), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert (model.peft_config[name].r, model.peft_config[name].lora_alpha) == (
        config["r"],
        config["lora_alpha"],
    )
    rows = json.loads((out / "safemerge_report.json").read_text())["modules"]
    keys = ("name", "rho", "selected", "merged", "flags", "delta_norm_in", "delta_norm_out")
    assert [tuple(getattr(m, k) for k in keys) for m in report.modules] == [
        tuple(r[k] for k in keys) for r in rows
    ]


POLICIES = [
    pytest.param({}, id="default-threshold-0.5"),
    pytest.param({"threshold": 0.9}, id="threshold"),
    pytest.param({"top_k": 2}, id="top-k"),
    pytest.param({"fraction": 0.5, "preserve_norm": True}, id="fraction-preserve-norm"),
]


@pytest.mark.parametrize("options", POLICIES)
def test_add_safelora_adapter_equals_defend_bit_for_bit(
    env: dict[str, Path], tmp_path: Path, options: dict[str, Any]
) -> None:
    out = file_safelora(env["aligned"], env["unaligned"], env["task"], tmp_path / "file", **options)
    model = task_model(env["aligned"], env["task"])
    report = safemerge.add_safelora_adapter(model, str(env["unaligned"]), **options)
    assert_same(model, "safelora", out, report)
    assert report.summary["merged"] > 0 or not options
    assert model.active_adapters == ["default"]
    assert report.options["defense"] == "safelora"
    assert report.options["preserve_norm"] is bool(options.get("preserve_norm"))


def test_gpt2_fan_in_fan_out_equals_defend(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "gpt2", torch.float32)
    task = save_adapter(al, tmp_path / "task", seed=1, arch="gpt2", fan_in_fan_out=True)
    out = file_safelora(al, un, task, tmp_path / "file", top_k=1)
    model = task_model(al, task)
    report = safemerge.add_safelora_adapter(model, un, top_k=1, adapter_name="safe")
    assert report.summary["merged"] == 1
    assert_same(model, "safe", out, report)


def test_rslora_and_patterns_equal_defend(env: dict[str, Path], tmp_path: Path) -> None:
    """Different scalings per module: the scalings are baked into A and the output scaling is 1."""
    task = save_adapter(
        env["aligned"], tmp_path / "task", seed=3, r=4, alpha=6, use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5},
    )  # fmt: skip
    out = file_safelora(env["aligned"], env["unaligned"], task, tmp_path / "file", fraction=0.5)
    model = task_model(env["aligned"], task)
    report = safemerge.add_safelora_adapter(model, env["unaligned"], fraction=0.5)
    assert report.options["output_scaling"] == 1.0
    assert_same(model, "safelora", out, report)


def test_zero_v_modules_are_flagged_as_defend_flags_them(env: dict[str, Path], tmp_path: Path) -> None:
    apart = "model.layers.2.self_attn.v_proj"
    un = one_tensor_apart(env["aligned"], tmp_path / "un", f"{apart}.weight")
    out = file_safelora(env["aligned"], un, env["task"], tmp_path / "file", top_k=3)
    model = task_model(env["aligned"], env["task"])
    report = safemerge.add_safelora_adapter(model, un, top_k=3)
    assert report.summary["merged"] == 1
    assert any("zero-V" in f for m in report.modules for f in m.flags)
    assert_same(model, "safelora", out, report)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"threshold": 0.5, "top_k": 2}, "invalid options"),
        ({"treshold": 0.5}, "did you mean threshold"),
        ({"weights": (0.5, 0.5)}, "unknown option 'weights'"),
        ({"adapter_name": "default"}, "already has an adapter 'default'"),
        ({"task": "nope"}, "no adapter 'nope'"),
    ],
)
def test_bad_options_are_input_errors_and_add_nothing(
    env: dict[str, Path], options: dict[str, Any], match: str
) -> None:
    model = task_model(env["aligned"], env["task"])
    with pytest.raises(InputError, match=match):
        safemerge.add_safelora_adapter(model, env["unaligned"], **options)
    assert list(model.peft_config) == ["default"]
