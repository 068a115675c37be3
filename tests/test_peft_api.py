"""The in-memory API on a PeftModel (`safemerge.peft`, docs/python-api.md): the same ρ and the same factors
as the CLI's `scan` / `merge` on the same adapters saved to disk, bit for bit; the same refusals; the
report's DataFrame and notebook views; and every snippet of docs/python-api.md, executed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import pair_with_adapters, save_adapter, save_pair
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import safemerge
from safemerge.cli import app
from safemerge.common.errors import InputError, SafemergeWarning

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peftapi")
    return pair_with_adapters(root)


def peft_model(aligned: Path, task: Path, safety: Path, dtype: torch.dtype = torch.float32) -> PeftModel:
    """The notebook user's model: the aligned base with the task adapter ("default") and "safety"."""
    base = AutoModelForCausalLM.from_pretrained(aligned, dtype=dtype)
    model = PeftModel.from_pretrained(base, task, adapter_name="default")
    model.load_adapter(safety, adapter_name="safety")
    return model


def cli(*args: str) -> None:
    result = runner.invoke(app, list(args), env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output


def cli_merge(aligned: Path, unaligned: Path, task: Path, safety: Path, out: Path, *flags: str) -> Path:
    cli(
        "merge", "--aligned", str(aligned), "--unaligned", str(unaligned), "--task-adapter", str(task),
        "--safety-adapter", str(safety), "--out", str(out), "--no-plot", "-q", *flags,
    )  # fmt: skip
    return out


def in_memory_tensors(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """The adapter `name` of the model as PEFT saves it (`save_pretrained`: the file's keys)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=name)


def assert_same_adapter(model: PeftModel, name: str, out: Path) -> None:
    """The in-memory adapter equals the CLI's adapter file: the same keys and the same tensors (torch.equal,
    dtype included), and the same rank and alpha."""
    ours, theirs = in_memory_tensors(model, name), load_file(out / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        assert torch.equal(ours[key].cpu(), t), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert (model.peft_config[name].r, model.peft_config[name].lora_alpha) == (
        config["r"],
        config["lora_alpha"],
    )


def cli_report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "safemerge_report.json").read_text()))


MERGES = [
    pytest.param({}, (), id="default"),
    pytest.param({"top_k": 3, "weights": (0.7, 0.3)}, ("--top-k", "3", "--weights", "0.7,0.3"), id="top-k"),
    pytest.param(
        {"fraction": 0.5, "method": "ties", "density": 0.6, "seed": 3, "rank": 6},
        ("--fraction", "0.5", "--method", "ties", "--density", "0.6", "--seed", "3", "--rank", "6"),
        id="ties",
    ),
    pytest.param(
        {"fraction": 1.0, "mode": "peft-linear"}, ("--fraction", "1", "--mode", "peft-linear"), id="peft"
    ),
    pytest.param({"merge_all": True}, ("--fraction", "1"), id="merge-all"),
]


@pytest.mark.parametrize(("options", "flags"), MERGES)
def test_add_safemerge_adapter_equals_the_cli_merge_bit_for_bit(
    env: dict[str, Path], tmp_path: Path, options: dict[str, Any], flags: tuple[str, ...]
) -> None:
    out = cli_merge(env["aligned"], env["unaligned"], env["task"], env["safety"], tmp_path / "cli", *flags)
    model = peft_model(env["aligned"], env["task"], env["safety"])
    report = safemerge.add_safemerge_adapter(model, str(env["unaligned"]), **options)
    assert_same_adapter(model, "safemerged", out)
    theirs = cli_report(out)
    assert [(m.name, m.rho, m.selected, m.merged) for m in report.modules] == [
        (m["name"], m["rho"], m["selected"], m["merged"]) for m in theirs["modules"]
    ]
    assert report.summary == theirs["summary"]
    assert model.active_adapters == ["default"]  # the active adapter is left as it was
    if options.get("merge_all"):
        assert report.options["selection_policy"] == "all modules (merge-all)"


def test_scan_rho_equals_the_cli_scan(env: dict[str, Path], tmp_path: Path) -> None:
    cli(
        "scan", "--aligned", str(env["aligned"]), "--unaligned", str(env["unaligned"]),
        "--task-adapter", str(env["task"]), "--out", str(tmp_path / "scan"), "--no-plot", "-q",
        "--top-k", "2",
    )  # fmt: skip
    model = peft_model(env["aligned"], env["task"], env["safety"])
    report = safemerge.scan_peft_model(model, env["unaligned"], top_k=2)
    theirs = cli_report(tmp_path / "scan")["modules"]
    assert [(m.name, m.rho, m.selected) for m in report.modules] == [
        (m["name"], m["rho"], m["selected"]) for m in theirs
    ]
    assert sum(m.selected for m in report.modules) == 2
    assert list(model.peft_config) == ["default", "safety"]  # a scan adds nothing


def test_unaligned_as_a_model_or_a_state_dict_gives_the_same_rho(env: dict[str, Path]) -> None:
    model = peft_model(env["aligned"], env["task"], env["safety"])
    unaligned = AutoModelForCausalLM.from_pretrained(env["unaligned"], dtype=torch.float32)
    rhos = [[m.rho for m in safemerge.scan_peft_model(model, u).modules] for u in (
        env["unaligned"], unaligned, unaligned.state_dict(), unaligned.model.state_dict()
    )]  # fmt: skip
    assert rhos[1:] == [rhos[0]] * 3


def test_gpt2_fan_in_fan_out_equals_the_cli(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "gpt2", torch.float32)
    task = save_adapter(al, tmp_path / "task", seed=1, arch="gpt2", fan_in_fan_out=True)
    safety = save_adapter(al, tmp_path / "safety", seed=2, arch="gpt2", fan_in_fan_out=True)
    out = cli_merge(al, un, task, safety, tmp_path / "cli", "--threshold", "0.9")
    model = peft_model(al, task, safety)
    report = safemerge.add_safemerge_adapter(model, un, threshold=0.9)
    assert report.summary["merged"] > 0
    assert_same_adapter(model, "safemerged", out)


def test_rslora_and_rank_alpha_patterns_equal_the_cli(env: dict[str, Path], tmp_path: Path) -> None:
    task = save_adapter(
        env["aligned"], tmp_path / "task", seed=3, r=4, alpha=6, use_rslora=True,
        rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 5},
    )  # fmt: skip
    out = cli_merge(
        env["aligned"], env["unaligned"], task, env["safety"], tmp_path / "cli", "--fraction", "1"
    )
    model = peft_model(env["aligned"], task, env["safety"])
    safemerge.add_safemerge_adapter(model, env["unaligned"], fraction=1.0)
    assert_same_adapter(model, "safemerged", out)


def test_bf16_model_and_checkpoints_equal_the_cli(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "llama", torch.bfloat16)
    task, safety = save_adapter(al, tmp_path / "task", seed=1), save_adapter(al, tmp_path / "safety", seed=2)
    out = cli_merge(al, un, task, safety, tmp_path / "cli", "--threshold", "0.5")
    model = peft_model(al, task, safety, dtype=torch.bfloat16)
    report = safemerge.add_safemerge_adapter(model, un, threshold=0.5)
    assert [m.rho for m in report.modules] == [m["rho"] for m in cli_report(out)["modules"]]
    assert_same_adapter(model, "safemerged", out)


def test_modules_to_save_are_copied_as_the_cli_copies_them(env: dict[str, Path], tmp_path: Path) -> None:
    task = save_adapter(env["aligned"], tmp_path / "task", seed=1, modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafemergeWarning)
        out = cli_merge(env["aligned"], env["unaligned"], task, env["safety"], tmp_path / "cli")
    model = peft_model(env["aligned"], task, env["safety"])
    with pytest.warns(SafemergeWarning, match="modules_to_save"):
        report = safemerge.add_safemerge_adapter(model, env["unaligned"])
    assert any("lm_head" in w for w in report.warnings)
    assert_same_adapter(model, "safemerged", out)  # the trained lm_head copy included


def test_the_merged_adapter_generates_as_the_cli_adapter(env: dict[str, Path], tmp_path: Path) -> None:
    """An oracle outside safemerge: PEFT's forward pass with the in-memory adapter active equals PEFT's
    with the CLI's adapter loaded from disk."""
    out = cli_merge(env["aligned"], env["unaligned"], env["task"], env["safety"], tmp_path / "cli")
    model = peft_model(env["aligned"], env["task"], env["safety"])
    safemerge.add_safemerge_adapter(model, env["unaligned"])
    model.set_adapter("safemerged")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    base = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


# --- refusals ------------------------------------------------------------------------------------------
@pytest.fixture
def model(env: dict[str, Path]) -> PeftModel:
    return peft_model(env["aligned"], env["task"], env["safety"])


REFUSALS = [
    pytest.param(
        {"threshold": 1.5}, r"invalid options: threshold: threshold must lie in \[0, 1\]", id="threshold"
    ),
    pytest.param({"top_k": 0}, "invalid options: top_k: top_k must be at least 1", id="top-k"),
    pytest.param(
        {"threshold": 0.3, "top_k": 2}, "give only one of `threshold`, `top_k`, `fraction`", id="two-policies"
    ),
    pytest.param({"weights": (0.8, 0.8)}, "weights must each lie in", id="weights"),
    pytest.param({"treshold": 0.3}, r"unknown option 'treshold' \(did you mean threshold\?\)", id="typo"),
    pytest.param({"merge_into_base": True}, "merge_into_base does not apply in memory", id="full-model"),
    pytest.param({"merge_all": True, "threshold": 0.3}, "merge_all merges every module", id="merge-all"),
    pytest.param({"task": "nope"}, "the model has no adapter 'nope' \\(task adapter\\)", id="no-adapter"),
    pytest.param({"safety": "default"}, "the task and safety adapters must differ", id="same-adapter"),
    pytest.param({"adapter_name": "safety"}, "the model already has an adapter 'safety'", id="name-taken"),
    pytest.param({"top_k": 7}, "top_k 7 is more than the 6 modules scanned", id="top-k-above-n"),
]


@pytest.mark.parametrize(("options", "match"), REFUSALS)
def test_bad_options_are_input_errors_and_add_nothing(
    env: dict[str, Path], model: PeftModel, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(InputError, match=match):
        safemerge.add_safemerge_adapter(model, env["unaligned"], **options)
    assert list(model.peft_config) == ["default", "safety"]


def test_the_model_base_weights_as_unaligned_are_refused(env: dict[str, Path], model: PeftModel) -> None:
    with pytest.raises(InputError, match="holds the model's own base weights in all 6 LoRA modules"):
        safemerge.scan_peft_model(model, env["aligned"])
    bf16 = peft_model(env["aligned"], env["task"], env["safety"], dtype=torch.bfloat16)
    with pytest.raises(InputError, match="holds the model's own base weights"):  # the same model, rounded
        safemerge.add_safemerge_adapter(bf16, env["aligned"])
    with pytest.raises(InputError, match="unaligned holds LoRA layers"):
        safemerge.scan_peft_model(model, model.get_base_model())
    assert list(model.peft_config) == ["default", "safety"]


def test_partial_merges_are_refused_without_allow_partial(env: dict[str, Path], tmp_path: Path) -> None:
    safety = save_adapter(env["aligned"], tmp_path / "safety-q", seed=2, targets=["q_proj"])
    model = peft_model(env["aligned"], env["task"], safety)
    with pytest.raises(
        InputError, match=r"3 of the 6 selected modules have no counterpart .* allow_partial=True"
    ):
        safemerge.add_safemerge_adapter(model, env["unaligned"], fraction=1.0)
    assert "safemerged" not in model.peft_config
    with pytest.warns(SafemergeWarning, match="kept as fine-tuned"):
        report = safemerge.add_safemerge_adapter(model, env["unaligned"], fraction=1.0, allow_partial=True)
    assert report.summary["merged"] == 3
    flags = ("--fraction", "1", "--allow-partial")
    out = cli_merge(env["aligned"], env["unaligned"], env["task"], safety, tmp_path / "cli", *flags)
    assert_same_adapter(model, "safemerged", out)


def test_base_rewriting_inits_and_other_models_are_refused(env: dict[str, Path], model: PeftModel) -> None:
    model.peft_config["safety"].init_lora_weights = "pissa"
    with pytest.raises(
        InputError, match=r"adapter 'safety' \(safety adapter\) of the PeftModel: init_lora_weights"
    ):
        safemerge.add_safemerge_adapter(model, env["unaligned"])
    base = model.get_base_model()
    with pytest.raises(InputError, match=r"model must be a peft\.PeftModel"):
        safemerge.scan_peft_model(base, env["unaligned"])
    with pytest.raises(InputError, match="unaligned must be a directory, a hub id, a model or a state dict"):
        safemerge.scan_peft_model(model, 3)


def test_a_failure_after_add_adapter_removes_the_adapter(
    env: dict[str, Path], model: PeftModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safemerge.peft

    def broken(*args: object) -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(safemerge.peft, "_fill", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        safemerge.add_safemerge_adapter(model, env["unaligned"])
    assert list(model.peft_config) == ["default", "safety"]


def test_merged_adapters_are_refused(env: dict[str, Path], model: PeftModel) -> None:
    model.merge_adapter()  # the base weights are no longer the aligned model's
    with pytest.raises(InputError, match="has adapters merged into its base weight"):
        safemerge.scan_peft_model(model, env["unaligned"])


def test_an_adapter_built_on_the_unaligned_model_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    task = save_adapter(env["aligned"], tmp_path / "task", seed=1)
    config = json.loads((task / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(env["unaligned"])
    (task / "adapter_config.json").write_text(json.dumps(config))
    model = peft_model(env["aligned"], task, env["safety"])
    with pytest.raises(InputError, match=r"names .* the unaligned model, as its base"):
        safemerge.scan_peft_model(model, env["unaligned"])


# --- the report's views --------------------------------------------------------------------------------
def test_to_pandas_has_one_row_per_module(env: dict[str, Path], model: PeftModel) -> None:
    report = safemerge.add_safemerge_adapter(model, env["unaligned"])
    df = report.to_pandas()
    assert len(df) == 6
    first = ["name", "layer", "module_type", "shape", "rank_task", "rho", "rho_rounded", "selected"]
    assert list(df.columns[:8]) == first
    assert {"merged", "w_task", "w_safety", "delta_norm_out", "flags"} <= set(df.columns)
    assert df["rho"].tolist() == [m.rho for m in report.modules]
    assert df["merged"].sum() == report.summary["merged"]


def test_repr_html_escapes_names(env: dict[str, Path], model: PeftModel) -> None:
    report = safemerge.scan_peft_model(model, env["unaligned"])
    report.modules[0].name = "model.<b>odd</b>&q_proj"
    page = report._repr_html_()
    assert "model.&lt;b&gt;odd&lt;/b&gt;&amp;q_proj" in page
    assert "<b>odd" not in page
    assert page.count("<tr>") == 7  # the header and one row per module
    assert "of 6 modules selected" in page


def test_import_safemerge_does_not_import_peft() -> None:
    code = "import sys, safemerge; assert 'peft' not in sys.modules; safemerge.scan_peft_model; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr


# --- docs/python-api.md, executed ----------------------------------------------------------------------
def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_python_api_doc_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook journey of docs/python-api.md on tiny models: the hub ids it names are replaced by
    local directories, and every ```python block runs, in order, in one namespace."""
    from builders import tiny_chat_setup

    setup = tiny_chat_setup(tmp_path / "models")
    names = {
        "meta-llama/Llama-3.1-8B-Instruct": setup["aligned"],
        "meta-llama/Llama-3.1-8B": setup["unaligned"],
        "you/llama-3.1-8b-gsm8k-lora": setup["task"],
        "you/llama-3.1-8b-safety-lora": setup["safety"],
    }
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks()
    assert len(blocks) >= 4
    namespace: dict[str, Any] = {}
    for block in blocks:
        code = block
        for hub_id, local in names.items():
            code = code.replace(f'"{hub_id}"', repr(str(local)))
        assert "meta-llama" not in code and "you/" not in code, code
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SafemergeWarning)
            exec(compile(code, str(DOC), "exec"), namespace)
    saved = tmp_path / "gsm8k-safemerged"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / ".safemerge-output").is_file()
