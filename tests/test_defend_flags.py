"""`safemerge defend` words its errors in flags (docs/engine.md, "The command line"): inputs and options
as typed (`--safety-adapter`, `--merge-method`), a defence's own options as `--option KEY`, a key the
YAML file gave as its key; the Python API's messages name keys. Every case is exit 2 with no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import pair_with_adapters
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.defenses import DefendConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pair_with_adapters(tmp_path_factory.mktemp("defend-flags"))


def lora(env: dict[str, Path]) -> list[str]:
    return ["-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(env["task"])]


def refused(args: list[str], out: Path) -> str:
    """The one-line error of `defend ARGS --out OUT`, which must exit 2 and write nothing."""
    result = runner.invoke(app, ["defend", *args, "--out", str(out), "-q"], env={"COLUMNS": "400"})
    text = " ".join((result.output + (result.stderr if result.stderr_bytes is not None else "")).split())
    assert result.exit_code == 2, text
    assert not out.exists()
    return text


CASES = {
    "safety input missing": (
        ["-m", "safemerge"], "method safemerge needs --safety-adapter or --safety-model"),
    "both safety inputs": (
        ["-s", "{safety}", "--safety-model", "{aligned}"],
        "give either --safety-adapter or --safety-model, not both"),
    "safety model with a LoRA": (
        ["--safety-model", "{aligned}"],
        "--safety-model needs --task-model: a LoRA merge takes a --safety-adapter"),
    "another defence's option": (
        ["-s", "{safety}", "--beta", "0.3"], "option(s) --beta do not apply to method safemerge"),
    "a merge option for resta": (
        ["-m", "resta", "--merge-method", "ties", "--preserve-norm"],
        "option(s) --merge-method, --preserve-norm do not apply to method resta"),
    "density without dare": (
        ["-m", "resta", "--density", "0.3"], "--density applies to resta only with --dare"),
    "misspelt method": (
        ["-m", "safemerg", "-s", "{safety}"],
        "--method: unknown defence 'safemerg'; did you mean 'safemerge'?"),
    "misspelt own option": (
        ["-m", "interpolate", "--option", "alpah=0.3"],
        "--option alpah is not an option of method interpolate; did you mean --option alpha? (its options: "
        "alpha)"),
    "own option out of range": (
        ["-m", "interpolate", "--option", "alpha=7"],
        "--option alpha: Input should be less than or equal to 1"),
    "own options for a defence without any": (
        ["-m", "resta", "--option", "alpha=0.1", "--option", "zeta=1"],
        "method resta takes no options of its own (got --option alpha, --option zeta)"),
    "calibration missing (config)": (
        ["-m", "reset"], "method reset needs --option calibration: a JSONL/CSV of harmful prompts"),
    "calibration missing (run)": (
        ["-m", "oneshot"], "--option calibration is required: a JSONL/CSV of safety examples"),
    "a --option without =": (["-m", "interpolate", "--option", "alpha"], "--option expects KEY=VALUE"),
}  # fmt: skip


@pytest.mark.parametrize(("args", "message"), list(CASES.values()), ids=list(CASES))
def test_defend_errors_name_flags(
    env: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    filled = [a.format(**{k: str(v) for k, v in env.items()}) for a in args]
    text = refused([*lora(env), *filled], tmp_path / "out")
    assert f"error: invalid options: {message}" in text or f"error: {message}" in text, text


def test_keys_the_yaml_file_gave_stay_keys(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"safety_adapter: {env['safety']}\nbeta: 0.3\n")
    text = refused(["-c", str(cfg), *lora(env)], tmp_path / "o1")
    assert f"invalid config {cfg}: option(s) `beta` do not apply to method safemerge" in text, text
    cfg.write_text("method: interpolate\nalpha: 7\n")
    text = refused(["-c", str(cfg), *lora(env)], tmp_path / "o2")
    assert "`alpha`: Input should be less than or equal to 1" in text and "--option" not in text, text


def test_an_own_option_flag_overrides_the_yaml_file(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "d.yaml"
    cfg.write_text("method: interpolate\nalpha: 0.3\n")
    args = ["defend", "-c", str(cfg), *lora(env), "--option", "alpha=0.7", "-o", str(tmp_path / "o"), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "safemerge_report.json").read_text())
    assert report["defense"]["alpha"] == 0.7


def test_the_python_api_names_keys() -> None:
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"}
    with pytest.raises(InputError) as err:
        load_config(DefendConfig, None, {**base, "method": "interpolate", "plugin_options": {"alpah": 0.3}})
    assert "`alpah` is not an option of method interpolate; did you mean `alpha`?" in str(err.value)
    with pytest.raises(InputError, match="method safemerge needs `safety_adapter` or `safety_model`"):
        load_config(DefendConfig, None, base)


def test_a_run_error_names_a_key_the_yaml_file_gave_as_its_key(env: dict[str, Path], tmp_path: Path) -> None:
    """Errors raised while the defence runs get the same mapping: `--unaligned` (not given), but
    `subspace` as the file's key."""
    sketch = tmp_path / "sketch"
    args = ["subspace", "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-k", "4", "-o", str(sketch)]
    result = runner.invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"method: lssf\nsubspace: {sketch}\n")
    text = refused(["-c", str(cfg), "-a", str(env["aligned"]), "-t", str(env["task"])], tmp_path / "o")
    assert (
        "error: method lssf needs --unaligned: it uses V = W_al - W_un itself, not a sketch (`subspace`)"
        in text
    )


def test_merge_and_scan_errors_name_flags_or_the_files_keys(env: dict[str, Path], tmp_path: Path) -> None:
    """`merge`/`scan` word the engine's run-time and selection errors as `defend` does: flags when typed,
    the YAML file's keys when the file gave them."""

    def run(cmd: str, args: list[str]) -> str:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = runner.invoke(app, [cmd, *args, "--out", str(out), "-q"], env={"COLUMNS": "400"})
        text = " ".join((result.output + (result.stderr if result.stderr_bytes is not None else "")).split())
        assert result.exit_code == 2, text
        assert not out.exists()
        return text

    full = ["-a", str(env["aligned"]), "-u", str(env["unaligned"]), "--task-model", str(env["aligned"])]
    safety = ["-s", str(env["safety"])]
    assert "--rank sets a LoRA output rank" in run("merge", [*full, *safety, "--rank", "8"])
    assert "--merge-into-base does not apply to --task-model" in run(
        "merge", [*full, *safety, "--merge-into-base"]
    )
    two = ["--threshold", "0.3", "--top-k", "2"]
    assert "give only one of --threshold, --top-k, --fraction (got --threshold, --top-k)" in run(
        "scan", [*lora(env), *two]
    )
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"aligned: {env['aligned']}\nunaligned: {env['unaligned']}\ntask_model: {env['aligned']}\n"
        f"safety_adapter: {env['safety']}\nrank: 8\n"
    )
    assert "`rank` sets a LoRA output rank" in run("merge", ["-c", str(cfg)])
