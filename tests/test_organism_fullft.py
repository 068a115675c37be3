"""The organism's full fine-tune (`organism build --full-ft`) and its table (`organism fullft`) on a reduced
recipe: the stage is keyed, cached and built only when asked for; the table runs end to end. Shows nothing
about safety (a few training steps, 4 prompts per set)."""

import hashlib
import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open
from test_organism import needs_packaged
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.organism.recipe import FullTaskRecipe, LoraRecipe, OrganismRecipe, reduced_recipe

# The stage keys of recipe version 5's default and reduced recipes without a CPU thread count (a GPU
# build; a CPU build adds its threads, tested below). They name the cached stages, so they must move only
# deliberately (a recipe change, or RECIPE_VERSION bumped when the build code changes); T_full, built
# only when asked for, must not move any of them.
KEYS_BEFORE = {
    "default": ("d3446f12a9c8", "0813356ba335", "d8ed53487505", "e0ed42bb0d90", "8f6ddb780fd9"),
    "reduced": ("d3446f12a9c8", "e625dc21e30d", "fd72690091f3", "a8befe2ad93a", "d6eee0f488a2"),
}
TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _keys(r: OrganismRecipe) -> tuple[str, ...]:
    r = r.resolved("bfloat16")  # recipe 5 was built in bfloat16: "auto" resolved so keys as before
    ku = r.stage_key("unaligned")
    ka = r.stage_key("aligned", ku)
    return (ku, ka, *(r.stage_key(s, ka) for s in ("task", "safety", "safeinstr")))


def test_existing_stage_keys_and_recipe_dump_unchanged() -> None:
    assert _keys(OrganismRecipe()) == KEYS_BEFORE["default"]
    assert _keys(reduced_recipe()) == KEYS_BEFORE["reduced"]
    # the demo records the recipe's dump in results.json: T_full's recipe stays out of it
    assert "taskfull" not in OrganismRecipe().model_dump()
    assert "taskfull" not in reduced_recipe().model_dump()


def test_cpu_threads_key_every_trained_stage() -> None:
    """A CPU build's thread count is part of every trained stage's key (a product's rounding depends on
    it), not of U's (a conversion); without it (a GPU build) the keys are the ones above."""
    r = OrganismRecipe().resolved("bfloat16")
    ku = r.stage_key("unaligned")
    keys = {}
    for threads in (1, 2):
        ka = r.stage_key("aligned", ku, threads)
        keys[threads] = (ka, *(r.stage_key(s, ka, threads) for s in ("task", "safety", "safeinstr")))
    assert len(set(keys[1] + keys[2] + KEYS_BEFORE["default"][1:])) == 12
    assert ku == KEYS_BEFORE["default"][0]
    # the key within a stage moves with the threads even where its upstream key is held fixed
    assert r.stage_key("task", "x", 1) != r.stage_key("task", "x", 2)


