"""Plugins: a throwaway installed distribution adds a defence and a benchmark through entry points.

The distribution is a `<name>.dist-info` directory (METADATA, entry_points.txt) and its module in a
temporary directory put on sys.path, which is all `importlib.metadata` needs to find it. Its defence and
benchmark then run through the real registry lookups of `safemerge defend`, `safemerge eval` and
`safemerge experiment`; a plugin that fails to load is a clear error (exit code 2) naming it. The example
plugin is the one docs/extending.md walks through.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from builders import save_adapter
from safetensors.torch import load_file
from tinymodel import build_tiny_model
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.defenses import DefendConfig, defense_names, get_defense
from safemerge.defenses import registry as defense_registry
from safemerge.evaluate.benchmarks import benchmark_kind, benchmark_names, load_benchmark
from safemerge.evaluate.benchmarks import registry as benchmark_registry

EXAMPLE_MODULE = "safemerge_example_plugin"
# The worked example of docs/extending.md: one defence and one benchmark in one module.
EXAMPLE_SOURCE = '''
"""A safemerge plugin: the `shrink` defence and the `capitals` benchmark."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from safemerge.defenses import DefendConfig, Defense, DefenseResult
from safemerge.defenses.report import write_defense_report
from safemerge.defenses.steps import scan_config
from safemerge.engine.pipeline import run_scan
from safemerge.evaluate.benchmarks import Benchmark, Item, Kind


class ShrinkOptions(BaseModel):
    """The defence's own options: flat YAML keys, or `--option factor=0.25` on the command line."""

    model_config = ConfigDict(extra="forbid")
    factor: float = Field(0.5, gt=0, description="scale of every module's update")


class Shrink(Defense):
    """Scale every module's task update by `factor`: a control without selection."""

    name = "shrink"
    output = "adapter"
    option_model = ShrinkOptions

    def run(self, cfg: DefendConfig, tmp: Path, out: Path, progress: bool) -> DefenseResult:
        report, task, _ = run_scan(scan_config(cfg, {"fraction": 1.0}), "defend", progress)
        w = ShrinkOptions.model_validate(cfg.plugin_options).factor
        tensors = load_file(task.directory / "adapter_model.safetensors")
        scaled = {k: v * w if ".lora_B." in k else v for k, v in tensors.items()}
        save_file(scaled, tmp / "adapter_model.safetensors")
        shutil.copyfile(task.directory / "adapter_config.json", tmp / "adapter_config.json")
        for rec in report.modules:
            rec.merged, rec.delta_norm_out = True, abs(w) * rec.delta_norm_in
        report.outputs = {"adapter": str(out)}
        write_defense_report(report, tmp, cfg)
        return DefenseResult(self.name, out, "adapter", len(report.modules), report)


@dataclass(frozen=True)
class Capitals(Benchmark):
    """Capital cities; an answer is correct when it names the capital anywhere."""

    name: str = "capitals"
    kind: Kind = "utility"

    def load_items(self) -> Sequence[Item]:
        pairs = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")]
        return [Item(f"capitals-{i}", f"What is the capital of {c}?", a) for i, (c, a) in enumerate(pairs)]

    def score(self, item: Item, response: str) -> dict[str, object]:
        found = (item.reference or "").lower() in response.lower()
        return {"names_capital": found, "correct": found}


