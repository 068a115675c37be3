"""The Hub at safemerge's edges (docs/engine.md, "Hub inputs and outputs"): pinned revisions of hub
inputs, the model cards of every output, and `safemerge push`. Nothing reaches the network:
`snapshot_download` is replaced by a fake hub serving local directories, and `HfApi` by a recorder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import pytest
import torch
import yaml
from builders import save_adapter, save_pair
from huggingface_hub import ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.errors import InputError
from safemerge.common.outdir import MARKER
from safemerge.engine import checkpoint, push
from safemerge.engine.checkpoint import resolve_local_dir
from safemerge.engine.hub import split_revision

runner = CliRunner()
COMMIT = {"aligned": "a" * 40, "unaligned": "b" * 40}
LICENSE_CARD = "---\nlicense: llama3.1\nlanguage: en\n---\n# the base model\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local models (the aligned one saved as if loaded from `org/aligned`, with a licensed card), two
    adapters, and a fake hub cache: `snapshots/<commit>` copies of the two models."""
    root = tmp_path_factory.mktemp("hub")
    al, un = save_pair(root, "llama", torch.float32)
    config = json.loads((al / "config.json").read_text())
    (al / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/aligned"}, indent=2))
    (al / "README.md").write_text(LICENSE_CARD)
    snapshots = {}
    for name, src in (("aligned", al), ("unaligned", un)):
        snapshots[name] = shutil.copytree(
            src, root / "cache" / f"models--org--{name}" / "snapshots" / COMMIT[name]
        )
    # a hub model's config may name anything (here nothing): the hub id comes from the input itself
    (snapshots["aligned"] / "config.json").write_text(json.dumps({**config, "_name_or_path": ""}))
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1),
        "safety": save_adapter(al, root / "safety", seed=2),
        **{f"hub-{k}": v for k, v in snapshots.items()},
    }


