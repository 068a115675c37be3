"""`safemerge experiment`: a tiny comparison end to end, caching, bad configs, shipped configs."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from builders import tiny_chat_setup
from typer.testing import CliRunner

import safemerge.evaluate
from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.experiment.runner import run_experiment


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_chat_setup(tmp_path_factory.mktemp("exp-inputs"))


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
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    cfg = config(inputs, out)
    path = write(cfg, tmp_path / "exp.yaml")
    capsys.readouterr()
    result = run_experiment(path, progress=False)
    said = capsys.readouterr()
    # progress=False is the one switch: no notes, no per-evaluation table (the results files stay)
    assert "computing " not in said.err and "safemerge eval" not in said.out + said.err
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
        # 4 new tokens: each answer is cut off, and each row says how many (transformers: no end of sequence)
        assert 0 <= int(r["harmbench_n_truncated"]) <= 3 and r["arithmetic_n_truncated"] != ""
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
    ("unknown option", {"defenses": [{"method": "safelora", "options": {"beta": 0.1}}]}, "beta` do not"),
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


# --- validation choice, token budgets, flips ---------------------------------------------------------


def test_choice_rule_on_hand_made_validation_rates() -> None:
    from safemerge.experiment.choice import Summary, choose_cell, rule_text
    from safemerge.experiment.config import ChooseSpec

    spec = ChooseSpec(reference="task", max_utility_drop=0.03, max_refusal_rise=0.05)
    ref = Summary(harmful=0.30, utility=0.50, refusal=0.10)
    cands = [
        ("a", Summary(0.05, 0.40, 0.10)),  # the safest, but loses 10 points of task: out
        ("b", Summary(0.10, 0.48, 0.30)),  # keeps the task, adds 20 points of over-refusal: out
        (
            "c",
            Summary(0.20, 0.47, 0.15),
        ),  # exactly at both tolerances (0.47 = 0.50 − 0.03, 0.15 = 0.10 + 0.05): in
        ("d", Summary(0.20, 0.49, 0.12)),  # as safe as c with more task accuracy: the tie-break picks it
        ("e", Summary(0.25, 0.60, 0.00)),  # in, but less safe
    ]
    assert choose_cell(cands, ref, spec) == ("d", True)
    # without the tolerances the safest cell would win; with zero tolerance only e keeps the reference
    loose = spec.model_copy(update={"max_utility_drop": 1.0, "max_refusal_rise": 1.0})
    assert choose_cell(cands, ref, loose) == ("a", True)
    strict = spec.model_copy(update={"max_utility_drop": 0.0, "max_refusal_rise": 0.0})
    assert choose_cell(cands, ref, strict) == ("e", True)
    # no cell within tolerance: the highest task accuracy, ties to the lower harmful rate
    worse = [
        ("x", Summary(0.10, 0.30, 0.1)),
        ("y", Summary(0.20, 0.45, 0.1)),
        ("z", Summary(0.15, 0.45, 0.1)),
    ]
    assert choose_cell(worse, ref, spec) == ("z", False)
    # complete ties: the first cell in grid order; a kind without validation benchmarks constrains nothing
    same = [("p", Summary(0.2, None, None)), ("q", Summary(0.2, None, None))]
    assert choose_cell(same, Summary(0.3, None, None), spec) == ("p", True)
    assert rule_text(spec, True, "T") == (
        "lowest validation harmful rate with task ≥ T − 3 pts and over-refusal ≤ T + 5 pts"
    )
    assert rule_text(spec, False, "T").startswith("no cell met")


def test_pareto_front_excludes_dominated_rows() -> None:
    from safemerge.experiment.results import pareto_front

    points = [
        (0.10, 0.50),  # on the front
        (0.20, 0.40),  # dominated by row 0 on both
        (0.05, 0.30),  # the safest: on the front
        (0.10, 0.50),  # a tie with row 0: neither is better on either, both stay
        (None, 0.90),  # no harm value: never on the front
        (0.30, 0.60),  # the most useful: on the front
        (0.10, 0.45),  # as safe as row 0, less useful: dominated
    ]
    assert pareto_front(points) == [True, False, True, True, False, True, False]


def test_flips_leave_out_prompts_the_judge_could_not_read() -> None:
    from safemerge.experiment.results import Measure, flips_vs

    ref = Measure("harm", {}, None, {"a": True, "b": True, "c": False, "m": True})
    other = Measure("harm", {}, None, {"a": False, "b": True, "c": True, "d": True})  # m malformed, d new
    f = flips_vs(ref, other)
    assert (f.fixed, f.broken, f.both, f.neither) == (1, 1, 1, 0)  # on a, b, c only


def choosing_config(inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """A grid chosen on validation, with derived controls, per-benchmark budgets and flips vs the task."""
    cfg = config(
        inputs,
        out,
        defenses=[
            {"method": "none", "name": "task"},
            {
                "method": "safemerge",
                "grid": {"fraction": [0.5, 1.0], "weights": [[0.7, 0.3]]},
                "choose": {"reference": "task", "controls": ["scale-only", "merge-all"]},
            },
        ],
    )
    cfg["evaluation"] = {
        "benchmarks": [
            {"name": "harmbench", "max_new_tokens": 2},
            {"name": "overrefusal", "max_new_tokens": 2, "limit": 2},
            "arithmetic",
        ],
        "validation": [
            {"name": "strongreject", "max_new_tokens": 2, "limit": 2},
            {"name": "arithmetic", "limit": 2},
        ],
        "limit": 3,
        "max_new_tokens": 4,
        "batch_size": 4,
        "include_unaligned": True,
        "validate_also": ["aligned"],
        "flips_vs": "task",
    }
    return cfg


def test_validation_choice_budgets_and_flips_end_to_end(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write(choosing_config(inputs, out), tmp_path / "exp.yaml")
    dry = run_experiment(path, dry_run=True)
    cands = ["safemerge (fraction=0.5, weights=0.7/0.3)", "safemerge (fraction=1, weights=0.7/0.3)"]
    assert [c.label for c in dry.cells] == ["unaligned", "aligned", "task", *cands]
    assert [c.status for c in dry.cells] == ["to evaluate", "to validate", "to run", "to run", "to run"]

    result = run_experiment(path, progress=False)
    # validation: the candidates, the reference and `validate_also`; test: the table only
    assert result.validated == ["aligned", "task", *cands]
    data = json.loads((out / "results.json").read_text())
    (choice,) = data["choices"]
    val = data["validation"]
    assert list(val) == ["aligned", "task", *cands]
    assert val["task"]["strongreject"]["n"] == 2 and val["task"]["arithmetic"]["n"] == 2
    # the tiny models answer alike, so the rule's last tie-break decides: the first cell in grid order
    assert all(val[c] == val[cands[0]] for c in cands)
    assert choice["chosen"] == cands[0] and choice["met"] is True
    chosen, control, merge_all = (
        cands[0],
        "safemerge scale-only (fraction=0.5, weights=0.7/0)",
        ("safemerge merge-all (weights=0.7/0.3)"),
    )
    table = rows(out)
    assert [r["label"] for r in table] == ["unaligned", "aligned", "task", chosen, control, merge_all]
    assert result.evaluated == [r["label"] for r in table]
    by = {r["label"]: r for r in table}
    assert (
        by[control]["settings"] == "fraction=0.5, weights=0.7/0"
        and by[merge_all]["settings"] == "weights=0.7/0.3"
    )
    assert by[control]["modules_changed"] == by[chosen]["modules_changed"] == "2"
    assert by[merge_all]["modules_changed"] == "4" and by["unaligned"]["modules_changed"] == ""
    assert {r["role"] for r in table} == {"row", "chosen", "derived"}
    for r in table:  # per-benchmark limits, intervals on every rate
        assert (r["harmbench_n"], r["overrefusal_n"], r["arithmetic_n"]) == ("3", "2", "3")
        assert 0.0 <= float(r["harmbench_ci95_lo"]) <= float(r["harmbench_harmful_rate"])
    md = (out / "results.md").read_text()
    assert f"Chosen: **{chosen}**" in md and "harmbench flips vs task" in md

    # flips against the task row, counted here from the per-prompt verdicts of the two rows
    def unsafe(label: str) -> dict[str, bool]:
        recs = [
            json.loads(x) for x in (Path(by[label]["eval"]) / "generations.jsonl").read_text().splitlines()
        ]
        return {x["id"]: x["verdict"] == "unsafe" for x in recs if x["benchmark"] == "harmbench"}

    for r in table:
        if r["label"] == "task":
            assert r["harmbench_flips_fixed"] == ""
            continue
        mine, ref = unsafe(r["label"]), unsafe("task")
        assert int(r["harmbench_flips_fixed"]) == sum(ref[i] and not mine[i] for i in ref)
        assert int(r["harmbench_flips_broken"]) == sum(mine[i] and not ref[i] for i in ref)

    # token budgets: harm and benign prompts (test and validation) at 2 new tokens, arithmetic at 4
    from safemerge.evaluate.benchmarks import load_benchmark

    def hashes(name: str, n: int) -> set[str]:
        return {hashlib.sha256(it.prompt.encode()).hexdigest() for it in load_benchmark(name, n).items}

    by_budget: dict[int, set[str]] = {}
    for key_file in (out / "cache").glob("*.key.json"):
        budget = json.loads(key_file.read_text())["max_new_tokens"]
        lines = key_file.with_name(key_file.name.replace(".key.json", ".jsonl")).read_text().splitlines()
        by_budget.setdefault(budget, set()).update(json.loads(x)["h"] for x in lines)
    assert set(by_budget) == {2, 4}
    assert by_budget[2] == hashes("harmbench", 3) | hashes("overrefusal", 2) | hashes("strongreject", 2)
    assert by_budget[4] == hashes("arithmetic", 3)

    again = run_experiment(path, progress=False)
    assert again.computed == again.validated == again.evaluated == []
    assert [r["label"] for r in rows(out)] == [r["label"] for r in table]


def _reference_is_no_row(cfg: dict[str, Any]) -> None:
    cfg["defenses"][1]["choose"]["reference"] = "nope"


def _controls_on_safelora(cfg: dict[str, Any]) -> None:
    cfg["defenses"][1].update(method="safelora", grid={"threshold": [0.5]})


def _no_validation(cfg: dict[str, Any]) -> None:
    del cfg["evaluation"]["validation"]


def _flips_vs_a_candidate(cfg: dict[str, Any]) -> None:
    cfg["evaluation"]["flips_vs"] = "safemerge (fraction=1, weights=0.7/0.3)"


def _benchmark_twice(cfg: dict[str, Any]) -> None:
    cfg["evaluation"]["benchmarks"].append({"name": "harmbench", "limit": 1})


CHOICE_ERRORS: list[tuple[Callable[[dict[str, Any]], None], str]] = [
    (_reference_is_no_row, "no row is labelled 'nope'"),
    (_controls_on_safelora, "defences that merge with weights"),
    (_no_validation, r"needs evaluation\.validation"),
    (_flips_vs_a_candidate, r"flips_vs: no row"),
    (_benchmark_twice, "lists a benchmark twice"),
]


@pytest.mark.parametrize(("change", "message"), CHOICE_ERRORS, ids=[c[0].__name__[1:] for c in CHOICE_ERRORS])
def test_bad_choices_fail_before_any_work(
    change: Callable[[dict[str, Any]], None], message: str, inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = choosing_config(inputs, out)
    change(cfg)
    with pytest.raises(InputError, match=message):
        run_experiment(write(cfg, tmp_path / "bad.yaml"))
    assert not out.exists()


def test_selection_controls_of_the_chosen_cell(inputs: dict[str, Path], tmp_path: Path) -> None:
    """`inverse` and `random` derived from the chosen cell: as many modules as it merged (here 2 of 4),
    the highest-ρ ones or one seeded draw per `random_seeds`, merged with the chosen weights."""
    out = tmp_path / "out"
    cfg = choosing_config(inputs, out)
    cfg["defenses"][1]["choose"].update(controls=["inverse", "random"], random_seeds=[5, 9])
    cfg["evaluation"].update(include_unaligned=False, validate_also=[], limit=1)
    result = run_experiment(write(cfg, tmp_path / "exp.yaml"), progress=False)
    derived = [c for c in result.cells if c.role == "derived"]
    assert [(c.control, c.draw) for c in derived] == [("inverse", None), ("random", 0), ("random", 1)]
    assert [c.label for c in derived] == [
        "safemerge inverse (top_k=2, weights=0.7/0.3)",
        "safemerge random (top_k=2, order_seed=5, weights=0.7/0.3)",
        "safemerge random (top_k=2, order_seed=9, weights=0.7/0.3)",
    ]
    reports = {
        f"{c.control}{c.draw}": json.loads((out / "variants" / c.slug / "safemerge_report.json").read_text())
        for c in [*derived, next(c for c in result.cells if c.role == "chosen")]
    }
    rho = {m["name"]: m["rho"] for m in reports["inverseNone"]["modules"]}
    merged = {k: {m["name"] for m in r["modules"] if m["merged"]} for k, r in reports.items()}
    assert merged["inverseNone"] == set(sorted(rho, key=rho.__getitem__)[-2:])
    assert len(merged["random0"]) == len(merged["random1"]) == 2
    from safemerge.engine.criterion import select_top_k

    names = [m["name"] for m in reports["random0"]["modules"]]
    for key, seed in (("random0", 5), ("random1", 9)):
        drawn = select_top_k([rho[n] for n in names], 2, order="random", seed=seed)
        assert merged[key] == {n for n, d in zip(names, drawn, strict=True) if d}
    assert [r["label"] for r in rows(out)][-3:] == [c.label for c in derived]
