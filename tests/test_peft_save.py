"""`safemerge.save_safemerged` (docs/python-api.md, "Save and share"): an adapter merged in memory saved
as the folder `safemerge merge` writes. Oracles: the CLI's own output for the same inputs (tensors bit
for bit, the report's rows), PEFT's `PeftModel.from_pretrained` (the same logits as the adapter in
memory), huggingface_hub's card reader, and `safemerge push` against a recording fake `HfApi`."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from builders import pair_with_adapters
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import safemerge
import safemerge.peft as peft_api
from safemerge.cli import app
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.common.outdir import MARKER
from safemerge.defenses import DefendConfig, defend
from safemerge.engine import push
from safemerge.engine.push import check_pushable

runner = CliRunner()
LICENSE_CARD = "---\nlicense: llama3.1\n---\n# the base model\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny pair with a task and a safety LoRA; the aligned model saved as if loaded from the hub id
    `org/aligned` (its config's `_name_or_path`) with a licensed card."""
    root = tmp_path_factory.mktemp("peftsave")
    env = pair_with_adapters(root)
    config = json.loads((env["aligned"] / "config.json").read_text())
    (env["aligned"] / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/aligned"}))
    (env["aligned"] / "README.md").write_text(LICENSE_CARD)
    return env


def peft_model(env: dict[str, Path]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, env["task"], adapter_name="default")
    model.load_adapter(env["safety"], adapter_name="safety")
    return model


def merged(env: dict[str, Path], **options: Any) -> tuple[PeftModel, Any]:
    model = peft_model(env)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafemergeWarning)
        report = safemerge.add_safemerge_adapter(model, str(env["unaligned"]), **options)
    return model, report


def cli_merge(env: dict[str, Path], out: Path, *flags: str) -> Path:
    args = [
        "merge", "--aligned", str(env["aligned"]), "--unaligned", str(env["unaligned"]),
        "--task-adapter", str(env["task"]), "--safety-adapter", str(env["safety"]), "--out", str(out), "-q",
        *flags,
    ]  # fmt: skip
    result = runner.invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return out


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    ("options", "flags"),
    [
        pytest.param({}, (), id="default"),
        pytest.param(
            {"fraction": 0.5, "method": "ties", "density": 0.6, "seed": 3, "rank": 6},
            ("--fraction", "0.5", "--merge-method", "ties", "--density", "0.6", "--seed", "3", "--rank", "6"),
            id="ties",
        ),
        pytest.param({"merge_all": True}, ("--fraction", "1"), id="merge-all"),
    ],
)
def test_the_saved_folder_is_the_cli_merge_output(
    env: dict[str, Path], tmp_path: Path, options: dict[str, Any], flags: tuple[str, ...]
) -> None:
    """The same files as `safemerge merge` (less its rerunnable safemerge.yaml), the adapter at the top
    level with the CLI's tensors bit for bit, the report's rows and the card's Hub fields."""
    cli = cli_merge(env, tmp_path / "cli", *flags)
    model, report = merged(env, **options)
    out = safemerge.save_safemerged(model, report, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert set(os.listdir(out)) == set(os.listdir(cli)) - {"safemerge.yaml"}
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(cli / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    config, cli_config = (json.loads((d / "adapter_config.json").read_text()) for d in (out, cli))
    assert (config["r"], config["lora_alpha"]) == (cli_config["r"], cli_config["lora_alpha"])
    saved, cli_report = (json.loads((d / "safemerge_report.json").read_text()) for d in (out, cli))
    assert saved["summary"] == cli_report["summary"]
    assert [(m["name"], m["rho"], m["merged"]) for m in saved["modules"]] == [
        (m["name"], m["rho"], m["merged"]) for m in cli_report["modules"]
    ]
    assert saved["outputs"] == {
        "adapter_name": "safemerged", "adapter": str(out), "report": str(out / "safemerge_report.json")
    }  # fmt: skip
    assert "adapter" not in report.outputs  # the caller's report is not changed
    marker = json.loads((out / MARKER).read_text())
    assert marker["command"] == "merge" and "README.md" in marker["entries"]
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.base_model, data.license, data.library_name) == ("org/aligned", "llama3.1", "peft")
    assert "base_model:adapter:org/aligned" in data.tags
    assert "# SafeMERGE adapter" in card.text and "safemerge.yaml" not in card.text
    assert str(tmp_path) not in card.content


def test_peft_loads_the_saved_adapter_with_the_in_memory_logits(env: dict[str, Path], tmp_path: Path) -> None:
    model, report = merged(env, fraction=0.5)
    assert report.summary["merged"] == 3
    out = safemerge.save_safemerged(model, report, tmp_path / "saved", "safemerged")
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    model.set_adapter("safemerged")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, out)
        got = loaded(input_ids=ids).logits
        model.set_adapter("default")
        task = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, task)  # the merge changed the adapter: the comparison can fail


