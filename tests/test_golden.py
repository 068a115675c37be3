"""Golden test: `safemerge scan`, `merge` and `defend` must write byte-identical files to the recorded ones.

The inputs are the tiny committed models and adapters in tests/fixtures/golden/inputs (built once by
make_fixture.py, never regenerated here). Each case runs the CLI in a temp directory holding a copy of
them, with relative paths only, so paths inside the reports are the same on every run and machine. Every
file of the output directory is hashed (sha256) and compared with tests/fixtures/golden/expected.json.

Normalisation (`normalised_bytes`), nothing else:
1. JSON files: the top-level key `versions` (library versions, in safemerge_report.json) is dropped and
   the rest re-serialised with json.dumps(indent=2, ensure_ascii=False), key order kept (so reordered
   keys still fail). The other version stamps (transformers_version in config.json and
   generation_config.json, peft_version in adapter_config.json) are NOT normalised: they only change
   with a library upgrade, which may change other bytes too (re-record then, noting it in CHANGELOG.md).
Everything else, PNG plots included, is compared byte for byte: two runs of the same code, in different
directories, give identical bytes for every other file. (Until 2026-11-29 `defend -m safemerge/merge-all`
recorded the temporary directory of its inner merge as `out` in safemerge.yaml and the report, a random
name that needed normalising; they now record the final `out`, as CHANGELOG.md says.)

Re-recording (`python tests/fixtures/golden/record.py --write`) is only allowed for an INTENDED change of the
output, which must be noted in CHANGELOG.md; a refactor must pass this test unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
INPUTS = GOLDEN / "inputs"
EXPECTED = GOLDEN / "expected.json"

LLAMA = ["-a", "llama/aligned", "-u", "llama/unaligned", "-t", "llama/task"]
LLAMA_S = [*LLAMA, "-s", "llama/safety"]
GPT2_S = ["-a", "gpt2/aligned", "-u", "gpt2/unaligned", "-t", "gpt2/task", "-s", "gpt2/safety"]

# case name → CLI arguments; run_case adds `--out <case name> --quiet` (a relative output directory).
CASES: dict[str, list[str]] = {
    "scan": ["scan", *LLAMA],
    "merge-exact": ["merge", *LLAMA_S],
    "merge-peft-linear": ["merge", *LLAMA_S, "--mode", "peft-linear"],
    "merge-dare-ties": ["merge", *LLAMA_S, "--method", "dare_ties", "--seed", "3", "--density", "0.5"],
    "merge-into-base-llama": ["merge", *LLAMA_S, "--merge-into-base"],
    "merge-into-base-gpt2": ["merge", *GPT2_S, "--merge-into-base"],
    "merge-top-k-2": ["merge", *LLAMA_S, "--top-k", "2"],
    "defend-safemerge": ["defend", "-m", "safemerge", *LLAMA_S],
    "defend-merge-all": ["defend", "-m", "merge-all", *LLAMA_S],
    "defend-safelora": ["defend", "-m", "safelora", *LLAMA],
    "defend-safelora-preserve-norm": ["defend", "-m", "safelora", *LLAMA, "--preserve-norm"],
    "defend-resta": ["defend", "-m", "resta", *LLAMA],
    "defend-resta-dare": ["defend", "-m", "resta", *LLAMA, "--dare", "--seed", "1"],
    "defend-none": ["defend", "-m", "none", *LLAMA],
}


TEXT_SUFFIXES = {".json", ".yaml", ".md"}


def normalised_bytes(path: Path) -> bytes:
    """The bytes that are hashed: the file's, normalised as the module docstring says."""
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data
    if path.suffix != ".json":
        return data
    obj = json.loads(data)
    if isinstance(obj, dict):
        obj.pop("versions", None)  # library versions: change with the environment, not with the code
    return json.dumps(obj, indent=2, ensure_ascii=False).encode()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of the normalised bytes of every file under `root`, keyed by its relative POSIX path."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(normalised_bytes(p)).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def run_case(name: str, workdir: Path) -> dict[str, str]:
    """Run case `name` in `workdir`, the current directory (with a copy of the inputs); hash its output."""
    from safemerge.cli import app

    args = [*CASES[name], "--out", name, "--quiet"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, f"{name} failed ({result.exit_code}): {result.output}\n{result.exception!r}"
    return hash_tree(workdir / name)


def copy_inputs(workdir: Path) -> None:
    shutil.copytree(INPUTS, workdir, dirs_exist_ok=True)


def diff_message(name: str, got: dict[str, str], want: dict[str, str]) -> str:
    lines = [f"golden output of {name!r} changed:"]
    lines += [f"  missing:    {f}" for f in sorted(want.keys() - got.keys())]
    lines += [f"  unexpected: {f}" for f in sorted(got.keys() - want.keys())]
    lines += [f"  differs:    {f}" for f in sorted(want.keys() & got.keys()) if want[f] != got[f]]
    return "\n".join(lines)


def load_expected() -> dict[str, dict[str, str]]:
    return dict(json.loads(EXPECTED.read_text()))


def test_every_case_is_recorded() -> None:
    assert sorted(load_expected()) == sorted(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_golden_outputs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    want = load_expected()[name]
    got = run_case(name, tmp_path)
    assert got == want, diff_message(name, got, want)