@pytest.fixture
def fake_hub(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """`snapshot_download` serving `org/aligned` and `org/unaligned` from the fake cache; records calls."""
    calls: list[dict[str, Any]] = []

    def download(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        return str(env["hub-" + repo_id.removeprefix("org/")])

    monkeypatch.setattr(checkpoint, "snapshot_download", download)
    return calls


def merge_args(
    env: dict[str, Path], out: Path, aligned: str | None = None, unaligned: str | None = None
) -> list[str]:
    return [
        "merge", "--aligned", aligned or str(env["aligned"]),
        "--unaligned", unaligned or str(env["unaligned"]),
        "--task-adapter", str(env["task"]), "--safety-adapter", str(env["safety"]), "--out", str(out),
        "--no-plot", "-q",
    ]  # fmt: skip


def card(path: Path) -> Any:
    """The card's metadata as huggingface_hub parses it (the Hub's own reader)."""
    return ModelCard.load(path).data


# --- revisions ---------------------------------------------------------------------------------------
def test_id_at_revision_is_parsed_in_one_place(tmp_path: Path, fake_hub: list[dict[str, Any]]) -> None:
    """`owner/name@rev` pins the hub id; a local path with `@` stays a path; `./x@y` is no hub id."""
    assert split_revision("org/aligned@v1.0") == ("org/aligned", "v1.0")
    assert split_revision("org/aligned@refs/pr/3") == ("org/aligned", "refs/pr/3")
    assert split_revision("./runs/a@b") == ("./runs/a@b", None)
    assert split_revision("org/aligned@") == ("org/aligned@", None)
    local = tmp_path / "model@v2"
    local.mkdir()
    assert resolve_local_dir(str(local)) == (local, None)
    assert fake_hub == []
    directory, commit = resolve_local_dir("org/aligned@v1")
    assert commit == COMMIT["aligned"] and directory.name == COMMIT["aligned"]
    assert fake_hub[-1]["repo_id"] == "org/aligned" and fake_hub[-1]["revision"] == "v1"
    assert "README.md" in fake_hub[-1]["allow_patterns"]  # the base's license is read from its card
    with pytest.raises(InputError) as err:
        resolve_local_dir("./runs/a@b")
    assert str(err.value) == "./runs/a@b: no such directory, and it is not a hub id of the form owner/name"
    with pytest.raises(InputError) as err:
        resolve_local_dir("org/aligned@v1", revision="v2")
    assert str(err.value) == "org/aligned@v1 names revision 'v1', but revision 'v2' was asked for"


def _http_error(cls: type[Exception]) -> Exception:
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls("not found", response=response)


@pytest.mark.parametrize(
    ("error", "offline", "expected"),
    [
        (lambda: _http_error(RevisionNotFoundError), False,
         "org/x@v9: the hub repository org/x has no revision 'v9' (a branch, tag or commit)"),
        (lambda: _http_error(RepositoryNotFoundError), False,
         "org/x@v9: no hub repository org/x (if it is private, log in: `hf auth login`, or set HF_TOKEN)"),
        (lambda: LocalEntryNotFoundError("cache miss"), True,
         "org/x@v9: org/x at revision v9 is not in the local hub cache and HF_HUB_OFFLINE=1 forbids "
         "downloading it: download it once with network access (`hf download org/x`) or unset "
         "HF_HUB_OFFLINE"),
    ],
)  # fmt: skip
def test_a_failed_hub_lookup_says_why(
    monkeypatch: pytest.MonkeyPatch, error: Any, offline: bool, expected: str
) -> None:
    """Unknown revision, unknown (or private) repository, offline cache miss: each its own message."""

    def download(**_: Any) -> str:
        raise error()

    monkeypatch.setattr(checkpoint, "snapshot_download", download)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(InputError) as err:
        resolve_local_dir("org/x@v9")
    assert str(err.value) == expected


def test_a_mistyped_local_path_is_named_as_a_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`runs/tsak` next to an existing `runs/` is a typo of a local path, not a hub failure."""

    def download(**_: Any) -> str:
        raise _http_error(RepositoryNotFoundError)

    monkeypatch.setattr(checkpoint, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(InputError) as err:
        resolve_local_dir("runs/tsak")
    assert str(err.value).startswith("no such directory runs/tsak (read as a hub id: no hub repository")


def test_pinned_hub_inputs_are_recorded(
    env: dict[str, Path], tmp_path: Path, fake_hub: list[dict[str, Any]]
) -> None:
    """`--revision aligned=v1` and `org/unaligned@main`: the hub is asked for those revisions, the report
    records the commits they resolved to, the merged adapter's config pins its base as PEFT does, and
    the resolved safemerge.yaml keeps the pins; the card names the base by its hub id with its license."""
    out = tmp_path / "out"
    args = merge_args(env, out, aligned="org/aligned", unaligned="org/unaligned@main")
    result = runner.invoke(app, [*args, "--revision", "aligned=v1", "--merge-into-base"])
    assert result.exit_code == 0, result.output
    assert [(c["repo_id"], c["revision"]) for c in fake_hub] == [
        ("org/aligned", "v1"),
        ("org/unaligned", "main"),
    ]
    inputs = json.loads((out / "safemerge_report.json").read_text())["inputs"]
    assert inputs["aligned"]["path"] == "org/aligned@v1"
    assert inputs["aligned"]["revision"] == COMMIT["aligned"]
    assert inputs["unaligned"]["revision"] == COMMIT["unaligned"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("org/aligned", "v1")
    resolved = yaml.safe_load((out / "safemerge.yaml").read_text())
    assert (resolved["aligned"], resolved["unaligned"]) == ("org/aligned@v1", "org/unaligned@main")
    data = card(out / "README.md")
    assert data.base_model == "org/aligned" and data.base_model_relation == "adapter"
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert "base_model:adapter:org/aligned" in data.tags and data.license == "llama3.1"
    assert COMMIT["aligned"] in (out / "README.md").read_text()
    full = card(out / "full_model" / "README.md")
    assert (full.base_model, full.base_model_relation, full.library_name) == (
        "org/aligned",
        "finetune",
        "transformers",
    )
    assert "base_model:finetune:org/aligned" in full.tags and full.license == "llama3.1"


@pytest.mark.parametrize(
    ("pin", "message"),
    [
        ("aligned", "--revision aligned: expected INPUT=REV, e.g. --revision aligned=main"),
        ("judge=v1", "--revision judge=v1: no input 'judge' (this command's inputs: aligned, unaligned, "
         "task-adapter, task-model, safety-adapter, safety-model)"),
        ("safety-model=v1", "--revision safety-model=v1: give --safety-model on the command line too (in a "
         "YAML config, write the input as owner/name@REV)"),
        ("task-adapter=v1", "--revision task-adapter=v1: --task-adapter {task} is a local directory; "
         "revisions pin hub ids"),
        ("unaligned=v1", "--revision unaligned=v1: --unaligned org/unaligned@main already names a revision"),
    ],
)  # fmt: skip
def test_bad_revision_flags_are_refused(
    env: dict[str, Path], tmp_path: Path, fake_hub: list[dict[str, Any]], pin: str, message: str
) -> None:
    """Every misuse of `--revision` is exit 2 naming the flag, before the hub is asked anything."""
    args = merge_args(env, tmp_path / "out", aligned="org/aligned", unaligned="org/unaligned@main")
    result = runner.invoke(app, [*args, "--revision", pin])
    assert result.exit_code == 2, result.output
    assert f"error: {message.format(task=env['task'])}" in " ".join(result.output.split())
    assert fake_hub == [] and not (tmp_path / "out").exists()


# --- cards -------------------------------------------------------------------------------------------
def test_a_local_base_is_named_by_its_hub_id_or_left_out(env: dict[str, Path], tmp_path: Path) -> None:
    """A local aligned model saved from `org/aligned` is that base on the card; one whose config names
    no hub id leaves `base_model` out. Either way no local path is written into the card."""
    out = tmp_path / "named"
    assert runner.invoke(app, merge_args(env, out)).exit_code == 0
    data = card(out / "README.md")
    assert (data.base_model, data.license) == ("org/aligned", "llama3.1")
    plain = shutil.copytree(env["aligned"], tmp_path / "plain-aligned")
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "_name_or_path": str(plain)}))
    (plain / "README.md").unlink()
    out = tmp_path / "plain"
    assert runner.invoke(app, merge_args(env, out, aligned=str(plain))).exit_code == 0, "merge failed"
    data = card(out / "README.md")
    assert data.base_model is None and data.license is None
    assert "base_model_relation" not in data.to_dict()
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert not any(t.startswith("base_model:") for t in data.tags)
    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and str(env["root"]) not in text


@pytest.mark.parametrize(
    ("method", "extra", "library", "relation"),
    [
        ("none", [], "peft", "adapter"),
        ("safelora", ["--merge-into-base"], "peft", "adapter"),
        ("resta", [], "transformers", "finetune"),
        ("merge-all", ["--merge-into-base"], "peft", "adapter"),
    ],
)
def test_every_defence_output_has_a_card(
    env: dict[str, Path], tmp_path: Path, method: str, extra: list[str], library: str, relation: str
) -> None:
    """Each defence's output, and its `full_model/`, carries a card the Hub reads: base model by hub id
    and relation, its tag, pipeline, library and the base's license; no local path."""
    out = tmp_path / method
    args = [
        "defend", "--method", method, "--aligned", str(env["aligned"]), "--unaligned", str(env["unaligned"]),
        "--task-adapter", str(env["task"]), "--out", str(out), "--no-plot", "-q", *extra,
    ]  # fmt: skip
    if method == "merge-all":
        args += ["--safety-adapter", str(env["safety"])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cards = [(out, library, relation)]
    if extra:
        cards.append((out / "full_model", "transformers", "finetune"))
    for folder, lib, rel in cards:
        data = card(folder / "README.md")
        assert (data.base_model, data.base_model_relation, data.library_name) == ("org/aligned", rel, lib)
        assert f"base_model:{rel}:org/aligned" in data.tags and "safemerge" in data.tags
        assert data.pipeline_tag == "text-generation" and data.license == "llama3.1"
        assert str(env["root"]) not in (folder / "README.md").read_text()
    marker = json.loads((out / MARKER).read_text())
    assert "README.md" in marker["entries"]


# --- push ------------------------------------------------------------------------------------------------
class FakeApi:
    """Records what `push` asks of the hub, and the bytes of every file uploaded."""

    instances: ClassVar[list[FakeApi]] = []

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.files: dict[str, bytes] = {}
        FakeApi.instances.append(self)

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> None:
        self.calls.append(("create_commit", {"repo_id": repo_id, **kwargs}))
        for op in operations:
            src = op.path_or_fileobj
            self.files[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeApi]:
    FakeApi.instances = []
    monkeypatch.setattr(push, "HfApi", FakeApi)
    monkeypatch.setattr(push, "get_token", lambda: "hf_test")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    return FakeApi


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_push_uploads_a_sanitised_copy_and_never_changes_out(
    env: dict[str, Path], tmp_path: Path, fake_hub: list[dict[str, Any]], fake_api: type[FakeApi]
) -> None:
    """Every file of OUT but the marker goes up in one commit on the branch asked for; the uploaded card,
    report and configs name no local path (the hub cache dir becomes the hub id, local inputs their
    basename); the card loads from the repository and carries the eval's model-index; OUT is unchanged."""
    out = tmp_path / "out"
    assert runner.invoke(app, merge_args(env, out, aligned="org/aligned")).exit_code == 0
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["inputs"]["aligned"]["local_dir"] == str(env["hub-aligned"])  # kept locally
    metrics = {
        str(out): {"adapter": str(out), "benchmarks": {
            "harmbench": {"kind": "harm", "judge": "keyword", "n": 10, "harmful_rate": 0.2},
            "gsm8k": {"kind": "utility", "n": 10, "n_correct": 7, "accuracy": 0.7},
        }},
        "base": {"adapter": None, "benchmarks": {}},
    }  # fmt: skip
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "metrics.json").write_text(json.dumps(metrics))
    before = tree_digest(out)
    result = runner.invoke(app, ["push", str(out), "me/safe-adapter", "--private", "--revision", "v1",
                                 "--eval", str(evals)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/me/safe-adapter/tree/v1" in result.output
    assert tree_digest(out) == before
    (api,) = fake_api.instances
    assert api.token == "hf_test"
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/safe-adapter", "private": True, "exist_ok": True}
    assert api.calls[2][1]["revision"] == "v1"
    assert sorted(api.files) == sorted(k for k in before if k != MARKER)
    assert api.files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    for name, data in api.files.items():
        if not name.endswith(".safetensors"):
            text = data.decode()
            assert str(tmp_path) not in text and str(env["root"]) not in text, name
    pushed = json.loads(api.files["safemerge_report.json"])
    assert pushed["inputs"]["aligned"]["local_dir"] == "org/aligned"
    assert pushed["inputs"]["aligned"]["revision"] == COMMIT["aligned"]
    assert pushed["inputs"]["task_adapter"]["path"] == "task"
    assert (
        pushed["inputs"]["unaligned"]["path"]
        == pushed["inputs"]["unaligned"]["local_dir"]
        == "llama-unaligned"
    )
    assert pushed["outputs"]["adapter"] == "me/safe-adapter"
    assert yaml.safe_load(api.files["safemerge.yaml"])["task_adapter"] == "task"
    readme = api.files["README.md"].decode()
    assert 'PeftModel.from_pretrained(model, "me/safe-adapter")' in readme
    data = ModelCard(readme).data
    assert data.base_model == "org/aligned" and data.license == "llama3.1"
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("harmbench", "harmful_rate"): 0.2, ("gsm8k", "accuracy"): 0.7}


def test_push_refuses_what_it_must_not_upload(
    env: dict[str, Path], tmp_path: Path, fake_api: type[FakeApi], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder safemerge did not write, an output without a card (a scan report), a missing token and
    an eval that did not evaluate OUT are exit 2 with their message; the hub is never called."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("# mine\n")
    scanned = tmp_path / "scanned"
    scan = ["scan", "--aligned", str(env["aligned"]), "--unaligned", str(env["unaligned"]),
            "--task-adapter", str(env["task"]), "--out", str(scanned), "--no-plot", "-q"]  # fmt: skip
    assert runner.invoke(app, scan).exit_code == 0
    merged = tmp_path / "merged"
    assert runner.invoke(app, merge_args(env, merged)).exit_code == 0
    evals = tmp_path / "eval"
    evals.mkdir()
    (evals / "metrics.json").write_text(json.dumps({"base": {"adapter": None, "benchmarks": {}}}))
    cases = [
        (["push", str(foreign), "me/x"],
         f"{foreign} was not written by safemerge (no {MARKER} marker): push uploads safemerge's "
         "outputs only"),
        (["push", str(scanned), "me/x"],
         f"{scanned} has no model card (README.md): push uploads the outputs of merge, defend and "
         "subspace, which have one (this is a `scan` output)"),
        (["push", str(tmp_path / "nope"), "me/x"], f"{tmp_path / 'nope'}: no such directory"),
        (["push", str(merged), "not-a-repo"], "not-a-repo: not a hub repository id of the form owner/name"),
        (["push", str(merged), "me/x", "--eval", str(evals)],
         f"--eval {evals}: metrics.json has no results for {merged} (it evaluated: base); evaluate it "
         f"with `safemerge eval --adapter {merged}` (or --model for a full model)"),
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"error: {message}" in " ".join(result.output.split()), result.output
    monkeypatch.setattr(push, "get_token", lambda: None)
    result = runner.invoke(app, ["push", str(merged), "me/x"])
    assert result.exit_code == 2
    assert (
        "error: no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with "
        "write access" in " ".join(result.output.split())
    )
    assert all(api.calls == [] for api in fake_api.instances)