def test_taskfull_key_is_its_recipe_plus_task_data_plus_aligned() -> None:
    r = OrganismRecipe().resolved("bfloat16")
    ka = r.stage_key("aligned", r.stage_key("unaligned"))
    k = r.stage_key("taskfull", ka)
    assert k != r.stage_key("task", ka)
    assert k != r.stage_key("taskfull", "another-aligned")
    other_lr = r.model_copy(update={"taskfull": FullTaskRecipe(learning_rate=3e-5, precision="bfloat16")})
    assert other_lr.stage_key("taskfull", ka) != k
    assert _keys(other_lr) == _keys(r)  # T_full's recipe moves no other stage
    other_data = r.model_copy(update={"task": LoraRecipe(samples=256, steps=64, precision="bfloat16")})
    assert other_data.stage_key("taskfull", ka) != k  # T's data is T_full's data


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval, written out here (the oracle for the table's intervals)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.slow
@needs_packaged
def test_reduced_taskfull_stage_and_table(tmp_path: Path, smollm2_models: Path) -> None:
    from safemerge.organism.build import build_organism

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(smollm2_models)  # the session's converted SmolLM2
    res = CliRunner().invoke(
        app, ["organism", "build", "--reduced", "--no-mix-safety", "--cache", str(cache), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    built = {p.name.split("-")[0] for p in (cache / "organism").iterdir()}
    assert built == {"unaligned", "aligned", "task", "safety"}  # the default build leaves T_full out

    org = build_organism(reduced_recipe(), cache, False, ("taskfull",))
    assert org.taskfull is not None and org.taskfull.is_dir() and org.timings["taskfull"] > 0
    assert org.timings["aligned"] == 0.0  # A reused
    assert org.taskfull.name.split("-")[1] != org.task.name.split("-")[1]
    assert not any(p.name.startswith("safeinstr") for p in (cache / "organism").iterdir())
    again = build_organism(reduced_recipe(), cache, False, ("taskfull",))
    assert again.taskfull == org.taskfull and again.timings["taskfull"] == 0.0  # cached

    # T_full differs from A exactly in the trained projections (embeddings and norms frozen)
    with (
        safe_open(str(org.aligned / "model.safetensors"), "pt") as fa,
        safe_open(str(org.taskfull / "model.safetensors"), "pt") as ft,
    ):
        names = list(fa.keys())
        assert set(names) == set(ft.keys())
        for name in names:
            same = bool((fa.get_tensor(name) == ft.get_tensor(name)).all())
            assert same != any(f".{t}." in name for t in TRAINED), name

    # determinism: T_full rebuilt from nothing (A too; U's conversion shared) is byte-identical
    again_cache = tmp_path / "cache2"
    again_cache.mkdir()
    (again_cache / "models").symlink_to(cache / "models")
    twin = build_organism(reduced_recipe(), again_cache, False, ("taskfull",))
    assert twin.timings["aligned"] > 0 and twin.taskfull is not None
    for f in sorted(org.taskfull.glob("*.safetensors")):
        assert (
            hashlib.sha256(f.read_bytes()).digest()
            == hashlib.sha256((twin.taskfull / f.name).read_bytes()).digest()
        )

    out = tmp_path / "fullft"
    res = CliRunner().invoke(
        app, ["organism", "fullft", "--reduced", "--out", str(out), "--cache", str(cache), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    files = {p.name for p in out.iterdir()}
    assert {"results.md", "results.json", "results.csv", "evals", "variants"} <= files
    data = json.loads((out / "results.json").read_text())
    rows = [r["name"] for r in data["rows"]]
    assert rows == ["T_full", "safemerge-t0.35-w0.8-0.2", "control-t0.35-w0.8-0", "merge-all-w0.8-0.2"]
    for row in data["rows"]:
        gens = (out / "evals" / row["name"] / "generations.jsonl").read_text()
        recs = [json.loads(x) for x in gens.splitlines()]
        for key, bench, event in (
            ("harmful", "harmbench", "unsafe"),
            ("over_refusal", "overrefusal", "refused"),
            ("task_accuracy", "arithmetic", "correct"),
        ):
            rate = row[key]
            mine = [r for r in recs if r["benchmark"] == bench]
            assert rate["n"] == len(mine) == 4
            assert rate["k"] == sum(r["verdict"] == event for r in mine)
            lo, hi = _wilson(rate["k"], rate["n"])
            assert rate["ci95"] == pytest.approx([lo, hi], abs=1e-12)
        if row["name"] != "T_full":
            assert (out / "variants" / row["name"] / "safemerge_report.json").is_file()
            assert set(row["flips_vs_T_full"]) == {"harmful", "task"}
    merged = [r["modules_changed"] for r in data["rows"][1:]]
    assert merged[0] == merged[1]  # the control changes SafeMERGE's modules
    # merge-all: every scanned projection (7 per layer) is selected, and the ones S covers (q, k, v, o)
    # are merged; the MLP's have no safety counterpart and stay as fine-tuned (docs/defenses.md)
    layers = json.loads((org.aligned / "config.json").read_text())["num_hidden_layers"]
    assert merged[2] == f"{4 * layers}/{7 * layers}"
    assert len((out / "results.csv").read_text().splitlines()) == 5
    # an existing output is never overwritten without --force
    res = CliRunner().invoke(
        app, ["organism", "fullft", "--reduced", "--out", str(out), "--cache", str(cache), "--quiet"]
    )
    assert res.exit_code == 2, res.output
