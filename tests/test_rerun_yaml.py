"""Resolved configs rerun from any working directory (engine/rerun.py; docs/engine.md, "Outputs of
`merge`"): `safemerge.yaml`, `defense.yaml` and `train_config.yaml` record local inputs as absolute paths,
hub ids and the packaged alias as given, and say the command that reruns them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from builders import pair_with_adapters, record_hub_downloads
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.engine.rerun import recorded_input
from safemerge.train.config import TrainConfig
from safemerge.train.trainer import train_config_yaml

runner = CliRunner()
RELATIVE = ["-a", "m/aligned", "-u", "m/unaligned", "-t", "m/task", "-s", "m/safety"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pair_with_adapters(tmp_path_factory.mktemp("rerun"))


@pytest.fixture
def work(models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding the inputs under `m/` (so they can be named relatively), made current."""
    work = tmp_path / "work"
    for key, name in (
        ("aligned", "aligned"),
        ("unaligned", "unaligned"),
        ("task", "task"),
        ("safety", "safety"),
    ):
        shutil.copytree(models[key], work / "m" / name)
    monkeypatch.chdir(work)
    return work


def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def factors(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("command", "written"),
    [(["merge"], "safemerge.yaml"), (["defend", "-m", "safemerge"], "defense.yaml")],
)
def test_the_resolved_config_reruns_from_another_directory(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], written: str
) -> None:
    code, text = invoke([*command, *RELATIVE, "--top-k", "2", "--out", "first", "--no-plot", "-q"])
    assert code == 0, text
    resolved_path = work / "first" / written
    header = resolved_path.read_text().splitlines()[0]
    assert header.endswith(f"(rerun: safemerge {command[0]} -c {written} --out NEW_DIR)"), header
    resolved = yaml.safe_load(resolved_path.read_text())
    for key, name in (("aligned", "aligned"), ("unaligned", "unaligned"), ("task_adapter", "task")):
        assert resolved[key] == str((work / "m" / name).resolve()), key
    assert resolved["out"] == str((work / "first").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, text = invoke([command[0], "-c", str(resolved_path), "--out", "again", "-q"])
    assert code == 0, text
    assert factors(elsewhere / "again") == factors(work / "first")


def test_a_rerun_without_a_new_out_is_refused_not_replaced(work: Path, tmp_path: Path) -> None:
    code, text = invoke(["merge", *RELATIVE, "--out", "first", "--no-plot", "-q"])
    assert code == 0, text
    before = factors(work / "first")
    code, text = invoke(["merge", "-c", "first/safemerge.yaml", "-q"])
    assert code == 2 and "exists" in text, text
    assert factors(work / "first") == before


def test_hub_inputs_stay_hub_ids(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record_hub_downloads(
        monkeypatch, {"aligned": work / "m" / "aligned", "unaligned": work / "m" / "unaligned"}
    )
    args = ["merge", "-a", "org/aligned", "-u", "org/unaligned@main", "-t", "m/task", "-s", "m/safety"]
    code, text = invoke([*args, "--out", "first", "--no-plot", "-q"])
    assert code == 0, text
    resolved = yaml.safe_load((work / "first" / "safemerge.yaml").read_text())
    assert (resolved["aligned"], resolved["unaligned"]) == ("org/aligned", "org/unaligned@main")
    assert resolved["task_adapter"] == str((work / "m" / "task").resolve())


def test_recorded_input_follows_the_loaders_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged alias and hub ids as given, an existing path absolute, a missing one as given (it can
    only be a hub id: `checkpoint.resolve_local_dir` reads it so)."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    (tmp_path / "linked").symlink_to(tmp_path / "org")
    (tmp_path / "smollm2").mkdir()  # the alias wins over a directory of that name, as when loading
    monkeypatch.chdir(tmp_path)
    assert recorded_input("smollm2") == "smollm2"
    assert recorded_input("org/name") == str(tmp_path.resolve() / "org" / "name")  # a local dir wins
    assert recorded_input("linked/name") == str(tmp_path.resolve() / "org" / "name")  # symlinks resolved
    assert recorded_input("org/other@v1") == "org/other@v1"
    assert recorded_input("owner/name") == "owner/name"


def test_train_config_records_files_absolute_and_names_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "data.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    monkeypatch.chdir(tmp_path)
    local = TrainConfig(model="base", recipe="data.jsonl", out=Path("adapter"), force=True)
    text = train_config_yaml(local)
    rerun = "(rerun: safemerge train -c train_config.yaml --out NEW_DIR)"
    assert text.startswith(f"# resolved safemerge train configuration {rerun}\n")
    data = yaml.safe_load(text)
    root = tmp_path.resolve()
    assert (data["model"], data["recipe"], data["out"]) == (
        str(root / "base"),
        str(root / "data.jsonl"),
        str(root / "adapter"),
    )
    assert "force" not in data
    (tmp_path / "safety").mkdir()  # a directory named like a built-in recipe: the recipe is still meant
    named = yaml.safe_load(train_config_yaml(TrainConfig(model="org/model", recipe="safety", out=Path("o"))))
    assert (named["model"], named["recipe"]) == ("org/model", "safety")
    packaged = yaml.safe_load(
        train_config_yaml(TrainConfig(model="smollm2", recipe="arithmetic", out=Path("o")))
    )
    assert packaged["model"] == "smollm2"


def test_defense_yaml_records_a_calibration_file_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safemerge.defenses.config import DefendConfig
    from safemerge.defenses.report import defense_yaml

    (tmp_path / "cal.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = DefendConfig.model_validate(
        {"method": "reset", "aligned": "a", "unaligned": "org/u", "task_adapter": "t", "out": "o",
         "calibration": "cal.jsonl"}
    )  # fmt: skip
    data = yaml.safe_load(defense_yaml(cfg))
    root = tmp_path.resolve()
    assert data["plugin_options"] == {"calibration": str(root / "cal.jsonl")}
    assert (data["aligned"], data["unaligned"], data["task_adapter"]) == (str(root / "a"), "org/u", "t")


def test_train_config_reruns_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`train` with a relative model and data file, rerun from elsewhere with `-c OUT/train_config.yaml
    --out NEW`: the same adapter (one seeded step on CPU)."""
    from builders import tiny_chat_setup

    setup = tiny_chat_setup(tmp_path / "models")
    work = tmp_path / "work"
    shutil.copytree(setup["aligned"], work / "base")
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(8)]
    (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(work)
    args = ["train", "--model", "base", "--recipe", "data.jsonl", "--out", "first", "--max-steps", "1",
            "--batch-size", "4", "--max-length", "64", "-q"]  # fmt: skip
    code, text = invoke(args)
    assert code == 0, text
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, text = invoke(["train", "-c", str(work / "first" / "train_config.yaml"), "--out", "again", "-q"])
    assert code == 0, text
    assert factors(elsewhere / "again") == factors(work / "first")
