"""A user's files are never modified or deleted (docs/engine.md, "Outputs and `--force`").

Every writing command, on tiny inputs: an `--out` equal to, inside, or containing an input is refused
(exit 2) with or without `--force`, and every input file keeps its sha256; `--force` replaces only an
empty directory or safemerge's own output (recognised by its marker), never one holding other files;
output directories get the umask's mode.

The inputs are made to look like safemerge's own outputs (each holds a marker, each sits in a directory
marked as written over time), the case where only the input-overlap rule protects them: without it,
`--force` would replace them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from builders import tiny_chat_setup
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.common.outdir import (
    MARKER,
    atomic_output_dir,
    check_incremental_dir,
    check_not_an_input,
    check_output_dir,
)

OVERLAP = "an output never overlaps an input"


def invoke(args: list[str], **env: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb", **env})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def mark(folder: Path, entries: list[str] | None) -> None:
    """A marker written by hand (the documented format), so `folder` reads as safemerge's output."""
    data = {"written_by": "safemerge", "command": "test", "entries": entries}
    (folder / MARKER).write_text(json.dumps(data) + "\n")


def full_finetune(base: Path, out: Path) -> Path:
    """A 'full fine-tune' of `base`: every parameter moved by seeded noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    return out


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the set of paths too: nothing may appear or vanish)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of input, each in a container of its own: IN/c_<name>/<name> (built once)."""
    root = tmp_path_factory.mktemp("safety")
    base = tiny_chat_setup(root / "built")
    code, text = invoke(["subspace", "-a", str(base["aligned"]), "-u", str(base["unaligned"]), "-o",
                         str(root / "sk"), "-k", "2"])  # fmt: skip
    assert code == 0, text
    paths = {name: base[name] for name in ("aligned", "unaligned", "task", "safety")}
    paths["taskmodel"] = full_finetune(base["aligned"], root / "taskmodel")
    paths["sketch"] = root / "sk"
    (root / "data.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "response": "2"}) + "\n")
    paths["data"] = root / "data.jsonl"
    (root / "cache").mkdir()
    (root / "cache" / "kept.txt").write_text("the organism cache\n")
    paths["cache"] = root / "cache"
    for name, src in paths.items():
        container = root / "in" / f"c_{name}"
        container.mkdir(parents=True)
        dst = container / src.name
        src.rename(dst)
        if dst.is_dir():
            mark(dst, sorted(os.listdir(dst)))
        mark(container, None)
    return root / "in"


NAMES = ("aligned", "unaligned", "task", "safety", "taskmodel", "sketch", "data", "cache")


@pytest.fixture
def inputs(built: Path, tmp_path: Path) -> dict[str, Path]:
    """A fresh copy of the inputs for each test (a command that harms one cannot spoil the next case),
    and an experiment config reading them."""
    root = tmp_path / "in"
    shutil.copytree(built, root, symlinks=True)
    placed = {"root": root}
    for name in NAMES:  # the one entry of each container besides its marker
        placed[name] = next(p for p in (root / f"c_{name}").iterdir() if p.name != MARKER)
    experiment = {
        "name": "tiny",
        "setup": {"aligned": str(placed["aligned"]), "unaligned": str(placed["unaligned"]),
                  "task_adapter": str(placed["task"]), "safety_adapter": str(placed["safety"])},
        "defenses": [{"method": "none"}],
        "evaluation": {"benchmarks": ["arithmetic"], "limit": 1, "max_new_tokens": 2},
    }  # fmt: skip
    (root / "c_config").mkdir()
    placed["config"] = root / "c_config" / "exp.yaml"
    placed["config"].write_text(yaml.safe_dump(experiment, sort_keys=False))
    mark(root / "c_config", None)
    return placed


LORA = "-a {aligned} -u {unaligned} -t {task}"
# command → (its arguments, {name} standing for the input's path; the inputs it reads); `--out OUT` follows
COMMANDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "scan": (f"scan {LORA}", ("aligned", "unaligned", "task")),
    "scan-sketch": ("scan -t {task} --subspace {sketch}", ("task", "sketch")),
    "merge": (f"merge {LORA} -s {{safety}}", ("aligned", "unaligned", "task", "safety")),
    "merge-task-model": (
        "merge -a {aligned} -u {unaligned} --task-model {taskmodel} -s {safety}",
        ("aligned", "unaligned", "taskmodel", "safety"),
    ),
    "defend-safemerge": (
        f"defend -m safemerge {LORA} -s {{safety}}",
        ("aligned", "unaligned", "task", "safety"),
    ),
    "defend-resta": (f"defend -m resta {LORA}", ("aligned", "unaligned", "task")),
    "subspace": ("subspace -a {aligned} -u {unaligned} -k 2", ("aligned", "unaligned")),
    "train": ("train --model {aligned} --recipe {data} --max-steps 1", ("aligned", "data")),
    "eval": (
        "eval --model {aligned} --adapter {task} --benchmarks arithmetic --limit 1 --max-new-tokens 2",
        ("aligned", "task"),
    ),
    "experiment": ("experiment {config}", ("config", "aligned", "unaligned", "task", "safety")),
    "demo": ("demo --reduced", ("cache",)),
    "organism-fullft": ("organism fullft --reduced --cache {cache}", ("cache",)),
}


