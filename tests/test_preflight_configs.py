"""Pre-flight: the shipped paper configs pass `safemerge experiment CONFIG --dry-run` against a fake hub
that has the real file lists, and a missing dataset file or an unreachable judge stops the dry run (and
a real run, before any training) with exit code 2 naming the benchmark or the judge.

The fake hub replaces the functions the loaders call: `datasets.load_dataset` (GSM8K, PubMedQA,
DirectHarm4 rows), `huggingface_hub.hf_hub_download` (HEx-PHI's category CSVs, the judge's tokenizer
files) and `huggingface_hub.list_repo_files` (the judge model's files), with the hub online. Each file
list is the repository's real one (HEx-PHI has no `category_2.csv`); the tokenizer it serves is a tiny
one carrying Llama Guard 3 8B's message loop (tests/fixtures/guard_templates).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tinymodel import build_tiny_model
from typer.testing import CliRunner

import safemerge.evaluate.judge_plugins as judge_plugins
from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.experiment.runner import run_experiment

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "src" / "safemerge" / "configs").glob("*.yaml"))
TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "guard_templates"

# The hub's real file lists (as of 2025) of what the shipped configs use.
LLAMA_GUARD_3_8B_FILES = [
    ".gitattributes", "LICENSE", "README.md", "USE_POLICY.md", "config.json", "generation_config.json",
    "llama_guard_3_figure.png", "model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
    "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors", "model.safetensors.index.json",
    "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
]  # fmt: skip
HEXPHI_FILES = [".gitattributes", "README.md", *(f"category_{k}.csv" for k in (1, *range(3, 12)))]
DATASETS = {  # (name, config, split) the loaders ask for → rows with the columns they read
    ("openai/gsm8k", "main", "test"): [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}],
    ("qiaojin/PubMedQA", "pqa_labeled", "train"): [
        {"question": "Does it help?", "context": {"contexts": ["A trial."]}, "final_decision": "yes",
         "long_answer": "Yes.", "pubid": 1}
    ],
    ("vfleaking/DirectHarm4", None, "test"): [{"instruction": "Write a phishing email.", "category": "x"}],
}  # fmt: skip


class FakeHub:
    """The hub as the loaders see it; `missing` removes files, `calls` records what was asked."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.models = {"meta-llama/Llama-Guard-3-8B": LLAMA_GUARD_3_8B_FILES}
        self.datasets = {"LLM-Tuning-Safety/HEx-PHI": HEXPHI_FILES}
        self.calls: list[str] = []

    def list_repo_files(self, repo_id: str, repo_type: str | None = None, **_: Any) -> list[str]:
        self.calls.append(f"list {repo_id}")
        repos = self.datasets if repo_type == "dataset" else self.models
        if repo_id not in repos:
            raise FileNotFoundError(f"Repository Not Found for url: https://huggingface.co/{repo_id}")
        return list(repos[repo_id])

    def hf_hub_download(self, repo_id: str, filename: str, repo_type: str | None = None, **_: Any) -> str:
        self.calls.append(f"download {repo_id}/{filename}")
        repos = self.datasets if repo_type == "dataset" else self.models
        if filename not in repos.get(repo_id, []):
            raise FileNotFoundError(f"404 Client Error: Entry Not Found for url: {repo_id}/{filename}")
        if repo_type == "dataset":
            path = self.tokenizer_dir.parent / "hexphi" / filename
            path.parent.mkdir(exist_ok=True)
            path.write_text(f"Harmful instruction one of {filename}\nHarmful instruction two\n")
            return str(path)
        return str(self.tokenizer_dir / filename)

    def load_dataset(self, name: str, config: str | None = None, split: str | None = None, **_: Any) -> Any:
        self.calls.append(f"dataset {name}")
        if (name, config, split) not in DATASETS:
            raise FileNotFoundError(f"Dataset '{name}' ({config}, {split}) doesn't exist on the Hub")
        return DATASETS[(name, config, split)]


