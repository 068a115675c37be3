"""`safemerge eval`: named variants (`--adapter NAME=PATH`), the comparison with `--reference` (difference
with a 95% interval, paired flips, McNemar p) and utility JSONL files (`prompt`, `reference`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from builders import tiny_chat_setup
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.evaluate import EvalConfig
from safemerge.evaluate.benchmarks import benchmark_kind, load_benchmark
from safemerge.evaluate.compare import add_reference_comparison, compare
from safemerge.evaluate.report import comparison_cell


def test_comparison_hand_values() -> None:
    """10 prompts: 3 fixed, 1 broken, 2 both, 4 neither → diff −0.2, paired interval ±1.96·√3.6/10,
    McNemar p = 2·(1 + 4)/2⁴; a prompt only one side has is left out."""
    ref = {f"p{i}": i < 5 for i in range(10)}  # events on p0..p4
    var = {f"p{i}": i in (3, 4, 5) for i in range(10)} | {"extra": True}  # fixed p0-p2, broken p5
    c = compare(ref, var)
    half = 1.959963984540054 * math.sqrt(3 * 0.8**2 + 1.2**2 + 6 * 0.2**2) / 10
    assert c["n"] == 10 and (c["fixed"], c["broken"]) == (3, 1)
    assert c["reference_rate"] == pytest.approx(0.5) and c["rate"] == pytest.approx(0.3)
    assert c["diff"] == pytest.approx(-0.2)
    assert c["diff_ci95"] == pytest.approx([-0.2 - half, -0.2 + half])
    assert c["p_value"] == pytest.approx(2 * 5 / 16)
    assert comparison_cell(c) == "-20.0 pts [-57.2, +17.2]; -3/+1, p=0.62"
    assert compare({}, {})["diff"] is None


@pytest.mark.parametrize(
    ("adapters", "match"),
    [
        (["a=x", "a=y"], "two variants are named a"),
        (["m=x"], "two variants are named m"),  # the base model's key
        (["x", "x"], "two variants are named x"),
    ],
)
def test_variant_names_must_be_unique(adapters: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(model="m", adapters=adapters, benchmarks=["harmbench"], out=Path("o"))


def test_adapter_names_and_reference(tmp_path: Path) -> None:
    odd = tmp_path / "lr=1e-4"  # an existing path with `=` stays a path
    odd.mkdir()
    cfg = EvalConfig(
        model="m", adapters=["task=runs/a", "runs/b", str(odd)], benchmarks=["x.jsonl"], out=Path("o"),
        reference="task",
    )  # fmt: skip
    assert cfg.adapters == ["runs/a", "runs/b", str(odd)]
    assert cfg.adapter_names == ["task", None, None]
    mapping = EvalConfig(model="m", adapters={"t": "a", "s": "b"}, benchmarks=["x.jsonl"], out=Path("o"))
    assert (mapping.adapters, mapping.adapter_names) == (["a", "b"], ["t", "s"])
    with pytest.raises(ValueError, match="--reference 'nope' is none of the evaluated variants: m, task"):
        EvalConfig(model="m", adapters=["task=a"], benchmarks=["x.jsonl"], out=Path("o"), reference="nope")


def test_utility_jsonl_numbers_and_labels(tmp_path: Path) -> None:
    f = tmp_path / "task.jsonl"
    rows = [
        {"prompt": "2+2?", "reference": 4},
        {"prompt": "Total?", "reference": "1,234"},
        {"prompt": "Is it?", "reference": "yes"},
        {"prompt": "Is it not?", "reference": "no"},
        {"prompt": "Unsure?", "reference": "not sure"},
        {"prompt": "Sure?", "reference": "sure"},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert benchmark_kind(str(f)) == "utility"
    b = load_benchmark(str(f))
    assert b.kind == "utility" and [i.reference for i in b.items] == [
        "4",
        "1234",
        "yes",
        "no",
        "not sure",
        "sure",
    ]
    it = b.items
    assert b.score(it[0], "2 and 2 make 4.")["correct"]
    assert not b.score(it[0], "4? no, 5")["correct"]  # the last number counts
    assert b.score(it[1], "It is 1234.0")["correct"]
    assert b.score(it[2], "No... on reflection, yes.")["correct"]
    assert b.score(it[2], "My eyes hurt.")["extracted"] is None  # "yes" is not a word of "eyes"
    assert b.score(it[3], "Yes? No.")["extracted"] == "no"
    assert b.score(it[4], "I am not sure")["extracted"] == "not sure"  # the longer label wins the tie
    assert b.score(it[2], "hmm")["extracted"] is None
    harm = tmp_path / "harm.jsonl"
    harm.write_text(json.dumps({"prompt": "bad"}) + "\n")
    assert benchmark_kind(str(harm)) == "harm" and load_benchmark(str(harm)).kind == "harm"


def test_utility_jsonl_needs_a_reference_in_every_row(tmp_path: Path) -> None:
    f = tmp_path / "task.jsonl"
    f.write_text(json.dumps({"prompt": "a", "reference": 1}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(InputError, match=r"task\.jsonl, row 1: a utility file needs a non-empty `reference`"):
        load_benchmark(str(f))


def test_eval_cli_named_variants_and_reference(tmp_path: Path) -> None:
    """Named variants key the outputs; the comparison recounted from generations.jsonl matches."""
    env = tiny_chat_setup(tmp_path / "m")
    util = tmp_path / "util.jsonl"
    util.write_text(
        "".join(json.dumps({"prompt": f"What is {i}+1?", "reference": i + 1}) + "\n" for i in range(4))
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            "eval", "--model", str(env["aligned"]), "--adapter", f"task={env['task']}",
            "--adapter", f"safety={env['safety']}", "--reference", "task", "--benchmarks",
            f"strongreject,{util}", "--limit", "6", "--max-new-tokens", "4", "--out", str(out), "--no-cache",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [str(env["aligned"]), "task", "safety"]
    assert metrics["safety"]["adapter"] == str(env["safety"])
    assert metrics["task"]["benchmarks"][str(util)]["kind"] == "utility"
    assert "vs_reference" not in metrics["task"]
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for variant in (str(env["aligned"]), "safety"):
        for bench, event in (("strongreject", "unsafe"), (str(util), "correct")):
            ev = {
                v: {
                    r["id"]: r["verdict"] == event
                    for r in records
                    if r["variant"] == v and r["benchmark"] == bench
                }
                for v in ("task", variant)
            }
            fixed = sum(ev["task"][i] and not ev[variant][i] for i in ev["task"])
            broken = sum(ev[variant][i] and not ev["task"][i] for i in ev["task"])
            k, n = min(fixed, broken), fixed + broken
            p = min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n) if n else 1.0
            c = metrics[variant]["vs_reference"]["benchmarks"][bench]
            assert metrics[variant]["vs_reference"]["reference"] == "task"
            assert (c["fixed"], c["broken"], c["n"]) == (fixed, broken, len(ev["task"]))
            assert c["diff"] == pytest.approx((broken - fixed) / len(ev["task"]))
            assert c["p_value"] == pytest.approx(p)
    summary = (out / "summary.md").read_text()
    assert "## Against the reference: task" in summary and "| safety |" in summary
    saved = (out / "eval_config.yaml").read_text()
    assert "adapter_names" in saved and "reference: task" in saved


def test_eval_cli_unknown_reference_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["eval", "--model", "m", "--adapter", "a=x", "--reference", "b", "--benchmarks", "harmbench",
         "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert res.exit_code == 2 and "--reference 'b' is none of the evaluated variants" in res.output
    assert not (tmp_path / "o").exists()


def test_reference_comparison_from_records() -> None:
    """Per variant and benchmark, from the records: the headline event of each kind, malformed judge
    outputs left out (as the rate leaves them out), the reference itself not compared."""
    verdicts = {
        ("base", "hb"): ["unsafe", "unsafe", "safe", "malformed"],
        ("ref", "hb"): ["safe", "safe", "safe", "unsafe"],
        ("base", "u"): ["correct", "incorrect", "correct", "correct"],
        ("ref", "u"): ["correct", "correct", "incorrect", "incorrect"],
    }
    kinds = {"hb": "harm", "u": "utility"}
    records = [
        {"variant": v, "benchmark": b, "kind": kinds[b], "id": f"{b}-{i}", "verdict": x}
        for (v, b), xs in verdicts.items()
        for i, x in enumerate(xs)
    ]
    metrics = {
        v: {"adapter": None, "benchmarks": {b: {"kind": k} for b, k in kinds.items()}}
        for v in ("base", "ref")
    }
    add_reference_comparison("ref", records, metrics)
    assert "vs_reference" not in metrics["ref"]
    hb = metrics["base"]["vs_reference"]["benchmarks"]["hb"]
    assert (hb["n"], hb["fixed"], hb["broken"], hb["diff"]) == (3, 0, 2, pytest.approx(2 / 3))
    u = metrics["base"]["vs_reference"]["benchmarks"]["u"]
    assert (u["n"], u["fixed"], u["broken"], u["diff"]) == (4, 1, 2, pytest.approx(1 / 4))
    assert u["p_value"] == pytest.approx(1.0)
    assert add_reference_comparison(None, records, {"x": {}}) == {"x": {}}
