"""No partial merge by default (docs/engine.md, "Partial merges"): a merge whose selected modules the safety
adapter lacks is refused before anything is written, `--allow-partial` merges the rest and says so in every
headline; `safemerge train --like` trains a safety adapter on the task adapter's modules, and
`--target-modules all-linear` is PEFT's spelling."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from builders import adapter_config, pair_with_adapters, save_adapter, tiny_chat_setup
from rich.console import Console
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.engine.report import ModuleRecord, Report, print_summary

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The tiny Llama of save_pair has 3 layers: 21 modules on all seven projections, 6 on q/v.
N_ALL, N_QV = 21, 6


def invoke(args: list[str], columns: int = 400) -> tuple[int, str]:
    """Exit code and the raw output (stdout + stderr) of a command, not a terminal, `columns` wide."""
    result = CliRunner().invoke(app, args, env={"COLUMNS": str(columns), "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def flat(text: str) -> str:
    """The text with every run of whitespace (line wraps of the console) as one space."""
    return " ".join(text.split())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A task LoRA on all seven projections and a safety LoRA on q/v only (the safety recipe's default)."""
    root = tmp_path_factory.mktemp("partial")
    return pair_with_adapters(root, task_targets=ALL7)


def merge_args(env: dict[str, Path], out: Path, *extra: str, command: str = "merge") -> list[str]:
    """`merge` (or `defend`) of the task with the safety adapter, every module selected (τ above any ρ)."""
    return [
        command, "--aligned", str(env["aligned"]), "--unaligned", str(env["unaligned"]),
        "--task-adapter", str(env["task"]), "--safety-adapter", str(env["safety"]), "--out", str(out),
        "--no-plot", *extra,
    ]  # fmt: skip


def refusal(env: dict[str, Path]) -> str:
    """The refusal of this merge, word for word (the module types in module order: mlp before self_attn)."""
    return (
        f"{N_ALL - N_QV} of the {N_ALL} selected modules have no counterpart in the safety adapter (types: "
        "down_proj, gate_proj, up_proj, k_proj, o_proj); they would stay as fine-tuned. Train a safety "
        f"adapter on the same modules: `safemerge train --recipe safety --like {env['task']} ...`, or pass "
        f"--allow-partial (YAML: allow_partial: true) to merge only the {N_QV} that have one"
    )


# --- the refusal -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["--threshold", "1.0"],
        ["--method", "safemerge", "--threshold", "1.0"],
        ["--method", "merge-all"],
    ],
    ids=["merge", "defend-safemerge", "defend-merge-all"],
)
def test_a_partial_merge_is_refused_and_nothing_is_written(
    env: dict[str, Path], tmp_path: Path, command: list[str]
) -> None:
    """Exit 2 with the refusal's words (how many, which types, `--like`, `--allow-partial`), through
    `merge` and through `defend` (SafeMERGE and merge-all); no output, no temporary sibling left."""
    name = "defend" if command[0] == "--method" else "merge"
    out = tmp_path / "out"
    code, text = invoke(merge_args(env, out, *command, command=name))
    assert code == 2, text
    assert refusal(env) in flat(text)
    assert "Traceback" not in text
    assert list(tmp_path.iterdir()) == []  # neither OUT nor a temporary sibling of it


def test_allow_partial_merges_and_every_headline_says_both_numbers(
    env: dict[str, Path], tmp_path: Path
) -> None:
    """`--allow-partial`: exit 0; the report records the option and a warning; the console title, the
    Markdown summary, the model card and the plot title say "N selected, M merged"; the card never calls
    the merged modules "the M of N modules whose update left the safety subspace"."""
    out = tmp_path / "out"
    code, text = invoke(merge_args(env, out, "--threshold", "1.0", "--allow-partial"))
    assert code == 0, text
    kept_text = f"({N_ALL - N_QV} kept as fine-tuned: no safety counterpart)"
    headline = f"{N_ALL} of {N_ALL} modules selected, {N_QV} merged {kept_text}"
    assert f"safemerge merge: {headline}" in flat(text)
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["options"]["allow_partial"] is True
    assert report["summary"]["selected"] == N_ALL and report["summary"]["merged"] == N_QV
    warned = [w for w in report["warnings"] if "kept as fine-tuned (allow_partial)" in w]
    assert len(warned) == 1 and warned[0].startswith(f"{N_ALL - N_QV} selected module(s) have no safety")
    kept = [m for m in report["modules"] if "no-safety-counterpart" in m["flags"]]
    assert len(kept) == N_ALL - N_QV and not any(m["merged"] for m in kept)
    assert f"**{headline}**" in (out / "safemerge_report.md").read_text()
    card = flat((out / "README.md").read_text())
    assert f"{N_ALL} of its {N_ALL} modules were selected" in card
    assert f"and {N_QV} of them were merged with the safety adapter" in card
    assert f"The other {N_ALL - N_QV} selected modules have no counterpart in the safety update" in card
    assert "whose update left" not in card
    assert "allow_partial: true" in (out / "safemerge.yaml").read_text()


