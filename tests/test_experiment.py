"""`safemerge experiment`: a tiny comparison end to end, caching, bad configs, shipped configs."""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import save_adapter
from tinymodel import build_tiny_model
from typer.testing import CliRunner

import safemerge.evaluate
from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.experiment.runner import run_experiment

SHIPPED = sorted(
    p for p in resources.files("safemerge").joinpath("configs").iterdir() if p.name.endswith(".yaml")
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exp-inputs")
    un = build_tiny_model(root / "unaligned", seed=0)
    al = build_tiny_model(root / "aligned", seed=1)
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "safety": save_adapter(al, root / "safety", seed=2, r=4, alpha=8),
    }


def config(inputs: dict[str, Path], out: Path, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "tiny",
        "out": str(out),
        "setup": {
            "aligned": str(inputs["aligned"]),
            "unaligned": str(inputs["unaligned"]),
            "task_adapter": str(inputs["task"]),
            "safety_adapter": str(inputs["safety"]),
        },
        "defenses": [
            {"method": "none"},
            {"method": "safemerge", "grid": {"fraction": [0.5, 1.0]}},
            {"method": "resta", "options": {"beta": 0.5}},
        ],
        "evaluation": {
            "benchmarks": ["arithmetic", "harmbench"],
            "limit": 3,
            "max_new_tokens": 4,
            "batch_size": 4,
        },
        "reference": {"note": "made-up numbers for the test"},
    }
    cfg.update(changes)
    return cfg


