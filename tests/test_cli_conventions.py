"""The command line reads as one tool (docs/engine.md, "The command line"): `--version`, the shared
option names, errors in flags, YAML key suggestions, and help that renders whole at 80 columns."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from builders import merge_args, pair_with_adapters
from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

import safemerge
from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError

runner = CliRunner()
WIDTH = 80
# words that mark an option's default in its help: "Default X." or that it has none
DEFAULT_MARKS = ("Default", "Required", "Optional", "No default")


def commands() -> Iterator[tuple[list[str], Any]]:
    """(argv prefix, click command) for every command and sub-command of the app."""
    root = typer.main.get_command(app)

    def walk(prefix: list[str], cmd: Any) -> Iterator[tuple[list[str], Any]]:
        yield prefix, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk([*prefix, name], sub)

    yield from walk([], root)


COMMANDS = [(" ".join(p) or "safemerge", p, c) for p, c in commands()]


def invoke(args: list[str], columns: int = 400) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": str(columns), "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def words(text: str) -> str:
    """Text with wrapped lines joined (a line broken after a hyphen joins without a space) and
    whitespace collapsed; box-drawing borders, should the help be drawn in panels, removed."""
    text = re.sub(r"(?<=\w-)\n\s*", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def visible_options(cmd: Any) -> list[Any]:
    """The options and arguments `--help` shows (not --help itself)."""
    return [p for p in cmd.params if not getattr(p, "hidden", False) and p.name != "help"]


def test_version() -> None:
    code, out = invoke(["--version"])
    assert code == 0 and out.strip() == f"safemerge {safemerge.__version__}"


@pytest.mark.parametrize(("name", "argv", "cmd"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_help_renders_whole_at_80_columns(name: str, argv: list[str], cmd: Any) -> None:
    """At 80 columns every option's help and every paragraph of the command's description appears
    whole (its words in order once wrapped lines are joined: nothing folded mid-word or dropped), and the
    description has no line break that a docstring's source layout put there."""
    code, out = invoke([*argv, "--help"], columns=WIDTH)
    assert code == 0, out
    assert max(len(line) for line in out.splitlines()) <= WIDTH
    flat = words(out)
    for p in visible_options(cmd):
        assert words(p.help or "") in flat, (name, p.opts, p.help)
    for paragraph in (cmd.help or "").split("\n\n"):
        assert "\n" not in paragraph, (name, "hard line break in the help source", paragraph)
        assert words(paragraph) in flat, (name, paragraph)
    assert_no_early_breaks(name, out)


def assert_no_early_breaks(name: str, out: str) -> None:
    """In the description (after the usage line, before the first section such as "Options:"), a line
    followed by more text of its paragraph is full: the next word would not have fitted after it
    (click wraps help to 78 columns of an 80-column terminal)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("Usage:")) + 1
    section = re.compile(r"^(\w[\w ]*:$|\s*╭)")
    end = next((i for i in range(start, len(lines)) if section.match(lines[i])), len(lines))
    block = [line.rstrip() for line in lines[start:end]]
    for line, nxt in itertools.pairwise(block):
        if line.strip() and nxt.strip():
            assert len(line) + 1 + len(nxt.split()[0]) > WIDTH - 2, (name, "line broken early", line, nxt)


@pytest.mark.parametrize(("name", "argv", "cmd"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_states_its_default_one_way(name: str, argv: list[str], cmd: Any) -> None:
    """One defaults style: each option's help says "Default X." (or Required./Optional./No default.);
    typer's own "[default: …]" is not shown next to it."""
    unmarked = [
        p.opts[0]
        for p in visible_options(cmd)
        if p.name != "version" and not any(mark in (p.help or "") for mark in DEFAULT_MARKS)
    ]
    assert not unmarked, (name, "no Default/Required/Optional in the help of", unmarked)
    typer_shown = [
        p.opts[0] for p in visible_options(cmd) if p.show_default and p.default not in (None, False)
    ]
    assert not typer_shown, (name, "typer's [default: …] shown for", typer_shown)


# --- the shared option names -------------------------------------------------------------------------
CONFIG_COMMANDS = ("scan", "merge", "defend", "subspace", "train", "eval", "experiment")
OUT_COMMANDS = (*CONFIG_COMMANDS, "demo", "organism fullft")
QUIET_COMMANDS = (*CONFIG_COMMANDS, "demo", "organism build", "organism fullft")