def test_the_plot_title_says_both_numbers(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """similarity.png's title: "N of T modules selected, M merged" (read back from the figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "close", lambda *_: None)  # keep the figure to read it back
    plt.close("all")
    code, text = invoke(
        [*merge_args(env, tmp_path / "out", "--threshold", "1.0", "--allow-partial"), "--plot"]
    )
    assert code == 0, text
    title = plt.gcf().axes[0].get_title()
    assert title.startswith(f"SafeMERGE: {N_ALL} of {N_ALL} modules selected, {N_QV} merged"), title
    matplotlib.pyplot.close("all")


def test_a_full_merge_with_a_partial_safety_lora_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    """A full fine-tune (`--task-model`, all seven projections scanned) with the q/v safety LoRA: exit 2
    before the model is written, pointing to `--safety-model` and the module types to train."""
    task = tmp_path / "task_model"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(
        env["aligned"], dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(task)
    out = tmp_path / "out"
    args = ["merge", "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "--task-model", str(task),
            "-s", str(env["safety"]), "--out", str(out), "--threshold", "1.0", "--no-plot"]  # fmt: skip
    code, text = invoke(args)
    assert code == 2, text
    text = flat(text)
    assert f"{N_ALL - N_QV} of the {N_ALL} selected modules have no counterpart in the safety adapter" in text
    assert "--safety-model" in text and "--target-modules down_proj,gate_proj,up_proj,k_proj,o_proj" in text
    assert not out.exists()
    code, text = invoke([*args, "--allow-partial"])
    assert code == 0, text
    assert f"{N_ALL} of {N_ALL} modules selected, {N_QV} merged" in flat(text)
    card = flat((out / "README.md").read_text())
    assert (
        f"and {N_QV} of them were set to W_aligned" in card and "are the task model's as fine-tuned" in card
    )


# --- no column cut in a log --------------------------------------------------------------------------------
def test_no_column_is_cut_in_a_log_80_columns_wide(env: dict[str, Path], tmp_path: Path) -> None:
    """The summary table of a command whose output is a file (not a terminal) 80 columns wide shows every
    flag whole: `no-safety-counterpart`, not `no-safety…`."""
    code, text = invoke(
        merge_args(env, tmp_path / "out", "--threshold", "1.0", "--allow-partial"), columns=80
    )
    assert code == 0, text
    rows = [line for line in text.splitlines() if line.startswith("│") and "mlp.down_proj" in line]
    assert len(rows) == 3 and all("no-safety-counterpart" in row for row in rows), text
    assert f"report: {tmp_path / 'out' / 'safemerge_report.json'}\n" in text  # paths are not broken either


def kept_modules() -> list[ModuleRecord]:
    """Three selected gate_proj rows kept as fine-tuned (`no-safety-counterpart`), for the console tests."""
    return [
        ModuleRecord(
            name=f"base_model.model.model.layers.{i}.mlp.gate_proj",
            layer=i,
            module_type="gate_proj",
            shape=(4, 4),
            rank_task=2,
            rho=0.1 * i,
            rho_rounded=0.1 * i,
            selected=True,
            delta_norm_in=1.0,
            flags=["no-safety-counterpart"],
            delta_norm_out=1.0,
        )
        for i in range(3)
    ]


def test_print_summary_to_a_narrow_file_folds_and_cuts_nothing() -> None:
    """`print_summary` on a non-terminal console 80 columns wide: every cell whole on its row; the
    console's width is left as it was."""
    mods = kept_modules()
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, color_system=None)
    print_summary(Report("merge", {}, {}, mods, {}), console)
    rows = [line for line in buffer.getvalue().splitlines() if "gate_proj" in line]
    assert len(rows) == 3 and all("no-safety-counterpart" in r and "1.0000 → 1.0000" in r for r in rows)
    assert console.width == 80


def test_print_summary_in_a_narrow_terminal_ends_no_cell_in_an_ellipsis() -> None:
    """In a terminal 80 columns wide the cells fold instead of ending in "…": every letter of the flag is
    on the screen (split over two lines at most)."""
    mods = kept_modules()
    buffer = io.StringIO()
    console = Console(file=buffer, width=80, force_terminal=True, color_system=None)
    print_summary(Report("merge", {}, {}, mods, {}), console)
    cells = [line.split("│")[-2].strip() for line in buffer.getvalue().splitlines() if line.startswith("│")]
    assert "…" not in buffer.getvalue().replace("layers.…", "")
    assert "".join(cells) == "no-safety-counterpart" * 3


# --- train --like and all-linear ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny chat model pair and a task LoRA on all seven projections with r 6, alpha 12 (none of
    `train`'s defaults)."""
    setup = tiny_chat_setup(tmp_path_factory.mktemp("chat"))
    setup["task7"] = save_adapter(
        setup["aligned"], setup["root"] / "task7", seed=1, r=6, alpha=12, targets=ALL7
    )
    return setup


