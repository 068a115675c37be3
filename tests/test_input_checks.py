"""Which input is which (docs/engine.md): the same model twice, swapped models, task and safety adapters
mixed up, a safety adapter for another base model, a LoRA on a tied LM head, trainable tokens. Each case
runs the command line and checks the exit code and the words of the message; nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import edited_copy, save_adapter, save_pair
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.engine.inputs import SAFETY_RECIPES, TASK_RECIPES
from safemerge.train.recipes import RECIPES

runner = CliRunner()
TASK_KEY = "model.layers.0.self_attn.q_proj.weight"


def tiny_llama(root: Path, name: str, hidden: int = 32, tied: bool = False) -> Path:
    """A tiny random Llama of hidden size `hidden` (tests/builders' layout otherwise)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=hidden, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    al, un = save_pair(root, "llama", torch.float32)
    other = tiny_llama(root, "other-base", hidden=64)
    task_model = edited_copy(al, root / "task_model", lambda t: t[TASK_KEY].add_(0.1))
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "copy": Path(shutil.copytree(al, root / "copy-of-aligned")),
        "task": save_adapter(al, root / "task", seed=1),
        "safety": save_adapter(al, root / "safety", seed=2),
        "other_safety": save_adapter(other, root / "other_safety", seed=2),
        "task_model": task_model,
    }


def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "TERM": "dumb"})
    return result.exit_code, " ".join((result.output + (result.stderr or "")).split())


def merge(env: dict[str, Path], out: Path, **over: Path) -> tuple[int, str]:
    p = {**env, **over}
    return invoke(
        ["merge", "-a", p["aligned"], "-u", p["unaligned"], "-t", p["task"], "-s", p["safety"], "-o", out,
         "--no-plot", "--quiet"]
    )  # fmt: skip


def merge_full(env: dict[str, Path], out: Path, safety: Path) -> tuple[int, str]:
    """`merge --task-model` (a full fine-tune of the aligned model) with a safety LoRA."""
    p = env
    return invoke(
        ["merge", "-a", p["aligned"], "-u", p["unaligned"], "--task-model", p["task_model"], "-s", safety,
         "-o", out, "--no-plot", "--quiet"]
    )  # fmt: skip


def refused(code: int, out: str, dest: Path, *words: str) -> None:
    assert code == 2, out
    for w in words:
        assert w in out, (w, out)
    assert not dest.exists()


# --- the same model twice --------------------------------------------------------------------------
def test_the_same_directory_twice_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = merge(env, tmp_path / "m", unaligned=env["aligned"])
    refused(code, out, tmp_path / "m", "--aligned and --unaligned are the same model", "V = 0")
    code, out = invoke(["scan", "-a", env["aligned"], "-u", env["aligned"], "-t", env["task"]])
    assert code == 2 and "same model" in out, out