def command(name: str, paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The command line of `name` on `paths`, writing to `out` (paths hold no spaces: tmp_path's)."""
    return [t.format(**{k: str(v) for k, v in paths.items()}) for t in COMMANDS[name][0].split()] + [
        "--out", str(out), *extra,
    ]  # fmt: skip


# commands whose --force replaces (the organism demo and experiment resume in their directory instead)
FORCEABLE = {name for name in COMMANDS if name not in ("demo", "experiment")}


def overlapping(path: Path, how: str) -> Path:
    return {"equal": path, "inside": path / "sub", "contains": path.parent}[how]


CASES = [
    (name, inp, how, force)
    for name, (_, reads) in COMMANDS.items()
    for inp in reads
    for how in ("equal", "inside", "contains")
    for force in ((False, True) if name in FORCEABLE else (False,))
]


@pytest.mark.parametrize(("name", "inp", "how", "force"), CASES)
def test_an_output_overlapping_an_input_is_refused_and_nothing_changes(
    inputs: dict[str, Path], name: str, inp: str, how: str, force: bool
) -> None:
    before = hashes(inputs["root"])
    out = overlapping(inputs[inp], how)
    code, text = invoke(
        command(name, inputs, out, *(["--force"] if force else [])), SAFEMERGE_CACHE=str(inputs["cache"])
    )
    assert code == 2, text
    assert OVERLAP in text, text
    assert hashes(inputs["root"]) == before


def test_the_same_commands_succeed_elsewhere_and_mark_their_output(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The overlap cases above are not vacuous: each command, given an unrelated --out, gets past the
    output check (it fails later, or succeeds, but not with the overlap refusal)."""
    for name in ("scan", "merge", "defend-resta", "subspace"):
        code, text = invoke(command(name, inputs, tmp_path / name))
        assert code == 0, (name, text)
        meta = json.loads((tmp_path / name / MARKER).read_text())
        entries = sorted(p.name for p in (tmp_path / name).iterdir() if p.name != MARKER)
        assert meta == {"written_by": "safemerge", "command": name.split("-")[0], "entries": entries}


FOREIGN_CASES = ["scan", "merge", "merge-task-model", "defend-safemerge", "defend-resta", "subspace", "train",
                 "eval", "organism-fullft"]  # fmt: skip


@pytest.mark.parametrize("name", FOREIGN_CASES)
@pytest.mark.parametrize("force", [False, True])
def test_a_directory_with_a_foreign_file_is_never_replaced(
    inputs: dict[str, Path], tmp_path: Path, name: str, force: bool
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    code, text = invoke(
        command(name, inputs, out, *(["--force"] if force else [])), SAFEMERGE_CACHE=str(inputs["cache"])
    )
    assert code == 2 and "notes.txt, which safemerge did not write" in text, text
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize(
    "args", [["demo", "--reduced"], ["demo", "--reduced", "--force"], ["demo", "--toy", "--force"]]
)
def test_the_demos_never_write_into_a_foreign_directory(
    inputs: dict[str, Path], tmp_path: Path, args: list[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    code, text = invoke([*args, "--out", str(out)], SAFEMERGE_CACHE=str(inputs["cache"]))
    assert code == 2 and "notes.txt, which safemerge did not write" in text, text
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_the_experiment_never_writes_into_a_foreign_directory(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    for extra in ([], ["--dry-run"]):
        code, text = invoke(["experiment", str(inputs["config"]), "--out", str(out), *extra])
        assert code == 2 and "notes.txt, which safemerge did not write" in text, text
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_force_replaces_an_empty_directory_and_safemerge_output_only(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code, text = invoke([*command("merge", inputs, out), "--no-plot"])
    assert code == 2 and "already exists" in text  # an empty directory still needs --force
    code, text = invoke([*command("merge", inputs, out), "--no-plot", "--force"])
    assert code == 0, text
    first = hashes(out)
    code, text = invoke(
        [*command("merge", inputs, out), "--no-plot", "--force"]
    )  # an earlier merge: replaced
    assert code == 0, text
    assert hashes(out) == first
    code, text = invoke(command("scan", inputs, out, "--force"))  # another command's output: replaced too
    assert (
        code == 0 and (out / "safemerge_report.json").is_file() and not (out / "adapter_config.json").exists()
    )
    # a file added to safemerge's output is not safemerge's: the directory is no longer replaced
    (out / "notes.txt").write_text("mine\n")
    code, text = invoke([*command("merge", inputs, out), "--no-plot", "--force"])
    assert code == 2 and f"refusing to replace {out}: it holds notes.txt" in text, text
    assert (out / "notes.txt").read_text() == "mine\n" and (out / "safemerge_report.json").is_file()


@pytest.mark.parametrize("content", ["not json", json.dumps({"written_by": "me", "entries": None})])
def test_a_marker_safemerge_did_not_write_claims_nothing(tmp_path: Path, content: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(content)
    (out / "model.safetensors").write_text("weights")
    with pytest.raises(InputError, match=r"holds \.safemerge-output, which safemerge did not write"):
        check_output_dir(out, force=True)


def test_a_file_appearing_during_the_run_stops_the_replacement(tmp_path: Path) -> None:
    """The check runs again just before the old output is replaced."""
    out = tmp_path / "out"
    with atomic_output_dir(out, command="test") as tmp:
        (tmp / "a.txt").write_text("old")
    with (
        pytest.raises(InputError, match=r"it holds notes\.txt"),
        atomic_output_dir(out, True, command="t") as tmp,
    ):
        (tmp / "a.txt").write_text("new")
        (out / "notes.txt").write_text("mine")
    assert (out / "a.txt").read_text() == "old" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_links_and_files_are_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "target"
    with atomic_output_dir(target, command="test") as tmp:
        (tmp / "a.txt").write_text("a")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(InputError, match="is a symbolic link"):
        check_output_dir(link, force=True)
    afile = tmp_path / "file.txt"
    afile.write_text("mine")
    with pytest.raises(InputError, match="is not a directory"):
        check_output_dir(afile, force=True)


def test_inputs_are_compared_as_real_paths(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(model)
    with pytest.raises(InputError, match=f"output directory {alias} is the aligned model {model}"):
        check_not_an_input(alias, {"aligned model": str(model)})
    check_not_an_input(tmp_path, {"task adapter": [str(alias / "x")], "aligned model": None})  # not there
    (alias / "x").mkdir()
    with pytest.raises(InputError, match="contains the task adapter"):
        check_not_an_input(tmp_path, {"task adapter": [str(alias / "x")]})
    check_not_an_input(tmp_path / "elsewhere", {"aligned model": str(model), "hub": "org/model"})
    check_not_an_input(tmp_path / "org", {"hub id": "org/model"})  # not a local path: ignored


def test_a_legacy_demo_directory_is_still_reused(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    out.mkdir()
    (out / ".safemerge-demo").write_text("written by safemerge demo\n")
    (out / "results.md").write_text("old")
    check_incremental_dir(out)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.mark.usefixtures("restore_umask")
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_output_directories_get_the_umask_mode(inputs: dict[str, Path], tmp_path: Path, mask: int) -> None:
    os.umask(mask)
    code, text = invoke(command("scan", inputs, tmp_path / "out", "--no-plot"))
    assert code == 0, text
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~mask


@pytest.mark.usefixtures("restore_umask")
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_output_files_get_the_umask_mode(inputs: dict[str, Path], tmp_path: Path, mask: int) -> None:
    """safetensors writes its files 0600: a merged adapter must be as readable as any file the user writes
    (and no more), whatever wrote it; `--merge-into-base` adds a subdirectory."""
    os.umask(mask)
    out = tmp_path / "out"
    code, text = invoke(command("merge", inputs, out, "--no-plot", "--merge-into-base"))
    assert code == 0, text
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert "adapter_model.safetensors" in modes and "full_model" in modes
    for name, mode in modes.items():
        want = 0o777 & ~mask if (out / name).is_dir() else 0o666 & ~mask
        assert mode == want, (name, oct(mode), oct(want))
