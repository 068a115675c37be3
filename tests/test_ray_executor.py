"""`safemerge experiment --executor ray` on a local Ray instance (2 CPUs, offline, tiny models).

Bugs caught: a Ray run whose results differ from the local run's (rows, order, rates, the validation
choice, flips), a cell recomputed or re-evaluated on a rerun, a worker death that loses a cell, a failing
cell that takes the other cells down or exits 0, an evaluation worker that reloads the model per cell,
execution flags that do not override the YAML, a missing Ray that is not an InputError.

Oracles: the local executor's files for the same config (byte for byte; the local path is the one the
rest of the suite checks against hand-made and recomputed values), the stamps' mtimes, the exit code.
One Ray instance serves the whole module (`ray.init(num_cpus=2)`, shut down at the end).
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import tiny_chat_setup
from test_experiment import choosing_config, config, write
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.experiment.cells import ExperimentResult
from safemerge.experiment.config import ExecutionSpec, parse_experiment
from safemerge.experiment.executor_ray import FAIL_HOOK, KILL_HOOK, RayExecutor
from safemerge.experiment.runner import run_experiment

ray = pytest.importorskip("ray")

RESULT_FILES = ("results.csv", "results.md", "results.json")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_chat_setup(tmp_path_factory.mktemp("ray-inputs"))


def ray_executor() -> RayExecutor:
    return RayExecutor(ExecutionSpec(executor="ray"))


def csv_rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def local_reference(cfg: dict[str, Any], path: Path, out: Path) -> tuple[Path, ExperimentResult]:
    """Run the config with the local executor in `out`, then move the output aside (so the Ray run writes
    the same paths from scratch); returns where the local output now is, and the local result."""
    result = run_experiment(write(cfg, path), progress=False)
    moved = out.with_name(out.name + "-local")
    out.rename(moved)
    return moved, result


@pytest.mark.slow
def test_ray_run_is_byte_identical_to_the_local_run(
    ray_cluster: None, inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = choosing_config(inputs, out)  # validation choice, derived controls, flips, a full-model row
    path = tmp_path / "exp.yaml"
    local, expected = local_reference(cfg, path, out)
    assert "execution" not in yaml.safe_load((local / "experiment.yaml").read_text())
    executor = ray_executor()
    result = run_experiment(path, progress=False, executor=executor)
    for f in RESULT_FILES:
        assert (out / f).read_bytes() == (local / f).read_bytes(), f
    assert result.failed == {} and [c.label for c in result.cells] == [c.label for c in expected.cells]
    for what in ("computed", "validated", "evaluated"):
        assert getattr(result, what) == getattr(expected, what), what
    # the choice comes between validation and test: no test evaluation was written before the last
    # validation evaluation
    val = [p.stat().st_mtime_ns for p in out.glob("evals/*/validation-*/eval.json")]
    test = [p.stat().st_mtime_ns for p in out.glob("evals/*/*/eval.json") if "/validation-" not in str(p)]
    assert len(val) == 4 and len(test) == 6 and max(val) <= min(test)
    # each evaluation worker loaded the aligned model once, whatever it evaluated (validation and test
    # rows alike); the one full model (the unaligned row, on test only) was loaded in a task of its own
    loads = executor.stats["loads_by_worker"]
    workers = [k for k in loads if k.startswith("eval worker")]
    assert 1 <= len(workers) <= 2 and all(loads[k] == 1 for k in workers), loads
    assert [k for k in loads if k not in workers] == [
        next(k for k in loads if k.startswith("unaligned (test)"))
    ]
    assert executor.stats["model_loads"] == len(workers) + 1
    # a rerun computes and evaluates nothing
    again = run_experiment(path, progress=False, executor=ray_executor())
    assert again.computed == again.validated == again.evaluated == []
    for f in RESULT_FILES:
        assert (out / f).read_bytes() == (local / f).read_bytes(), f


@pytest.fixture(scope="module")
def simple_local(inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The plain grid (none, safemerge × 2, RESTA; no choice) run locally once: (its config, its output)."""
    root = tmp_path_factory.mktemp("ray-simple")
    out = root / "out"
    return root / "exp.yaml", local_reference(config(inputs, out), root / "exp.yaml", out)[0]


def same_rows(out: Path, local: Path, drop: tuple[str, ...] = ()) -> None:
    """The Ray run's rows equal the local run's but `drop` (whose paths name the directory the local run
    wrote, OUT before it was moved to OUT-local)."""
    written = str(local.with_name("out")) + "/"
    theirs = [
        {k: v.replace(written, str(out) + "/") for k, v in r.items()}
        for r in csv_rows(local)
        if r["label"] not in drop
    ]
    assert csv_rows(out) == theirs


def stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/*/*.json")}


@pytest.mark.slow
def test_worker_death_is_retried_failures_are_reported_and_a_rerun_resumes(
    ray_cluster: None, simple_local: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, local = simple_local
    out = local.with_name("out")
    # the first attempt of one cell's computation and of another cell's evaluation kill their workers;
    # RESTA raises every time
    monkeypatch.setenv(KILL_HOOK, "safemerge (fraction=0.5);evaluate:safemerge (fraction=1)")
    monkeypatch.setenv(FAIL_HOOK, "resta")
    res = CliRunner().invoke(app, ["experiment", str(path), "--executor", "ray", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "resta" in res.output and "test hook" in res.output
    # one progress line per finished job, naming the worker; a summary at the end
    assert "computed safemerge (fraction=0.5) on " in res.output and " pid " in res.output
    assert "evaluated safemerge (fraction=1) on eval worker" in res.output
    assert "ray: computed 3, validated 0, evaluated 4, failed 1" in res.output
    markers = sorted(p.read_text().strip() for p in (out / ".test-hooks").iterdir())
    assert markers == ["evaluate:safemerge (fraction=1)", "safemerge (fraction=0.5)"]  # both really died
    same_rows(out, local, drop=("resta",))  # the retried cells' results are the local ones
    md = (out / "results.md").read_text()
    assert "## Failed cells" in md and "- resta: RuntimeError: test hook" in md
    assert not (out / "variants" / "resta" / "cell.json").exists()

    # resume: only RESTA is computed and evaluated; nothing else is touched
    monkeypatch.delenv(KILL_HOOK)
    monkeypatch.delenv(FAIL_HOOK)
    before = stamps(out)
    result = run_experiment(path, progress=False, executor=ray_executor())
    assert result.computed == ["resta"] and result.evaluated == ["resta"] and result.failed == {}
    after = stamps(out)
    assert {k: v for k, v in after.items() if "resta" not in k} == before
    same_rows(out, local)
    assert (out / "results.md").read_bytes() == (local / "results.md").read_bytes()


def test_execution_block_and_flags(inputs: dict[str, Path], tmp_path: Path) -> None:
    cfg = config(inputs, tmp_path / "out")
    cfg["execution"] = {
        "executor": "ray",
        "gpus_per_cell": 0.25,
        "stages": {"train": {"gpus": 1, "cpus": 4}, "evaluate": {"cpus": 2}},
    }
    spec = parse_experiment(write(cfg, tmp_path / "exp.yaml")).execution
    assert spec is not None
    assert spec.resources("train") == {"cpus": 4, "gpus": 1}
    assert spec.resources("defend") == {"cpus": 1, "gpus": 0.25}
    assert spec.resources("evaluate") == {"cpus": 2, "gpus": 0.25}
    # a flag overrides the block, per-stage values included; an unset flag overrides nothing
    flagged = spec.with_flags(gpus_per_cell=0.5, cpus_per_cell=None, executor=None)
    assert flagged.executor == "ray"
    assert flagged.resources("train") == {"cpus": 4, "gpus": 0.5}
    assert flagged.resources("evaluate") == {"cpus": 2, "gpus": 0.5}
    with pytest.raises(InputError, match="executor"):
        spec.with_flags(executor="slurm")
    cfg["execution"] = {"stages": {"judge": {"cpus": 1}}}
    with pytest.raises(InputError, match="judge"):
        parse_experiment(write(cfg, tmp_path / "bad.yaml"))
    res = CliRunner().invoke(app, ["experiment", str(tmp_path / "exp.yaml"), "--cpus-per-cell", "0"])
    assert res.exit_code == 2 and "cpus_per_cell" in res.output


def test_missing_ray_is_an_input_error(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    path = write(config(inputs, tmp_path / "out"), tmp_path / "exp.yaml")
    res = CliRunner().invoke(app, ["experiment", str(path), "--executor", "ray"])
    assert res.exit_code == 2 and "pip install 'safemerge[ray]'" in res.output
    assert not (tmp_path / "out").exists()  # it fails before any work


@pytest.mark.slow
def test_grouped_evaluation_matches_the_local_run(
    ray_cluster: None, simple_local: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path vLLM and Llama Guard take (each actor evaluates a share of the rows at once), here with
    the transformers backend and the keyword judge."""
    import safemerge.experiment.executor_ray as executor_ray

    path, local = simple_local
    out = local.with_name("out-grouped")
    monkeypatch.setattr(executor_ray, "grouped_evaluation", lambda cfg: True)
    result = run_experiment(path, out=out, progress=False, executor=ray_executor())
    assert result.failed == {} and len(result.evaluated) == 5
    same_rows(out, local)
    assert (out / "results.md").read_bytes() == (local / "results.md").read_bytes()


def test_work_that_fits_no_node_is_reported(
    ray_cluster: None, inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A GPU asked of a CPU-only cluster: every job is reported at once (no hang), with what it needs."""
    path = write(config(inputs, tmp_path / "out"), tmp_path / "exp.yaml")
    result = run_experiment(path, progress=False, executor=RayExecutor(ExecutionSpec(gpus_per_cell=1)))
    assert set(result.failed) == {
        "aligned",
        "none",
        "safemerge (fraction=0.5)",
        "safemerge (fraction=1)",
        "resta",
    }
    assert all("needs 1 CPU(s) and 1 GPU(s)" in e for e in result.failed.values())
    assert "## Failed cells" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.slow
def test_recipes_train_on_ray_and_rerun_nothing(
    ray_cluster: None, inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Training stages as tasks: the task and safety adapters, and a SafeInstr cell (which reads neither,
    so it trains meanwhile); the SafeMERGE cell waits for both and is keyed by their content."""
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
    result = run_experiment(path, progress=False, executor=ray_executor())
    assert result.failed == {} and result.trained == ["task", "safety"]
    assert result.computed == ["safemerge (fraction=0.5)", "safeinstr (mix_safety=8)"]
    assert [r["label"] for r in csv_rows(out)] == result.computed
    for role in ("task", "safety"):
        assert (out / "adapters" / role / "train.json").is_file()
    dry = run_experiment(path, dry_run=True)  # the local executor agrees that everything is done
    assert all(c.status == "cached" for c in dry.cells)
    again = run_experiment(path, progress=False, executor=ray_executor())
    assert again.trained == again.computed == again.evaluated == []