def option_opts(command: str, name: str) -> list[str]:
    cmd = dict((n, c) for n, _, c in COMMANDS)[command]
    return next(p.opts for p in cmd.params if p.name == name)


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_config_is_dash_c_everywhere(command: str) -> None:
    assert option_opts(command, "config") == ["--config", "-c"]
    assert option_opts(command, "config_pos") == ["config_pos"]  # the first argument still works


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_out_is_dash_o_everywhere(command: str) -> None:
    assert sorted(option_opts(command, "out")) == ["--out", "-o"]


@pytest.mark.parametrize("command", QUIET_COMMANDS)
def test_quiet_is_dash_q_everywhere(command: str) -> None:
    assert sorted(option_opts(command, "quiet")) == ["--quiet", "-q"]


def test_train_quiet_turns_off_the_trainer_progress_bar(tmp_path: Path) -> None:
    from safemerge.train.config import TrainConfig
    from safemerge.train.trainer import _sft_args

    cfg = TrainConfig(model="m", recipe="arithmetic", out=tmp_path / "o")
    assert _sft_args(cfg, tmp_path / "t", False).disable_tqdm is False
    assert _sft_args(cfg, tmp_path / "t", False, progress=False).disable_tqdm is True


# --- merge: --config/-c and --merge-method, end to end ---------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pair_with_adapters(tmp_path_factory.mktemp("conventions"))


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter_model.safetensors").read_bytes()


def test_config_flag_positional_and_yaml_merge_method_agree(env: dict[str, Path], tmp_path: Path) -> None:
    """`-c FILE`, the file as first argument, `merge_method:` and `--merge-method` give the same merge."""
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        f"aligned: {env['aligned']}\nunaligned: {env['unaligned']}\ntask_adapter: {env['task']}\n"
        f"safety_adapter: {env['safety']}\ntop_k: 2\nmerge_method: ties\nrank: 6\nplot: false\n"
    )
    code, text = invoke(["merge", "-c", str(cfg), "-o", str(tmp_path / "a"), "-q"])
    assert code == 0, text
    assert text.strip() == ""  # -q: nothing on the console
    report = json.loads((tmp_path / "a" / "safemerge_report.json").read_text())
    assert report["options"]["method"] == "ties"
    code, text = invoke(["merge", str(cfg), "-o", str(tmp_path / "b"), "-q"])
    assert code == 0, text
    code, text = invoke([*merge_args(env, tmp_path / "c"), "--top-k", "2", "--merge-method", "ties",
                         "--rank", "6", "-q"])  # fmt: skip
    assert code == 0, text
    assert adapter_bytes(tmp_path / "a") == adapter_bytes(tmp_path / "b") == adapter_bytes(tmp_path / "c")
    code, text = invoke(["merge", str(cfg), "-c", str(tmp_path / "other.yaml"), "-o", str(tmp_path / "d")])
    assert code == 2 and "two configs given" in text


def test_merge_method_old_spelling_warns_once_and_merges_the_same(
    env: dict[str, Path], tmp_path: Path
) -> None:
    args = [*merge_args(env, tmp_path / "old"), "--top-k", "2", "--method", "ties", "--rank", "6", "-q"]
    result = runner.invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    warning = "warning: --method is deprecated; use --merge-method (the same operator)"
    assert result.output.count(warning) == 1, result.output  # stdout and stderr together
    code, text = invoke([*merge_args(env, tmp_path / "new"), "--top-k", "2", "--merge-method", "ties",
                         "--rank", "6", "-q"])  # fmt: skip
    assert code == 0 and "deprecated" not in text
    assert adapter_bytes(tmp_path / "old") == adapter_bytes(tmp_path / "new")
    code, text = invoke([*merge_args(env, tmp_path / "x"), "--method", "ties", "--merge-method", "linear"])
    assert code == 2 and "--merge-method linear and --method ties disagree" in text
    assert not (tmp_path / "x").exists()