def train_args(chat: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`train --recipe safety` for 1 step of 4 of 8 examples (seconds), plus `extra`."""
    return ["train", "--model", str(chat["aligned"]), "--recipe", "safety", "--out", str(out), "--samples",
            "8", "--max-steps", "1", "--batch-size", "4", "--max-length", "64", *extra]  # fmt: skip


def test_train_like_copies_modules_rank_and_alpha_and_the_merge_is_whole(
    chat: dict[str, Path], tmp_path: Path
) -> None:
    """`train --recipe safety --like TASK`: the adapter's config has the task adapter's target modules, r
    and lora_alpha; merging the two needs no `--allow-partial` and merges every selected module."""
    safety = tmp_path / "safety"
    code, text = invoke(train_args(chat, safety, "--like", str(chat["task7"])))
    assert code == 0, text
    conf = adapter_config(safety)
    assert set(conf["target_modules"]) == set(ALL7)  # type: ignore[arg-type]
    assert (conf["r"], conf["lora_alpha"]) == (6, 12)
    resolved = (safety / "train_config.yaml").read_text()
    assert "lora_r: 6" in resolved and f"copied from --like {chat['task7']}" in resolved
    out = tmp_path / "merged"
    args = ["merge", "-a", str(chat["aligned"]), "-u", str(chat["unaligned"]), "-t", str(chat["task7"]),
            "-s", str(safety), "--out", str(out), "--threshold", "1.0", "--no-plot"]  # fmt: skip
    code, text = invoke(args)
    assert code == 0, text
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["summary"]["selected"] == report["summary"]["merged"] == len(report["modules"]) == 14
    assert not any("no-safety-counterpart" in m["flags"] for m in report["modules"])


@pytest.mark.parametrize("flag", [["--lora-r", "4"], ["--target-modules", "q_proj"], ["--lora-alpha", "3"]])
def test_train_like_with_a_field_it_copies_is_refused(
    chat: dict[str, Path], tmp_path: Path, flag: list[str]
) -> None:
    """`--like` with `--lora-r`, `--lora-alpha` or `--target-modules` is ambiguous: exit 2 naming both."""
    code, text = invoke(train_args(chat, tmp_path / "o", "--like", str(chat["task7"]), *flag))
    assert code == 2, text
    assert "like copies target_modules, lora_r and lora_alpha" in flat(text)
    assert not (tmp_path / "o").exists()


def test_train_like_a_directory_that_is_no_adapter_is_refused(chat: dict[str, Path], tmp_path: Path) -> None:
    code, text = invoke(train_args(chat, tmp_path / "o", "--like", str(chat["aligned"])))
    assert code == 2, text
    assert "Traceback" not in text and "adapter given to --like" in flat(text)


def test_train_all_linear_is_passed_to_peft_as_its_string(chat: dict[str, Path], tmp_path: Path) -> None:
    """`--target-modules all-linear`: PEFT's own spelling trains every linear layer but the LM head."""
    out = tmp_path / "a"
    code, text = invoke(train_args(chat, out, "--target-modules", "all-linear"))
    assert code == 0, text
    saved = adapter_config(out)["target_modules"]  # PEFT saves the module names it expanded to
    assert {str(m).rsplit(".", 1)[-1] for m in saved} == set(ALL7)  # type: ignore[attr-defined]
    assert "target_modules: all-linear" in (out / "train_config.yaml").read_text()
    code, text = invoke(train_args(chat, tmp_path / "b", "--target-modules", "all-linear,q_proj"))
    assert code == 2 and "all-linear stands alone" in flat(text), text


# --- experiments: checked before any training -------------------------------------------------------------
def experiment(safety_train: dict[str, object], options: dict[str, object]) -> object:
    """A SafeMERGE experiment that trains a task LoRA on all seven projections and a safety LoRA."""
    from safemerge.experiment.config import ExperimentConfig

    return ExperimentConfig.model_validate({
        "name": "partial", "out": "unused",
        "setup": {"aligned": "al", "unaligned": "un",
                  "task_train": {"recipe": "arithmetic", "target_modules": ALL7},
                  "safety_train": {"recipe": "safety", **safety_train}},
        "defenses": [{"method": "safemerge", "options": options, "grid": {"threshold": [0.3, 0.4]}}],
        "evaluation": {"benchmarks": ["arithmetic"]},
    })  # fmt: skip


def test_an_experiment_whose_safety_recipe_misses_task_modules_fails_before_training() -> None:
    """`setup.safety_train` on q/v under a task recipe on all seven projections: exit 2 from `prepare`
    (before any adapter is trained) naming the missing types; fine with the same modules, with `like`,
    or with `allow_partial` in the merging defence's options."""
    from safemerge.common.errors import InputError
    from safemerge.experiment.cells import check_safety_targets, expand_cells, prepare

    with pytest.raises(InputError) as info:
        prepare(experiment({}, {}))  # type: ignore[arg-type]
    assert "targets k_proj, o_proj, gate_proj, up_proj, down_proj, which setup.safety_train does not" in str(
        info.value
    )
    assert "allow_partial: true" in str(info.value)
    for ok in (experiment({"target_modules": ALL7}, {}), experiment({}, {"allow_partial": True})):
        check_safety_targets(ok, expand_cells(ok, Path("unused")))  # type: ignore[arg-type]