def test_a_symlink_to_the_aligned_model_is_the_same_model(env: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(env["aligned"], target_is_directory=True)
    code, out = merge(env, tmp_path / "m", unaligned=link)
    refused(code, out, tmp_path / "m", "same model", f"both are {env['aligned'].resolve()}")


def test_a_copy_of_the_aligned_model_is_the_same_model(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = merge(env, tmp_path / "m", unaligned=env["copy"])
    refused(code, out, tmp_path / "m", "same model", "same bytes in all 6 weights compared")


def test_a_resaved_copy_is_caught_by_v_being_zero_everywhere(env: dict[str, Path], tmp_path: Path) -> None:
    """Another file layout (here two shards) has another fingerprint, the same values: V = 0 on every
    scanned module is refused after the scan, before anything is written."""
    model = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()  # premise: another layout
    code, out = merge(env, tmp_path / "m", unaligned=tmp_path / "sharded")
    refused(code, out, tmp_path / "m", "V = W_aligned - W_unaligned is 0 on every one of the 6 scanned")


def test_same_model_in_defend_fullft_and_subspace(env: dict[str, Path], tmp_path: Path) -> None:
    a = env["aligned"]
    code, out = invoke(["defend", "--method", "safelora", "-a", a, "-u", env["copy"], "-t", env["task"],
                        "-o", tmp_path / "d", "--no-plot", "--quiet"])  # fmt: skip
    refused(code, out, tmp_path / "d", "same model")
    code, out = invoke(["merge", "-a", a, "-u", a, "--task-model", env["task_model"], "-s", env["safety"],
                        "-o", tmp_path / "f", "--no-plot", "--quiet"])  # fmt: skip
    refused(code, out, tmp_path / "f", "same model")
    code, out = invoke(["subspace", "-a", a, "-u", env["copy"], "-k", "2", "-o", tmp_path / "s"])
    refused(code, out, tmp_path / "s", "same model")


def test_a_legit_pair_still_merges(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = merge(env, tmp_path / "m")
    assert code == 0, out
    report = json.loads((tmp_path / "m" / "safemerge_report.json").read_text())
    assert not any("swapped" in w or "same model" in w for w in report["warnings"])


# --- swapped models --------------------------------------------------------------------------------
def test_swapped_models_are_refused(env: dict[str, Path], tmp_path: Path) -> None:
    """-a U -u A with adapters trained on A: ρ cannot tell (it is invariant under V → −V)."""
    code, out = merge(env, tmp_path / "m", aligned=env["unaligned"], unaligned=env["aligned"])
    refused(
        code, out, tmp_path / "m",
        f"the task adapter {env['task']} names {env['aligned']}, the --unaligned model, as its base",
        "are --aligned and --unaligned swapped?",
    )  # fmt: skip
    code, out = invoke(["defend", "--method", "resta", "-a", env["unaligned"], "-u", env["aligned"],
                        "-t", env["task"], "-o", tmp_path / "d", "--no-plot", "--quiet"])  # fmt: skip
    refused(code, out, tmp_path / "d", "swapped?")


def test_a_safety_adapter_on_the_unaligned_model_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    safety_on_u = save_adapter(env["unaligned"], tmp_path / "safety_u", seed=2)
    code, out = merge(env, tmp_path / "m", safety=safety_on_u)
    refused(code, out, tmp_path / "m", "the safety adapter", "the --unaligned model, as its base", "swapped?")
    code, out = merge_full(env, tmp_path / "f", safety_on_u)
    refused(code, out, tmp_path / "f", "the safety adapter", "swapped?")


def test_an_adapter_naming_a_model_that_is_neither_is_quiet(env: dict[str, Path], tmp_path: Path) -> None:
    task = Path(shutil.copytree(env["task"], tmp_path / "task"))
    cfg = json.loads((task / "adapter_config.json").read_text())
    (task / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/moved/away"}))
    code, out = merge(env, tmp_path / "m", task=task)
    assert code == 0, out


# --- task and safety adapters mixed up -------------------------------------------------------------
def with_recipe(src: Path, dst: Path, recipe: str) -> Path:
    """A copy of an adapter with the train_config.yaml that `safemerge train` writes beside it."""
    shutil.copytree(src, dst)
    (dst / "train_config.yaml").write_text(
        f"model: aligned\nrecipe: {recipe}\nsamples: null\nmix_safety: 0\nout: {dst}\n"
        "# resolved model path: aligned\n# examples: 10\n"
    )
    return dst


def test_adapters_trained_for_the_other_role_are_warned_about(env: dict[str, Path], tmp_path: Path) -> None:
    task = with_recipe(env["safety"], tmp_path / "t", "safety")
    safety = with_recipe(env["task"], tmp_path / "s", "gsm8k")
    code, out = merge(env, tmp_path / "m", task=task, safety=safety)
    assert code == 0, out
    warnings = json.loads((tmp_path / "m" / "safemerge_report.json").read_text())["warnings"]
    assert f"the task adapter {task} was trained by safemerge train as a safety adapter (recipe: safety, " \
        "train_config.yaml): are the task and safety adapters swapped?" in warnings  # fmt: skip
    assert any(w.startswith(f"the safety adapter {safety} was trained by safemerge train as a task adapter "
                            "(recipe: gsm8k") for w in warnings)  # fmt: skip
    code, out = merge(env, tmp_path / "right", task=with_recipe(env["task"], tmp_path / "t2", "pubmedqa"),
                      safety=with_recipe(env["safety"], tmp_path / "s2", "safety-hub"))  # fmt: skip
    assert code == 0, out
    warnings = json.loads((tmp_path / "right" / "safemerge_report.json").read_text())["warnings"]
    assert not any("trained by safemerge train" in w for w in warnings)


def test_the_recipe_sets_match_safemerge_train() -> None:
    assert set(RECIPES) == SAFETY_RECIPES | TASK_RECIPES and not SAFETY_RECIPES & TASK_RECIPES


# --- a safety adapter for another base -------------------------------------------------------------
def test_a_safety_adapter_on_another_base_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    words = (
        "module model.layers.0.self_attn.q_proj: the safety adapter",
        "lora_A (4, 64) and lora_B (64, 4)",
        "(d_out, d_in) = (64, 64)",
        "has shape (32, 32)",
        "trained on another base model?",
    )
    code, out = merge(env, tmp_path / "m", safety=env["other_safety"])
    refused(code, out, tmp_path / "m", *words)
    for method in ("safemerge", "merge-all"):
        code, out = invoke(["defend", "--method", method, "-a", env["aligned"], "-u", env["unaligned"],
                            "-t", env["task"], "-s", env["other_safety"], "-o", tmp_path / method,
                            "--no-plot", "--quiet"])  # fmt: skip
        refused(code, out, tmp_path / method, *words)
    code, out = merge_full(env, tmp_path / "f", env["other_safety"])
    refused(code, out, tmp_path / "f", *words)


# --- a LoRA on a tied LM head, trainable tokens ----------------------------------------------------
@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    un = tiny_llama(root, "unaligned", tied=True)
    al = edited_copy(un, root / "aligned", lambda t: [v.add_(0.05) for v in t.values()])
    return {"aligned": al, "unaligned": un}


def peft_adapter(base: Path, out: Path, **kwargs: object) -> Path:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **kwargs)).save_pretrained(out)
    return out


def test_a_lora_on_a_tied_lm_head_is_refused(tied: dict[str, Path], tmp_path: Path) -> None:
    task = peft_adapter(tied["aligned"], tmp_path / "t", target_modules=["q_proj", "lm_head"])
    assert "lm_head.weight" not in load_file(tied["aligned"] / "model.safetensors")  # premise: tied head
    safety = peft_adapter(tied["aligned"], tmp_path / "s", target_modules=["q_proj"])
    code, out = invoke(["merge", "-a", tied["aligned"], "-u", tied["unaligned"], "-t", task, "-s", safety,
                        "-o", tmp_path / "m", "--no-plot", "--quiet"])  # fmt: skip
    words = (
        "lm_head is tied to the input embeddings in",
        "(tie_word_embeddings: true)",
        "has no weight of its own",
    )
    refused(code, out, tmp_path / "m", *words, "without lm_head in target_modules")
    code, out = invoke(["merge", "-a", tied["aligned"], "-u", tied["unaligned"], "-t", safety, "-s", task,
                        "-o", tmp_path / "m2", "--no-plot", "--quiet"])  # fmt: skip
    refused(code, out, tmp_path / "m2", "lm_head is tied", "the safety adapter")


def test_trainable_tokens_are_refused(tied: dict[str, Path], tmp_path: Path) -> None:
    task = peft_adapter(
        tied["aligned"], tmp_path / "t", target_modules=["q_proj"], trainable_token_indices=[1]
    )
    code, out = invoke(["scan", "-a", tied["aligned"], "-u", tied["unaligned"], "-t", task])
    assert code == 2 and "adapter_config.json: trainable tokens (trainable_token_indices) are not" in out, out
    cfg = json.loads((task / "adapter_config.json").read_text())  # the tensor alone is refused too
    (task / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": None}))
    code, out = invoke(["scan", "-a", tied["aligned"], "-u", tied["unaligned"], "-t", task])
    assert code == 2 and "token_adapter.trainable_tokens_delta" in out and "trainable tokens" in out, out


def test_a_pinned_hub_input_is_still_recognised_as_the_adapters_base(tmp_path: Path) -> None:
    """`--unaligned org/base@<commit>` names the same hub model as an adapter's `org/base`: the swap check
    compares hub ids without their revision (and a local directory by its resolved path)."""
    from safemerge.engine.inputs import names_model

    elsewhere = tmp_path / "not-a-snapshot"
    elsewhere.mkdir()
    assert names_model("org/base", "org/base@" + "a" * 40, elsewhere)
    assert names_model("Org/Base", "org/base@main", elsewhere)
    assert not names_model("org/other", "org/base@main", elsewhere)
    assert names_model(str(elsewhere), str(elsewhere), elsewhere)
