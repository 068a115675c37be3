"""Training data: recipes, the HarmBench guard, local files, SafeInstr mixing, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.common.packaged import harmbench_prompts
from safemerge.evaluate.judges import refused
from safemerge.train import HarmBenchLeakError, TrainConfig, build_examples, check_no_harmbench
from safemerge.train.recipes import arithmetic_problems, mix_in_safety, user_texts
from safemerge.train.trainer import prepare_data


def test_arithmetic_is_deterministic_correct_and_disjoint_from_eval() -> None:
    a = build_examples("arithmetic", 300, seed=1)
    assert a == build_examples("arithmetic", 300, seed=1)
    assert a != build_examples("arithmetic", 300, seed=2)
    for q, ans, c in arithmetic_problems(300, 1):
        x, op, y = q.removeprefix("What is ").rstrip("?").split()
        assert c == (int(x) + int(y) if op == "+" else int(x) - int(y))
        assert ans.endswith(f"The answer is {c}.")
    train_q = {q for q, _, _ in arithmetic_problems(2000, 0, "train")}
    eval_q = {q for q, _, _ in arithmetic_problems(200, 0, "eval")}
    assert not train_q & eval_q


def test_offline_safety_recipe_is_varied_and_recognised_as_refusal() -> None:
    ex = build_examples("safety", 200, seed=0)
    assert len(ex) == 200
    responses = [e["completion"][0]["content"] for e in ex]
    assert len(set(responses)) > 50  # varied, not one fixed string
    assert all(refused(r) for r in responses)
    assert len(set(user_texts(ex))) == 200
    check_no_harmbench(user_texts(ex), "safety")  # packaged StrongREJECT/DNA prompts are not HarmBench


def test_harmbench_guard_raises() -> None:
    hb = harmbench_prompts("test")
    with pytest.raises(HarmBenchLeakError, match="HarmBench"):
        check_no_harmbench(["Write a poem.", hb[3]], "data.jsonl")
    # trivial edits (case, punctuation, wrapping text) do not hide a HarmBench prompt
    with pytest.raises(HarmBenchLeakError, match="example 0"):
        check_no_harmbench([f"Please help: {hb[0].upper()}!!"], "data.jsonl")
    check_no_harmbench(["Write a poem about the sea."], "data.jsonl")


def test_harmbench_in_training_file_fails_before_training(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [
        {"prompt": "What is 2+2?", "response": "4"},
        {"prompt": harmbench_prompts("val")[0], "response": "No."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(model="unused", recipe=str(data), out=tmp_path / "out")
    with pytest.raises(HarmBenchLeakError, match="recipe"):
        prepare_data(cfg)
    res = CliRunner().invoke(
        app, ["train", "--model", "unused", "--recipe", str(data), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "HarmBench" in res.output
    assert not (tmp_path / "o").exists()


def test_file_recipes(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text(
        json.dumps({"prompt": "Hi", "response": "Hello"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}]})
        + "\n"
    )
    ex = build_examples(str(jl), None, 0)
    assert ex[0] == {
        "prompt": [{"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello"}],
    }
    assert ex[1]["completion"] == [{"role": "assistant", "content": "B"}]
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("prompt,response\nWhat is 1+1?,2\n")
    assert build_examples(str(csv_file), None, 0)[0]["completion"][0]["content"] == "2"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"question": "q", "answer": "a"}\n', r"needs columns `prompt` and `response`.*answer"),
        ('{"prompt": "q"}\n', "needs columns"),
        ("not json\n", "line 1: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', "ending with an assistant turn"),
        ("", "no rows"),
    ],
)
def test_file_recipe_errors_name_the_file(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=match) as exc:
        build_examples(str(f), None, 0)
    assert "bad.jsonl" in str(exc.value)


def test_trl_prompt_completion_formats(tmp_path: Path) -> None:
    """TRL's prompt-completion (strings) and conversational prompt-completion rows read as the same
    examples as the equivalent `prompt`/`response` and `messages` rows."""
    system = {"role": "system", "content": "Be brief."}
    user, assistant = {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}
    rows = [
        {"prompt": "Hi", "completion": "Hello"},
        {"prompt": [system, user], "completion": [assistant]},
        {"prompt": "Hi", "response": "Hello"},
        {"messages": [system, user, assistant]},
    ]
    f = tmp_path / "trl.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = build_examples(str(f), None, 0)
    assert (
        ex[0]
        == ex[2]
        == {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        }
    )
    assert ex[1] == ex[3] == {"prompt": [system, user], "completion": [assistant]}
    csv_file = tmp_path / "trl.csv"
    csv_file.write_text("prompt,completion\nWhat is 1+1?,2\n")
    assert build_examples(str(csv_file), None, 0) == [
        {
            "prompt": [{"role": "user", "content": "What is 1+1?"}],
            "completion": [{"role": "assistant", "content": "2"}],
        }
    ]


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "both be strings or both"),
        ({"prompt": [], "completion": [{"role": "assistant", "content": "a"}]}, "both be strings or both"),
        ({"prompt": [{"role": "user"}], "completion": [{"role": "assistant", "content": "a"}]}, "both"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            "start with an assistant turn",
        ),
        ({"prompt": "q", "completion": " "}, "empty `prompt` or `completion`"),
        ({"prompt": None, "response": "a"}, "must be strings"),
        ({"text": "q a"}, "`prompt` and `completion`, or `messages`"),
    ],
)
def test_malformed_trl_rows_name_file_and_row(tmp_path: Path, row: dict, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    good = {"prompt": "Hi", "completion": "Hello"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(InputError, match=match) as exc:
        build_examples(str(f), None, 0)
    assert "bad.jsonl, row 1" in str(exc.value)


def test_bad_recipe_cli_exit_code(tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("question,answer\nq,a\n")
    res = CliRunner().invoke(app, ["train", "--model", "m", "--recipe", str(f), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.csv" in res.output and "prompt" in res.output
    res = CliRunner().invoke(app, ["train", "--model", "m", "--recipe", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown recipe 'nope'" in res.output
    assert not (tmp_path / "o").exists()


def test_mix_safety() -> None:
    task = build_examples("arithmetic", 50, 0)
    mixed = mix_in_safety(task, 20, 0)
    assert len(mixed) == 70
    assert sum(bool(refused(e["completion"][0]["content"])) for e in mixed) == 20
    assert mixed == mix_in_safety(task, 20, 0)
    assert mix_in_safety(task, 0, 0) == task


def test_config_yaml_and_flag_override(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nrecipe: arithmetic\nout: o\nlora-r: 4\nlearning_rate: 0.001\n")
    cfg = load_config(TrainConfig, y, {"learning_rate": 0.5, "seed": None})
    assert cfg.lora_r == 4 and cfg.learning_rate == 0.5 and cfg.seed == 42
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.lora_dropout == 0.0
    y.write_text("model: m\nrecipe: arithmetic\nout: o\nlora_rank: 4\n")
    with pytest.raises(InputError, match="lora_rank"):
        load_config(TrainConfig, y, {})


@pytest.mark.parametrize("command", ["train", "eval"])
def test_every_option_documents_its_default(command: str) -> None:
    import typer.main

    click_cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    for p in click_cmd.params:
        text = (getattr(p, "help", None) or "").lower()
        assert "default" in text or "required" in text, (command, p.name, text)


def test_trl_formats_train_end_to_end(tmp_path: Path) -> None:
    """TRL's formats reach TRL's trainer as conversational prompt-completion rows: a two-step run on a
    tiny chat model trains (non-zero lora_B) from a file mixing all four row formats."""
    from safetensors.torch import load_file
    from tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model")
    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"}
    rows = [
        {"prompt": "What is 2 + 2?", "completion": "4"},
        {"prompt": [system, user], "completion": [{"role": "assistant", "content": "3"}]},
        {"prompt": "What is 3 + 3?", "response": "6"},
        {"messages": [user, {"role": "assistant", "content": "3"}]},
    ]
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = tmp_path / "adapter"
    args = ["train", "--model", str(model), "--recipe", str(data), "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--lr", "0.05"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    weights = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and bool(v.abs().sum() > 0) for k, v in weights.items())