class FakeApi:
    """Records the files `push` uploads (bytes), never the network."""

    instances: ClassVar[list[FakeApi]] = []

    def __init__(self, token: str | None = None) -> None:
        self.files: dict[str, bytes] = {}
        FakeApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        pass

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> None:
        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()


def test_push_uploads_the_saved_folder_without_local_paths(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, report = merged(env)
    out = safemerge.save_safemerged(model, report, tmp_path / "saved")
    assert check_pushable(out)["command"] == "merge"
    FakeApi.instances = []
    monkeypatch.setattr(push, "HfApi", FakeApi)
    monkeypatch.setattr(push, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    before = digest(out)
    result = runner.invoke(app, ["push", str(out), "me/safe-adapter"])
    assert result.exit_code == 0, result.output
    assert digest(out) == before
    (api,) = FakeApi.instances
    assert sorted(api.files) == sorted(k for k in before if k != MARKER)
    assert {"README.md", "safemerge_report.json", "adapter_model.safetensors"} <= set(api.files)
    for name, data in api.files.items():
        if name.endswith((".json", ".md")):
            text = data.decode()
            assert str(tmp_path) not in text and str(env["aligned"].parent) not in text, name
    pushed = json.loads(api.files["safemerge_report.json"])
    assert pushed["inputs"]["aligned"]["path"] == "org/aligned"
    assert pushed["inputs"]["unaligned"]["path"] == env["unaligned"].name
    assert pushed["outputs"]["adapter"] == "me/safe-adapter"
    assert json.loads(api.files["adapter_config.json"])["base_model_name_or_path"] == "org/aligned"
    assert 'PeftModel.from_pretrained(model, "me/safe-adapter")' in api.files["README.md"].decode()


def test_a_base_loaded_from_the_hub_is_named_by_its_id(env: dict[str, Path], tmp_path: Path) -> None:
    """A base whose name is a hub id (as `from_pretrained("owner/name")` leaves it) is the card's base
    model; no revision is claimed (transformers keeps none)."""
    model = peft_model(env)
    model.get_base_model().config.name_or_path = "org/hub-aligned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafemergeWarning)
        report = safemerge.add_safemerge_adapter(model, str(env["unaligned"]))
    assert report.inputs["aligned"]["hub_id"] == "org/hub-aligned"
    assert report.inputs["aligned"]["revision"] is None
    out = safemerge.save_safemerged(model, report, tmp_path / "saved", plot=False)
    assert ModelCard.load(out / "README.md").data.base_model == "org/hub-aligned"
    assert "similarity.png" not in os.listdir(out)


def test_an_existing_folder_is_replaced_only_with_force_and_only_when_safemerge_wrote_it(
    env: dict[str, Path], tmp_path: Path
) -> None:
    model, report = merged(env)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for force in (False, True):
        with pytest.raises(InputError, match=r"mine.*holds notes\.txt, which safemerge did not write"):
            safemerge.save_safemerged(model, report, mine, force=force)
        assert digest(mine) == {"notes.txt": hashlib.sha256(b"my notes").hexdigest()}
    out = safemerge.save_safemerged(model, report, tmp_path / "saved", plot=False)
    with pytest.raises(InputError, match="already exists; pass --force to replace it"):
        safemerge.save_safemerged(model, report, out)
    safemerge.save_safemerged(model, report, out, force=True, plot=False)
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(InputError, match=r"output directory .* is the unaligned"):
        safemerge.save_safemerged(model, report, env["unaligned"], force=True)


def test_a_failure_mid_write_leaves_no_output(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception after the adapter files are written: no `out`, no temporary sibling; an earlier
    output replaced with force stays as it was."""
    model, report = merged(env)
    earlier = safemerge.save_safemerged(model, report, tmp_path / "earlier", plot=False)
    before = digest(earlier)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft_api, "write_report", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        safemerge.save_safemerged(model, report, tmp_path / "new")
    with pytest.raises(RuntimeError, match="disk full"):
        safemerge.save_safemerged(model, report, earlier, force=True)
    assert sorted(os.listdir(tmp_path)) == ["earlier"]
    assert digest(earlier) == before


def test_a_report_without_this_adapter_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    model, report = merged(env)
    scanned = safemerge.scan_peft_model(model, str(env["unaligned"]))
    cases = [
        (scanned, None, "the report is a `scan` report without an adapter in memory"),
        (report, "default", "the report describes the adapter 'safemerged', not 'default'"),
    ]
    for rep, name, message in cases:
        with pytest.raises(InputError, match=message):
            safemerge.save_safemerged(model, rep, tmp_path / "out", name)
    model.delete_adapter("safemerged")
    with pytest.raises(InputError, match="the model has no adapter 'safemerged' \\(the report's\\)"):
        safemerge.save_safemerged(model, report, tmp_path / "out")
    with pytest.raises(InputError, match=r"model must be a peft\.PeftModel"):
        safemerge.save_safemerged(model.get_base_model(), report, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"fraction": 0.5}, id="fraction"),
        pytest.param({"top_k": 2, "preserve_norm": True}, id="top-k"),
    ],
)
def test_a_safelora_adapter_saves_as_the_defend_output(
    env: dict[str, Path], tmp_path: Path, options: dict[str, Any]
) -> None:
    """`add_safelora_adapter`'s adapter saved as `safemerge defend --method safelora` writes it (less its
    rerunnable defense.yaml): the tensors bit for bit, the report's defence block and rows, the card."""
    cli = tmp_path / "cli"
    inputs = {k: str(env[k]) for k in ("aligned", "unaligned")} | {"task_adapter": str(env["task"])}
    defend(DefendConfig.model_validate({"method": "safelora", "out": str(cli), **inputs, **options}))
    model = peft_model(env)
    report = safemerge.add_safelora_adapter(model, str(env["unaligned"]), **options)
    out = safemerge.save_safemerged(model, report, tmp_path / "saved")
    assert set(os.listdir(out)) == set(os.listdir(cli)) - {"defense.yaml"}
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(cli / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    assert all(ours[k].dtype == t.dtype and torch.equal(ours[k], t) for k, t in theirs.items())
    saved, cli_report = (json.loads((d / "safemerge_report.json").read_text()) for d in (out, cli))
    assert saved["defense"] == cli_report["defense"]
    assert saved["summary"] == cli_report["summary"] and saved["summary"]["merged"] > 0
    assert json.loads((out / MARKER).read_text())["command"] == "defend"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/aligned" and "# safemerge defence `safelora`" in card.text
    assert "defense.yaml" not in card.text
    assert (out / "safemerge_report.md").read_text() == (cli / "safemerge_report.md").read_text().replace(
        str(env["task"]), report.inputs["task_adapter"]["path"]
    ).replace(str(env["aligned"]), report.inputs["aligned"]["path"])
    assert check_pushable(out)["command"] == "defend"