def write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def test_experiment_end_to_end_cached_and_incremental(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    cfg = config(inputs, out)
    path = write(cfg, tmp_path / "exp.yaml")
    result = run_experiment(path, progress=False)
    labels = ["aligned", "none", "safemerge (fraction=0.5)", "safemerge (fraction=1)", "resta"]
    assert [c.label for c in result.cells] == labels
    assert result.computed == labels[1:] and result.evaluated == labels
    for f in ("results.csv", "results.md", "results.json", "pareto.png", "experiment.yaml"):
        assert (out / f).is_file(), f
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = rows(out)
    assert [r["label"] for r in table] == labels
    for r in table:  # every row has every metric
        for col in (
            "arithmetic_accuracy",
            "arithmetic_n",
            "harmbench_harmful_rate",
            "harmbench_n",
            "utility",
            "harm",
        ):
            assert r[col] != "", (r["label"], col)
        assert r["arithmetic_n"] == r["harmbench_n"] == "3"
    changed = {r["label"]: r["modules_changed"] for r in table}
    assert changed["none"] == "0" and changed["safemerge (fraction=0.5)"] == "2"
    assert (
        changed["safemerge (fraction=1)"] == "4" and int(changed["resta"]) == 14
    )  # 7 linear kinds × 2 layers
    assert any(r["pareto"] == "True" for r in table)
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == len(labels) + 1 and "fraction=0.5" in md and "not verified" in md
    # per-variant outputs: adapters for merges, a full model for RESTA, each with its report and key
    assert (out / "variants" / "none" / "adapter_model.safetensors").is_file()
    assert (out / "variants" / "resta" / "config.json").is_file()
    for c in result.cells[1:]:
        v = out / "variants" / c.slug
        assert json.loads((v / "cell.json").read_text())["key"] == c.key
        assert (v / "safemerge_report.json").is_file()
    for r in table:
        assert (Path(r["eval"]) / "generations.jsonl").read_text().count("\n") == 6

    # a rerun computes nothing and never loads a model
    def boom(*_: Any, **__: Any) -> None:
        raise AssertionError("evaluate() called on a cached rerun")

    monkeypatch.setattr(safemerge.evaluate, "evaluate", boom)
    again = run_experiment(path, progress=False)
    assert again.computed == [] and again.evaluated == [] and all(c.status == "cached" for c in again.cells)
    monkeypatch.undo()

    # adding a grid point computes and evaluates only that cell
    cfg["defenses"][1]["grid"]["fraction"].append(0.25)
    more = run_experiment(write(cfg, path), progress=False)
    assert more.computed == more.evaluated == ["safemerge (fraction=0.25)"]
    assert [r["label"] for r in rows(out)] == [*labels[:4], "safemerge (fraction=0.25)", "resta"]

    # changing an evaluation setting re-evaluates (from the generation cache) but recomputes no variant
    cfg["evaluation"]["limit"] = 2
    fewer = run_experiment(write(cfg, path), progress=False)
    assert fewer.computed == [] and len(fewer.evaluated) == 6
    assert all(r["harmbench_n"] == "2" for r in rows(out))
    # and switching back to the first evaluation (here via the --limit override) finds it cached
    back = run_experiment(path, progress=False, limit=3)
    assert back.computed == back.evaluated == []
    assert all(r["harmbench_n"] == "3" for r in rows(out))


def test_dry_run_lists_cells_and_does_nothing(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write(config(inputs, out), tmp_path / "exp.yaml")
    result = run_experiment(path, dry_run=True)
    assert len(result.cells) == 5 and all(c.key for c in result.cells)
    assert [c.status for c in result.cells] == ["to evaluate"] + ["to run"] * 4
    assert not out.exists()
    res = CliRunner().invoke(app, ["experiment", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "safemerge" in res.output and "resta" in res.output


BAD: list[tuple[str, Any, str]] = [
    ("unknown defence", {"defenses": [{"method": "bogus"}]}, "defenses.0.method"),
    ("unknown option", {"defenses": [{"method": "safelora", "options": {"beta": 0.1}}]}, "beta do not apply"),
    ("unknown grid key", {"defenses": [{"method": "safemerge", "grid": {"tau": [0.3]}}]}, "tau"),
    ("unknown top-level key", {"defences": []}, "defences"),
    ("empty grid", {"defenses": [{"method": "safemerge", "grid": {"threshold": []}}]}, "no cells"),
    (
        "conflicting cell",
        {"defenses": [{"method": "safemerge", "grid": {"threshold": [0.3], "top_k": [2]}}]},
        "only one",
    ),
    ("duplicate cells", {"defenses": [{"method": "none"}, {"method": "none"}]}, "same settings"),
    ("unknown benchmark", {"evaluation": {"benchmarks": ["nope"]}}, "unknown benchmark"),
    (
        "safeinstr without recipe",
        {"defenses": [{"method": "safeinstr", "grid": {"mix_safety": [5]}}]},
        "task_train",
    ),
]


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_configs_fail_before_any_work(
    what: str, change: dict[str, Any], message: str, inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = config(inputs, out)
    cfg.update(change)
    with pytest.raises(InputError, match=message):
        run_experiment(write(cfg, tmp_path / "bad.yaml"))
    assert not out.exists()


def test_missing_inputs_fail_before_any_work(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = config(inputs, out)
    cfg["setup"]["task_adapter"] = str(tmp_path / "no-such-adapter")
    with pytest.raises(InputError, match="task_adapter"):
        run_experiment(write(cfg, tmp_path / "bad.yaml"))
    del cfg["setup"]["safety_adapter"], cfg["out"]
    cfg["setup"]["task_adapter"] = str(inputs["task"])
    with pytest.raises(InputError, match="output directory"):
        run_experiment(write(cfg, tmp_path / "bad.yaml"))
    with pytest.raises(InputError, match="needs a safety adapter"):
        run_experiment(tmp_path / "bad.yaml", out=out)
    res = CliRunner().invoke(app, ["experiment", str(tmp_path / "bad.yaml"), "--out", str(out)])
    assert res.exit_code == 2 and "safety adapter" in res.output
    assert not out.exists()


def test_shipped_paper_configs_validate_in_a_dry_run(tmp_path: Path) -> None:
    assert len(SHIPPED) == 6
    for cfg_path in SHIPPED:
        data = yaml.safe_load(cfg_path.read_text())
        assert "reference" in data and "expected_runtime" in data
        assert data["evaluation"]["judge"] == "llama-guard" and data["evaluation"]["backend"] == "vllm"
        assert {"directharm4", "hexphi"} <= set(data["evaluation"]["benchmarks"])
        result = run_experiment(Path(str(cfg_path)), out=tmp_path / cfg_path.name, dry_run=True)
        methods = {c.method for c in result.cells}
        assert methods == {"aligned", "none", "safemerge", "merge-all", "safelora", "resta", "safeinstr"}
        assert not (tmp_path / cfg_path.name).exists()


def test_recipes_train_the_inputs_and_safeinstr(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    train = {"samples": 16, "max_steps": 2, "batch_size": 8, "max_length": 64, "lora_r": 4}
    cfg = config(
        inputs,
        out,
        setup={
            "aligned": str(inputs["aligned"]),
            "unaligned": str(inputs["unaligned"]),
            "task_train": {"recipe": "arithmetic", **train},
            "safety_train": {"recipe": "safety", **train},
        },
        defenses=[
            {"method": "safemerge", "grid": {"fraction": [0.5]}},
            {"method": "safeinstr", "grid": {"mix_safety": [8]}},
        ],
    )
    cfg["evaluation"]["include_aligned"] = False
    path = write(cfg, tmp_path / "exp.yaml")
    dry = run_experiment(path, dry_run=True)
    assert [c.status for c in dry.cells] == ["to run", "to run"]
    result = run_experiment(path, progress=False)
    assert result.trained == ["task", "safety"]
    assert result.computed == ["safemerge (fraction=0.5)", "safeinstr (mix_safety=8)"]
    for role in ("task", "safety"):
        assert (out / "adapters" / role / "adapter_model.safetensors").is_file()
    si = out / "variants" / "safeinstr_mix_safety-8"
    assert (si / "adapter_model.safetensors").is_file() and (si / "train_config.yaml").is_file()
    assert "mix_safety: 8" in (si / "train_config.yaml").read_text()
    assert [r["label"] for r in rows(out)] == result.computed
    again = run_experiment(path, progress=False)
    assert again.trained == again.computed == again.evaluated == []