# --- errors in flags ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["merge"], "error: missing required options: --aligned, --task-adapter or --task-model, "
         "--unaligned or --subspace, --safety-adapter or --safety-model, --out"),
        (["scan", "-a", "A"], "error: missing required options: --task-adapter or --task-model, "
         "--unaligned or --subspace"),
        (["scan", "--subspace", "S", "-t", "T"], None),  # a LoRA scan against a sketch needs no --aligned
        (["scan", "--subspace", "S", "--task-model", "M"], "error: missing required option: --aligned"),
        (["defend", "-m", "none"], "error: missing required options: --aligned, --task-adapter or "
         "--task-model, --unaligned or --subspace, --out"),
        (["subspace", "-a", "A"], "error: missing required options: --unaligned, --rank, --out"),
        (["train", "--lr", "1e-4"], "error: missing required options: --model, --recipe, --out"),
        (["eval", "--limit", "2"], "error: missing required options: --model, --benchmarks, --out"),
        (["experiment"], "error: missing required option: --config (or the YAML as the first argument)"),
        (["organism", "compare", "--seeds", "2"], "error: missing required option: --out"),
        (["organism", "fullft", "--reduced"], "error: missing required option: --out"),
    ],
)  # fmt: skip
def test_every_missing_option_is_named_at_once_as_a_flag(args: list[str], message: str | None) -> None:
    code, text = invoke(args)
    assert code == 2, text
    if message is None:
        assert "missing required" not in text, text
    else:
        assert message in text, text