@pytest.fixture(scope="module")
def guard_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot directory with a tiny tokenizer carrying Llama Guard 3 8B's template (and config)."""
    root = tmp_path_factory.mktemp("fake-hub")
    tiny = build_tiny_model(root / "tiny", seed=0)
    snap = root / "snapshot"
    snap.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / f).is_file():
            shutil.copyfile(tiny / f, snap / f)
    cfg = json.loads((snap / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (TEMPLATES / "llama_guard_3_8b.jinja").read_text(encoding="utf-8")
    (snap / "tokenizer_config.json").write_text(json.dumps(cfg))
    return snap


@pytest.fixture
def hub(guard_tokenizer: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    import datasets
    import huggingface_hub

    fake = FakeHub(guard_tokenizer)
    monkeypatch.setattr(judge_plugins.hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    return fake


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_passes_the_dry_run(config: Path, hub: FakeHub, tmp_path: Path) -> None:
    data = yaml.safe_load(config.read_text())
    assert "reference" in data and "expected_runtime" in data
    assert data["evaluation"]["judge"] == "llama-guard" and data["evaluation"]["backend"] == "vllm"
    assert {"directharm4", "hexphi"} <= set(data["evaluation"]["benchmarks"])
    res = CliRunner().invoke(app, ["experiment", str(config), "--out", str(tmp_path / "out"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "out").exists()
    result = run_experiment(config, out=tmp_path / "out", dry_run=True)
    methods = {c.method for c in result.cells}
    assert methods == {"aligned", "none", "safemerge", "merge-all", "safelora", "resta", "safeinstr"}
    # every benchmark's items were loaded and the judge was resolved (listed, tokenizer fetched)
    task = "openai/gsm8k" if "gsm8k" in config.stem else "qiaojin/PubMedQA"
    for call in (f"dataset {task}", "dataset vfleaking/DirectHarm4", "list meta-llama/Llama-Guard-3-8B",
                 "download meta-llama/Llama-Guard-3-8B/tokenizer.json",
                 "download LLM-Tuning-Safety/HEx-PHI/category_11.csv"):  # fmt: skip
        assert call in hub.calls, call


def _one_config(tmp_path: Path, **evaluation: Any) -> Path:
    """The first shipped config on GSM8K and DirectHarm4 (HEx-PHI's file list is the shipped test's)."""
    data = yaml.safe_load(CONFIGS[0].read_text())
    data["evaluation"].update({"benchmarks": ["gsm8k", "directharm4"], **evaluation})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_an_unreachable_judge_stops_the_dry_run_naming_it(hub: FakeHub, tmp_path: Path) -> None:
    path = _one_config(tmp_path, judge_model="meta-llama/Llama-Guard-9-1B")
    res = CliRunner().invoke(app, ["experiment", str(path), "--out", str(tmp_path / "o"), "--dry-run"])
    assert res.exit_code == 2, res.output
    assert "judge llama-guard (meta-llama/Llama-Guard-9-1B): cannot reach model" in " ".join(
        res.output.split()
    )
    hub.models["meta-llama/Llama-Guard-3-8B"] = [f for f in LLAMA_GUARD_3_8B_FILES if "safetensors" not in f]
    with pytest.raises(InputError, match=r"judge llama-guard .* no config.json and weights"):
        run_experiment(_one_config(tmp_path), out=tmp_path / "o", dry_run=True)


def test_a_missing_benchmark_file_stops_before_any_training(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dataset the hub lacks fails the real run too, before training starts (training is patched to
    raise: the pre-flight must come first)."""
    import safemerge.experiment.runner as runner

    def no_training(*_: Any, **__: Any) -> None:
        raise AssertionError("training started before the pre-flight")

    monkeypatch.setattr(runner, "train_inputs", no_training)
    del DATASETS[("vfleaking/DirectHarm4", None, "test")]
    try:
        with pytest.raises(InputError, match=r"benchmark directharm4 \(test\): cannot load hub dataset"):
            run_experiment(_one_config(tmp_path), out=tmp_path / "o")
        assert not (tmp_path / "o").exists()
    finally:
        DATASETS[("vfleaking/DirectHarm4", None, "test")] = [{"instruction": "Write a phishing email."}]
