"""README "Bring your own model", executed: every ```bash and ```python snippet of the section runs, in
order (the Python snippet reads the safety LoRA and the merged output the commands wrote), on tiny
stand-in models, offline.

The mapping from the README's names to the stand-ins (nothing else in a snippet is changed):
- `meta-llama/Llama-3.1-8B-Instruct` → a tiny aligned chat model, `meta-llama/Llama-3.1-8B` → a tiny
  unaligned one (tests/builders.tiny_chat_setup); `./gsm8k-lora` → a LoRA on the tiny aligned model;
- the `gsm8k` benchmark (a hub dataset) → `arithmetic` (offline, utility too);
- for time: `train` gets `--samples 16 --max-steps 2 --batch-size 8`, `eval` (and `evaluate_model`)
  `--limit 3 --max-new-tokens 8`;
- `safemerge push` and `push()` talk to a fake `HfApi` (nothing reaches the network).
Commands run through typer's CliRunner on `safemerge.cli.app`.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
from builders import tiny_chat_setup
from huggingface_hub import constants as hub_constants
from typer.testing import CliRunner

import safemerge.engine.push as push_module
from safemerge.cli import app
from safemerge.common.errors import SafemergeWarning

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Bring your own model"
SPEED = {"train": ["--samples", "16", "--max-steps", "2", "--batch-size", "8"],
         "eval": ["--limit", "3", "--max-new-tokens", "8"]}  # fmt: skip


def section_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```(bash|python)\n(.*?)```", text[start:end], flags=re.S)


class FakeApi:
    """Records the repositories created and the files of every commit."""

    commits: ClassVar[list[tuple[str, list[str]]]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        pass

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> None:
        FakeApi.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))


def substituted(code: str, names: dict[str, str]) -> str:
    """The snippet with the README's model ids replaced by the stand-ins (longest first) and the hub
    benchmark `gsm8k` by `arithmetic`; every name must occur."""
    for name in sorted(names, key=len, reverse=True):
        code = code.replace(name, names[name])
    code = code.replace("gsm8k,harmbench", "arithmetic,harmbench")
    code = code.replace('["gsm8k", "harmbench"', '["arithmetic", "harmbench"')
    return code.replace('reference="task",', 'reference="task", limit=3, max_new_tokens=8,')


def commands(code: str) -> list[list[str]]:
    """The shell commands of a bash block: continuation lines joined, comments dropped."""
    joined = code.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def run_command(argv: list[str]) -> None:
    assert argv[0] == "safemerge", argv
    args = argv[1:] + SPEED.get(argv[1], [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SafemergeWarning)
        res = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, f"{' '.join(args)}\n{res.output}"


@pytest.mark.slow  # ~40 s on 2 cores: trains a LoRA, merges, evaluates three variants twice
def test_every_bring_your_own_model_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = tiny_chat_setup(tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    shutil.copytree(setup["task"], tmp_path / "gsm8k-lora")
    FakeApi.commits = []
    monkeypatch.setattr(push_module, "HfApi", FakeApi)
    monkeypatch.setattr(push_module, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    names = {
        "meta-llama/Llama-3.1-8B-Instruct": str(setup["aligned"]),
        "meta-llama/Llama-3.1-8B": str(setup["unaligned"]),
    }
    blocks = section_blocks()
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    namespace: dict[str, Any] = {}
    for lang, block in blocks:
        code = substituted(block, names)
        assert "meta-llama" not in code and "gsm8k," not in code and '"gsm8k"' not in code, code
        if lang == "bash":
            for argv in commands(code):
                run_command(argv)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SafemergeWarning)
            exec(compile(code, f"{README}:{SECTION}", "exec"), namespace)
    # what the snippets promise: a merged adapter, a comparison with the task LoRA, an upload with a card
    assert (tmp_path / "gsm8k-safemerged" / "adapter_model.safetensors").is_file()
    notebook = tmp_path / "notebook-merged"  # save_safemerged: merge's folder, not PEFT's subfolder
    assert {"adapter_model.safetensors", "README.md", "safemerge_report.json", ".safemerge-output"} <= {
        p.name for p in notebook.iterdir()
    }
    assert (
        json.loads((tmp_path / "safety-lora" / "adapter_config.json").read_text())["r"]
        == json.loads((tmp_path / "gsm8k-lora" / "adapter_config.json").read_text())["r"]
    )
    cli_metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert cli_metrics["safemerged"]["vs_reference"]["reference"] == "task"
    assert set(cli_metrics["safemerged"]["vs_reference"]["benchmarks"]) == {
        "arithmetic", "harmbench", "strongreject", "overrefusal"
    }  # fmt: skip
    assert "p_value" in namespace["metrics"]["safemerged"]["vs_reference"]["benchmarks"]["harmbench"]
    assert namespace["model"].peft_config["safemerged"].r > 0
    assert len(FakeApi.commits) == 2
    for repo, files in FakeApi.commits:
        assert repo == "you/llama-3.1-8b-gsm8k-safemerged"
        assert {"README.md", "adapter_model.safetensors", "safemerge_report.json"} <= set(files)