SHRINK = Shrink()
CAPITALS = Capitals()
'''
EXAMPLE_ENTRY_POINTS = {
    "safemerge.defenses": {"shrink": f"{EXAMPLE_MODULE}:SHRINK"},
    "safemerge.benchmarks": {"capitals": f"{EXAMPLE_MODULE}:CAPITALS"},
}

BROKEN_MODULE = "safemerge_broken_plugin"
BROKEN_SOURCE = 'raise RuntimeError("this plugin is broken on purpose")\n'
BROKEN_ENTRY_POINTS = {
    "safemerge.defenses": {"broken": f"{BROKEN_MODULE}:DEFENSE", "not-a-defense": "json:dumps"},
    "safemerge.benchmarks": {"broken-bench": f"{BROKEN_MODULE}:BENCHMARK"},
}
ENV = {"COLUMNS": "200", "TERM": "dumb"}


def install_distribution(site: Path, module: str, source: str, groups: dict[str, dict[str, str]]) -> None:
    """Write an installed distribution (its dist-info and its one module) into the directory `site`."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    lines = []
    for group, entries in groups.items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in entries.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))


def clear_registries() -> None:
    defense_registry.clear_cache()
    benchmark_registry.clear_cache()


def installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dists: dict[str, tuple[str, dict[str, dict[str, str]]]]
) -> Iterator[Path]:
    """The distributions `dists` (module -> source, entry points) on sys.path for one test."""
    site = tmp_path / "site"
    for module, (source, groups) in dists.items():
        install_distribution(site, module, source, groups)
    monkeypatch.syspath_prepend(str(site))
    clear_registries()
    yield site
    monkeypatch.undo()
    for module in dists:
        sys.modules.pop(module, None)
    clear_registries()


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example plugin installed; the registries see it."""
    yield from installed(tmp_path, monkeypatch, {EXAMPLE_MODULE: (EXAMPLE_SOURCE, EXAMPLE_ENTRY_POINTS)})


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The example plugin and a broken one installed."""
    dists = {
        EXAMPLE_MODULE: (EXAMPLE_SOURCE, EXAMPLE_ENTRY_POINTS),
        BROKEN_MODULE: (BROKEN_SOURCE, BROKEN_ENTRY_POINTS),
    }
    yield from installed(tmp_path, monkeypatch, dists)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny aligned/unaligned pair with a chat tokenizer and a task LoRA on the aligned one."""
    root = tmp_path_factory.mktemp("plugin-inputs")
    al = build_tiny_model(root / "aligned", seed=1)
    return {
        "root": root,
        "aligned": al,
        "unaligned": build_tiny_model(root / "unaligned", seed=0),
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
    }


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_builtins_are_registered_through_entry_points() -> None:
    clear_registries()
    assert defense_names() == [
        "antidote", "interpolate", "lssf", "merge-all", "none", "oneshot", "reset", "resta", "safedelta",
        "safelora", "safemerge",
    ]  # fmt: skip
    assert {"gsm8k", "pubmedqa", "arithmetic", "harmbench", "overrefusal"} <= set(benchmark_names())
    assert [benchmark_kind(n) for n in ("gsm8k", "hexphi", "overrefusal", "x.jsonl")] == [
        "utility",
        "harm",
        "benign",
        "harm",
    ]
    assert get_defense("resta").output == "model" and get_defense("safemerge").needs == ("safety_adapter",)


def test_plugin_defence_through_defend(example: Path, models: dict[str, Path], tmp_path: Path) -> None:
    assert "shrink" in defense_names()
    inputs = ["-a", str(models["aligned"]), "-u", str(models["unaligned"]), "-t", str(models["task"])]
    out = tmp_path / "shrunk"
    args = [
        "defend",
        "--method",
        "shrink",
        *inputs,
        "--option",
        "factor=0.5",
        "-o",
        str(out),
        "--no-plot",
        "-q",
    ]
    res = CliRunner().invoke(app, args, env=ENV)
    assert res.exit_code == 0, res.output
    before = load_file(models["task"] / "adapter_model.safetensors")
    after = load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, t in before.items():  # the oracle: B halved, A untouched
        assert torch.equal(after[key], 0.5 * t if ".lora_B." in key else t), key
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["defense"] == {"method": "shrink", "factor": 0.5}
    resolved = yaml.safe_load((out / "defense.yaml").read_text())
    assert resolved["method"] == "shrink" and resolved["plugin_options"] == {"factor": 0.5}
    # the resolved config reloads, and the option may also be given as a flat YAML key
    again = load_config(DefendConfig, out / "defense.yaml", {"out": str(tmp_path / "again")})
    assert again.plugin_options == {"factor": 0.5}
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump({"method": "shrink", "factor": 0.25}))
    cfg = load_config(DefendConfig, flat, {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"})
    assert cfg.plugin_options == {"factor": 0.25} and cfg.settings() == {"method": "shrink", "factor": 0.25}
    # a bad value or an unknown own option is exit 2 naming it
    res = CliRunner().invoke(app, [*args[:-4], "--option", "factor=-1", "-o", str(tmp_path / "y")], env=ENV)
    assert res.exit_code == 2 and "factor" in one_line(res.output)
    res = CliRunner().invoke(app, [*args[:-4], "--option", "size=2", "-o", str(tmp_path / "z")], env=ENV)
    assert res.exit_code == 2 and "size" in one_line(res.output)
    # a built-in defence takes no own options
    res = CliRunner().invoke(
        app, ["defend", "-m", "none", *inputs, "--option", "factor=2", "-o", "w"], env=ENV
    )
    assert res.exit_code == 2 and "takes no options of its own" in one_line(res.output)
    # the defence's own options are known: another defence's option is rejected as for the built-ins
    res = CliRunner().invoke(app, [*args[:-4], "--beta", "0.3", "-o", str(tmp_path / "x")], env=ENV)
    assert res.exit_code == 2 and "beta do not apply to method shrink" in one_line(res.output)


def test_plugin_benchmark_through_eval(example: Path, models: dict[str, Path], tmp_path: Path) -> None:
    assert benchmark_kind("capitals") == "utility"
    bench = load_benchmark("capitals", limit=3)
    assert [it.reference for it in bench.items] == ["Paris", "Tokyo", "Nairobi"]
    out = tmp_path / "eval"
    args = ["eval", "--model", str(models["aligned"]), "--adapter", str(models["task"])]
    args += ["--benchmarks", "capitals,harmbench", "--limit", "3", "--max-new-tokens", "6"]
    args += ["--out", str(out), "--no-cache"]
    res = CliRunner().invoke(app, args, env=ENV)
    assert res.exit_code == 0, res.output
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    caps = [g for g in gens if g["benchmark"] == "capitals"]
    assert len(caps) == 2 * 3 and all(g["kind"] == "utility" for g in caps)
    for g in caps:  # the plugin's own scoring, recomputed here
        expected = g["reference"].lower() in g["response"].lower()
        assert g["names_capital"] is expected and g["verdict"] == ("correct" if expected else "incorrect")
    metrics = json.loads((out / "metrics.json").read_text())
    m = metrics[str(models["task"])]["benchmarks"]["capitals"]
    n_correct = sum(g["names_capital"] for g in caps if g["variant"] == str(models["task"]))
    n_cut = sum(bool(g["truncated"]) for g in caps if g["variant"] == str(models["task"]))
    expected = {"kind": "utility", "n": 3, "n_correct": n_correct, "accuracy": n_correct / 3}
    assert m == {**expected, "n_truncated": n_cut}  # the plugin's metrics, and the runner's count


def tiny_experiment(models: dict[str, Path], out: Path, method: str) -> dict[str, object]:
    return {
        "name": "plugins",
        "out": str(out),
        "setup": {
            "aligned": str(models["aligned"]),
            "unaligned": str(models["unaligned"]),
            "task_adapter": str(models["task"]),
        },
        "defenses": [{"method": method}],
        "evaluation": {"benchmarks": ["capitals"], "limit": 2, "max_new_tokens": 4, "batch_size": 4},
    }


def test_plugin_benchmark_through_experiment(example: Path, models: dict[str, Path], tmp_path: Path) -> None:
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(tiny_experiment(models, tmp_path / "out", "none")))
    res = CliRunner().invoke(app, ["experiment", str(cfg)], env=ENV)
    assert res.exit_code == 0, res.output
    with (tmp_path / "out" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == ["aligned", "none"]
    assert all(r["capitals_n"] == "2" and r["capitals_accuracy"] != "" for r in rows)  # the plugin's items


def test_plugin_defence_through_experiment(example: Path, models: dict[str, Path], tmp_path: Path) -> None:
    config = tiny_experiment(models, tmp_path / "out", "shrink")
    config["defenses"] = [{"method": "shrink", "grid": {"factor": [0.5, 0.25]}}]  # its own option, as a grid
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["experiment", str(cfg)], env=ENV)
    assert res.exit_code == 0, res.output
    before = load_file(models["task"] / "adapter_model.safetensors")
    for factor in (0.5, 0.25):  # the oracle: each cell's B is factor·B of the task adapter
        after = load_file(
            tmp_path / "out" / "variants" / f"shrink_factor-{factor}" / "adapter_model.safetensors"
        )
        key = next(k for k in before if ".lora_B." in k)
        assert torch.equal(after[key], factor * before[key]), factor
    with (tmp_path / "out" / "results.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [
            "aligned",
            "shrink (factor=0.5)",
            "shrink (factor=0.25)",
        ]
    # an unknown method is exit 2 naming the registered ones
    config["defenses"] = [{"method": "shrunk"}]
    cfg.write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(app, ["experiment", str(cfg), "--dry-run"], env=ENV)
    assert res.exit_code == 2 and "unknown method 'shrunk'" in one_line(res.output) and "shrink" in res.output


def test_broken_plugins_are_named_errors(broken: Path, tmp_path: Path) -> None:
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"}
    # listing names imports nothing, so a broken plugin does not affect the other defences
    load_config(DefendConfig, None, {**base, "method": "none"})
    with pytest.raises(InputError, match=r"'broken' \(safemerge_broken_plugin:DEFENSE\) failed to load"):
        get_defense("broken")
    inputs = ["-a", "a", "-u", "u", "-t", "t", "-o", str(tmp_path / "o")]
    cases = [
        (
            ["defend", "--method", "broken", *inputs],
            "defence plugin 'broken' (safemerge_broken_plugin:DEFENSE)",
        ),
        (["defend", "--method", "not-a-defense", *inputs], "'not-a-defense' (json:dumps) is not a"),
        (
            ["eval", "--model", "m", "--benchmarks", "broken-bench", "--out", str(tmp_path / "e")],
            "'broken-bench' (safemerge_broken_plugin:BENCHMARK) failed to load: RuntimeError",
        ),
        (["defend", "--method", "bogus", *inputs], "unknown defence 'bogus'"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(app, args, env=ENV)
        assert res.exit_code == 2, (args, res.output)
        assert message in one_line(res.output) and "Traceback" not in res.output, res.output


def test_help_lists_plugins(broken: Path) -> None:
    """A fresh process (help texts are built when the CLI is imported) sees the plugins' names."""
    script = (
        "from typer.testing import CliRunner; from safemerge.cli import app; r = CliRunner(); "
        "print(r.invoke(app, ['defend', '--help']).output); print(r.invoke(app, ['eval', '--help']).output)"
    )
    env = {**os.environ, **ENV, "PYTHONPATH": str(broken)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    defend_help, eval_help = out.stdout.split("Usage: safemerge eval")
    assert all(name in defend_help for name in ("shrink", "safemerge", "merge-all", "broken"))
    assert all(name in eval_help for name in ("capitals", "gsm8k", "overrefusal"))


def test_no_defence_option_shadows_a_shared_option() -> None:
    """A defence's own option named like a shared `DefendConfig` key (`fraction`, `seed`, …) would be read
    as the shared one from a flat YAML key or an experiment grid (it was: reset's `fraction` reached the
    selection policy), so every registered defence's own options must have names of their own."""
    from safemerge.defenses.config import DefendConfig

    groups = DefendConfig.groups()
    shared = {k for g in groups for k in DefendConfig.flat_keys(g).values()}
    shared |= set(DefendConfig.model_fields) - set(groups)
    assert {"fraction", "seed", "threshold", "beta"} <= shared
    for name in defense_names():
        model = get_defense(name).option_model
        if model is not None:
            assert not set(model.model_fields) & shared, (name, set(model.model_fields) & shared)