def test_missing_options_given_by_neither_flag_nor_file(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: smollm2\nrecipe: arithmetic\n")
    code, text = invoke(["train", "-c", str(cfg)])
    assert code == 2 and f"error: missing required option: --out (as flags or as keys in {cfg})" in text


def test_input_rules_name_flags(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, text = invoke([*merge_args(env, out), "--task-model", str(env["task"])])
    assert code == 2, text
    assert "give exactly one of --task-adapter (a LoRA) and --task-model (a full fine-tune)" in text
    code, text = invoke([*merge_args(env, out), "--threshold", "3"])
    assert code == 2 and "--threshold: threshold must lie in [0, 1]" in text, text
    code, text = invoke([*merge_args(env, out), "--mode", "fancy"])
    assert code == 2 and "'--mode'" in text and "'exact', 'peft-linear'" in text, text
    assert not out.exists()


def test_a_value_from_the_yaml_file_is_named_by_its_key(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("threshold: 3\n")
    code, text = invoke([*merge_args(env, tmp_path / "o"), "-c", str(cfg)])
    assert code == 2 and f"invalid config {cfg}: threshold: threshold must lie in [0, 1]" in text, text


def test_yaml_typos_get_the_closest_key(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("treshold: 0.3\ntopk: 2\nzzz: 1\n")
    code, text = invoke([*merge_args(env, tmp_path / "o"), "-c", str(cfg)])
    assert code == 2, text
    flat = " ".join(text.split())
    assert f"invalid config {cfg}: unknown key `treshold`; did you mean `threshold`?" in flat
    assert "unknown key `topk`; did you mean `top_k`?" in flat
    assert "unknown key `zzz` (valid keys: out, safety_adapter, safety_model, threshold, top_k" in flat
    assert not (tmp_path / "o").exists()


def test_nested_yaml_typos_get_the_closest_key(tmp_path: Path) -> None:
    """The loader's suggestion reaches keys inside a section (an experiment's `setup:`)."""

    class Setup(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task_adapter: str | None = None
        safety_adapter: str | None = None

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        setup: Setup | None = None

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("setup:\n  safety_adaptor: s\n")
    with pytest.raises(
        InputError, match=r"unknown key `setup.safety_adaptor`; did you mean `safety_adapter`\?"
    ):
        load_config(Config, cfg, {})


def test_eval_quiet_turns_off_the_progress_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`eval -q`: no generation/judging bars (the runner's switch) and no transformers loading bars while
    the evaluation runs; both as before afterwards."""
    from tinymodel import build_tiny_model
    from transformers.utils import logging as hf_logging

    from safemerge.common.progress import SHOW_PROGRESS

    seen: list[tuple[bool, bool]] = []

    def fake_evaluate(cfg: Any) -> None:
        seen.append((SHOW_PROGRESS.get(), hf_logging.is_progress_bar_enabled()))

    monkeypatch.setattr("safemerge.cli.eval.evaluate", fake_evaluate)
    model = build_tiny_model(tmp_path / "m")
    for i, flags in enumerate((["-q"], [])):
        args = ["eval", "--model", str(model), "--benchmarks", "arithmetic", "-o", str(tmp_path / f"o{i}")]
        res = runner.invoke(app, args + flags)
        assert res.exit_code == 0, res.output
    assert seen == [(False, False), (True, True)]
    assert SHOW_PROGRESS.get() and hf_logging.is_progress_bar_enabled()


def test_quiet_turns_off_every_library_bar_and_restores_them() -> None:
    """`run_guarded(body, quiet=True)` (every command's `-q`): safemerge's switch, transformers' loading
    bars, huggingface_hub's download bars and transformers' GGUF conversion bar are off inside, as they
    were afterwards, also on an error."""
    from huggingface_hub import utils as hub_utils
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from safemerge.cli.common import run_guarded
    from safemerge.common.errors import InputError
    from safemerge.common.progress import SHOW_PROGRESS

    def state() -> tuple[bool, bool, bool, bool]:
        return (
            SHOW_PROGRESS.get(),
            hf_logging.is_progress_bar_enabled(),
            not hub_utils.are_progress_bars_disabled(),
            not gguf_utils.tqdm(range(2), desc="GGUF").disable,  # the bar the packaged model's load draws
        )

    before = state()
    assert before == (True, True, True, True)
    assert run_guarded(state, quiet=True) == (False, False, False, False)
    assert run_guarded(state) == (True, True, True, True)

    def fails() -> None:
        raise InputError("bad")

    with pytest.raises(typer.Exit):
        run_guarded(fails, quiet=True)
    assert state() == before


@pytest.mark.parametrize(
    "exc",
    [
        OSError(28, "No space left on device"),
        RuntimeError("I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_is_an_error_not_a_traceback(exc: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk (ENOSPC, or a library's error wrapping it, as safetensors words it) is the machine's
    state, not a bug: exit 1 with one line saying what to do, and no traceback."""
    from safemerge.cli.common import run_guarded

    def fails() -> None:
        raise exc

    with pytest.raises(typer.Exit) as info:
        run_guarded(fails)
    err = capsys.readouterr().err
    assert info.value.exit_code == 1
    assert "error: no space left on the device" in " ".join(err.split())
    assert "Traceback" not in err and "internal error" not in err


def test_experiment_progress_notes_follow_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`computing <cell>` is a progress note: printed with progress, not under `-q` (progress off)."""
    from types import SimpleNamespace

    from safemerge.experiment import runner as exp_runner

    monkeypatch.setattr(exp_runner, "variant_done", lambda out, c: False)
    monkeypatch.setattr(exp_runner, "run_cell", lambda c, out, progress: None)
    for progress in (True, False):
        result = SimpleNamespace(computed=[])
        exp_runner.compute_cells([SimpleNamespace(label="cell-x")], tmp_path, progress, result)  # type: ignore[list-item,arg-type]
        assert result.computed == ["cell-x"]
        assert ("computing cell-x" in capsys.readouterr().err) is progress


def test_experiment_evaluation_tables_follow_quiet(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each evaluation's own table (and the "validating" note) inside an experiment or the demo is
    progress: shown by default, not under `-q`; the results files are written either way."""
    from types import SimpleNamespace

    from safemerge.common.progress import progress_bars
    from safemerge.experiment import evaluation as exp_eval
    from safemerge.experiment import runner as exp_runner

    tables: list[str] = []
    written: list[str] = []
    monkeypatch.setattr(exp_eval, "generate", lambda *a: {})
    monkeypatch.setattr(exp_eval, "_eval_config", lambda *a: None)
    monkeypatch.setattr(exp_eval, "cache_dir", lambda *a: None)
    monkeypatch.setattr(exp_eval, "score", lambda *a: ([], {"m": {"benchmarks": {}}}))
    monkeypatch.setattr(exp_eval, "print_table", lambda metrics, judge: tables.append(judge))
    monkeypatch.setattr(exp_eval, "_write_row", lambda out, cell, plan, rows, m: written.append(cell))
    cfg = SimpleNamespace(evaluation=SimpleNamespace(judge="keyword", judge_model=None))
    groups = [("m", [], "base-cell")]
    monkeypatch.setattr(exp_runner, "evaluate_cells", lambda *a: None)
    monkeypatch.setattr(exp_runner, "eval_done", lambda *a: False)
    monkeypatch.setattr(exp_runner, "load_planned", lambda *a: [])
    result = SimpleNamespace(
        plans={"validation": None}, cells=[SimpleNamespace(validates=True, label="c1")], out=None
    )
    for shown in (True, False):
        tables.clear()
        with progress_bars(shown):
            exp_eval._evaluate_models(cfg, Path("."), groups, None, [(None, None)])  # type: ignore[arg-type]
            exp_runner.validate(SimpleNamespace(defenses=[]), result, {}, shown)  # type: ignore[arg-type]
        assert len(tables) == int(shown) and written[-1] == "base-cell"
        assert ("validating 1 variant(s): c1" in capsys.readouterr().err) is shown
    assert len(written) == 2
