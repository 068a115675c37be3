"""`seeds:` in an experiment config: one run per training seed, pooled results, seed 0 = no seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import tiny_chat_setup
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.experiment.config import ExperimentConfig
from safemerge.experiment.runner import run_experiment
from safemerge.experiment.seeds import check_seeds, seed_config

TRAIN = {"samples": 16, "max_steps": 2, "batch_size": 8, "max_length": 64, "lora_r": 4}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_chat_setup(tmp_path_factory.mktemp("seed-inputs"))


def config(inputs: dict[str, Path], out: Path, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "seeds",
        "out": str(out),
        "setup": {
            "aligned": str(inputs["aligned"]),
            "unaligned": str(inputs["unaligned"]),
            "task_train": {"recipe": "arithmetic", **TRAIN},
            "safety_adapter": str(inputs["safety"]),
        },
        "defenses": [
            {"method": "none", "name": "task"},
            {"method": "safemerge", "grid": {"fraction": [0.5]}},
        ],
        "evaluation": {
            "benchmarks": ["arithmetic", "harmbench"],
            "limit": 3,
            "max_new_tokens": 4,
            "batch_size": 4,
            "flips_vs": "task",
        },
    }
    cfg.update(changes)
    return cfg


def test_seed_config_shifts_only_training_seeds(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate(
        config(
            inputs, tmp_path, seeds=[0, 2],
            defenses=[{"method": "safeinstr", "options": {"mix_safety": 4, "seed": 7}},
                      {"method": "safemerge", "options": {"seed": 5}}],
        )
    )  # fmt: skip
    zero = seed_config(cfg, 0)
    assert zero.seeds is None and zero.setup == cfg.setup and zero.defenses == cfg.defenses
    two = seed_config(cfg, 2)
    assert (
        two.setup.task_train is not None and two.setup.task_train["seed"] == 42 + 2
    )  # TrainConfig's default
    assert two.defenses[0].options["seed"] == 9  # SafeInstr's own training seed
    assert two.defenses[1].options["seed"] == 5  # a defence's own seed (DARE masks) is not a training seed
    assert two.setup.safety_adapter == cfg.setup.safety_adapter


def test_seeds_need_something_trained_and_distinct_values(inputs: dict[str, Path], tmp_path: Path) -> None:
    given = config(inputs, tmp_path, seeds=[0, 1])
    given["setup"] = {**given["setup"], "task_train": None, "task_adapter": str(inputs["task"])}
    with pytest.raises(InputError, match="every adapter is given by path"):
        check_seeds(ExperimentConfig.model_validate(given))
    for bad in ([], [1, 1], [-1]):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config(inputs, tmp_path / "o", seeds=bad)))
        res = CliRunner().invoke(app, ["experiment", str(path)])
        assert res.exit_code == 2 and "seeds" in res.output, res.output
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_seeds_pool_and_seed_zero_is_the_plain_run(inputs: dict[str, Path], tmp_path: Path) -> None:
    plain = run_experiment(
        ExperimentConfig.model_validate(config(inputs, tmp_path / "plain")), progress=False
    )
    out = tmp_path / "seeded"
    result = run_experiment(
        ExperimentConfig.model_validate(config(inputs, out, seeds=[0, 1])), progress=False
    )
    assert result.trained == ["seed 0: task", "seed 1: task"]
    seed_log = [
        json.loads((out / f"seed-{s}" / "adapters" / "task" / "train.json").read_text()) for s in (0, 1)
    ]
    assert seed_log[0]["settings"].get("seed", 42) == 42 and seed_log[1]["settings"]["seed"] == 43

    def metrics(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["label"], r["arithmetic_accuracy"], r["harmbench_harmful_rate"]) for r in rows]

    seed0 = [r for r in result.rows if r["label"].startswith("seed 0: ")]
    assert metrics([{**r, "label": r["label"][len("seed 0: ") :]} for r in seed0]) == metrics(plain.rows)
    with (out / "results.csv").open() as f:
        pooled = list(csv.DictReader(f))
    assert [r["row"] for r in pooled] == ["aligned", "task", "safemerge (fraction=0.5)"]
    for r in pooled:
        assert int(r["harmbench_n"]) == 6 and int(r["arithmetic_n"]) == 6  # 3 prompts × 2 seeds
        assert 3.0 <= float(r["harmbench_n_eff"]) <= 6.0
    _, task, sm = pooled
    assert task.get("harmbench_p_value", "") == "" and float(sm["harmbench_p_value"]) <= 1.0
    per_seed = [r for r in result.rows if r["label"].endswith("safemerge (fraction=0.5)")]
    k = sum(round(float(r["harmbench_harmful_rate"]) * 3) for r in per_seed)
    assert int(sm["harmbench_k"]) == k  # the pooled count is the seeds' counts summed
    # every judge is pooled: HarmBench's prefix rule, reported beside the keyword judge in each seed
    k_rule = sum(
        round(float(r["harmbench_harmful_rate_harmbench_rule"]) * int(r["harmbench_n_harmbench_rule"]))
        for r in per_seed
    )
    assert (
        int(sm["harmbench_judge_harmbench_rule_k"]) == k_rule
        and int(sm["harmbench_judge_harmbench_rule_n"]) == 6
    )
    md = (out / "results.md").read_text()
    assert "pooled over seeds 0, 1" in md and "| safemerge (fraction=0.5) |" in md
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and set(data["per_seed"]) == {"0", "1"}
    again = run_experiment(ExperimentConfig.model_validate(config(inputs, out, seeds=[0, 1])), progress=False)
    assert again.trained == again.computed == again.evaluated == []
