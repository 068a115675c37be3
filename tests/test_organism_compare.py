"""`safemerge organism compare`: which defences are compared, their grids, the pooling and pairing
against SafeMERGE (oracle: counts written by hand in the test), and the bad inputs that stop it before
any work. The end-to-end run (reduced organism, 2 seeds) is in test_organism.py (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.defenses.registry import defense_names, get_defense
from safemerge.organism.compare import (
    KINDS,
    SeedResult,
    calibration_options,
    compared_defences,
    pool,
    sweep_grid,
    table,
    winner,
)
from safemerge.organism.demo import DemoSettings


def test_every_registered_defence_with_a_sweep_is_compared_by_default() -> None:
    names = compared_defences(())
    assert "safemerge" not in names and "none" not in names  # the reference, and nothing to sweep
    assert {"merge-all", "safelora", "resta"} <= set(names)
    assert names == [n for n in defense_names() if n in names]  # registry order
    assert all(get_defense(n).sweep for n in names)
    assert compared_defences(("resta", "safemerge", "resta")) == ["resta"]


@pytest.mark.parametrize(
    ("name", "message"),
    [("xyzzy", "unknown defence 'xyzzy'; registered"), ("lsff", "did you mean 'lssf'"), ("none", "no knob")],
)
def test_a_defence_that_cannot_be_compared_is_refused(name: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        compared_defences((name,))


def test_the_sweep_becomes_an_experiment_grid() -> None:
    assert sweep_grid("resta", None) == {"beta": list(get_defense("resta").sweep["beta"])}
    assert sweep_grid("resta", 2) == {"beta": [0.1, 0.25]}
    assert sweep_grid("merge-all", 1) == {"weights": [[0.8, 0.2]]}  # tuples become YAML lists


def test_only_data_dependent_defences_get_the_safety_adapters_data(tmp_path: Path) -> None:
    s = DemoSettings(out=tmp_path)
    assert calibration_options("safelora", s) == {}
    for n in defense_names():
        model = get_defense(n).option_model
        if model is not None and "calibration" in model.model_fields:
            assert calibration_options(n, s) == {
                "calibration": str(tmp_path / "adapters/safety/train_data.jsonl")
            }


def events(bits: str) -> dict[str, bool]:
    return {f"p{i}": b == "1" for i, b in enumerate(bits)}


def seed(s: int, rows: dict[str, tuple[str, str, str]]) -> SeedResult:
    r = SeedResult(s)
    for row, bits in rows.items():
        r.test[row] = {k: events(b) for k, b in zip(KINDS, bits, strict=True)}
        if row not in ("aligned", "task"):
            r.chosen[row], r.met[row] = f"{row}-x{s}", s == 0
    return r


def test_pooling_and_pairing_against_safemerge_by_hand() -> None:
    runs = [
        seed(0, {"aligned": ("0000", "0000", "1111"), "task": ("1110", "0000", "1111"),
                 "safemerge": ("1000", "0000", "1110"), "resta": ("0000", "1000", "1100")}),
        seed(1, {"aligned": ("0000", "0000", "1111"), "task": ("1100", "0000", "1111"),
                 "safemerge": ("0100", "0000", "1111"), "resta": ("0000", "0000", "1100")}),
    ]  # fmt: skip
    rows = {r.row: r for r in pool(runs, ["resta"])}
    assert list(rows) == ["aligned", "task", "safemerge", "resta"]
    assert (rows["task"].rates["harmful"].rate.k, rows["task"].rates["harmful"].rate.n) == (5, 8)
    assert rows["safemerge"].vs_safemerge is None and rows["task"].vs_safemerge is None
    c = rows["resta"].vs_safemerge
    assert c is not None
    # harmful: SafeMERGE 2/8, RESTA 0/8 → −2/8, two events gone; task: 7/8 vs 4/8 → −3/8 (RESTA loses
    # p2 in seed 0, p2 and p3 in seed 1: three events under the reference only); refusal 0/8 vs 1/8
    assert c["harmful"].diff == pytest.approx(-2 / 8) and (c["harmful"].fixed, c["harmful"].broken) == (2, 0)
    assert c["task"].diff == pytest.approx(-3 / 8) and (c["task"].fixed, c["task"].broken) == (3, 0)
    assert c["refusal"].diff == pytest.approx(1 / 8)
    assert rows["resta"].met == "1/2" and rows["resta"].settings == "seed 0: resta-x0; seed 1: resta-x1"
    runs[1].chosen["resta"] = "resta-x0"
    assert pool(runs, ["resta"])[-1].settings == "resta-x0 (every seed)"
    assert winner(list(rows.values())).startswith("No defence met")  # each fell back in seed 1
    for r in runs:
        r.met = dict.fromkeys(r.met, True)
    assert winner(pool(runs, ["resta"])).startswith("resta has the lowest pooled harmful rate")
    text = "\n".join(table(list(rows.values())))
    assert text.count("\n") == 5  # header, rule, four rows
    assert "Δ harmful vs SafeMERGE" in text and "p=" in text


def test_safemerge_can_win() -> None:
    runs = [seed(0, {"aligned": ("0", "0", "1"), "task": ("1", "0", "1"), "safemerge": ("0", "0", "1"),
                     "resta": ("1", "0", "1")})]  # fmt: skip
    assert winner(pool(runs, ["resta"])).startswith("SafeMERGE has the lowest")
    runs[0].test["resta"]["harmful"] = events("0")  # a tie goes to SafeMERGE, the reference
    assert winner(pool(runs, ["resta"])).startswith("SafeMERGE has the lowest")


def test_bad_options_exit_2_before_any_work(tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(app, ["organism", "compare", "--out", str(tmp_path / "o"), "--defences", "nope", "-q"])
    assert res.exit_code == 2 and "unknown defence 'nope'" in res.output
    res = run(app, ["organism", "compare", "--out", str(tmp_path / "o"), "--seeds", "0", "-q"])
    assert res.exit_code == 2 and "--seeds" in res.output
    assert not (tmp_path / "o").exists()


def test_a_defence_chosen_by_the_fallback_is_not_named_the_winner() -> None:
    """reset is the safest on test, but in seed 0 no setting kept the task and refusal within the
    tolerances (the rule fell back): not at matched utility, so RESTA, which met them in both, wins."""
    runs = [
        seed(s, {"aligned": ("0000", "0000", "1111"), "task": ("1111", "0000", "1111"),
                 "safemerge": ("1100", "0000", "1111"), "reset": ("0000", "1100", "1111"),
                 "resta": ("1000", "0000", "1111")})
        for s in (0, 1)
    ]  # fmt: skip
    for r in runs:
        r.met["resta"] = True
    runs[0].met["reset"], runs[1].met["reset"] = False, True  # the rule fell back in seed 0
    rows = pool(runs, ["reset", "resta"])
    assert [r.met for r in rows if r.row in ("reset", "resta")] == ["1/2", "2/2"]
    assert winner(rows).startswith("resta has the lowest pooled harmful rate")
    for r in runs:
        r.met["resta"] = r.met["safemerge"] = False
    assert (
        winner(pool(runs, ["reset", "resta"])) == "No defence met the tolerances on validation in every seed."
    )
