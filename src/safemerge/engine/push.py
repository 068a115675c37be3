"""`safemerge push OUT REPO_ID`: upload a safemerge output to the Hugging Face Hub.

Only a folder safemerge wrote (its `.safemerge-output` marker) that has a model card is pushed. The local
files stay as they are: the uploaded copies of the card, reports and configs name every input by its hub
id or its basename instead of a local path (the local report keeps its `local_dir` entries: they say
which cache snapshot was read), and they are built in memory. Everything goes up in one commit
(`HfApi.create_commit`): weight files straight from OUT, the rewritten text files from memory, so a
full model is never copied. `--eval DIR` adds the results of a `safemerge eval` of OUT to the card as
the Hub's `model-index`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub import constants as hub_constants

from safemerge.common.errors import InputError
from safemerge.common.outdir import MARKER
from safemerge.engine.hub import display_name, input_hub_id, looks_like_hub_id, split_revision
from safemerge.engine.report import REPORT_JSON, THIS_DIRECTORY

CARD = "README.md"
# Files whose text may name local paths, rewritten in the pushed copy (tokenizer files and shard
# indexes never do, and can be large).
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".md")
NEVER_TEXT = re.compile(r"^(tokenizer.*|.*\.index\.json|vocab\.json|merges\.txt)$")
# The metric each benchmark kind puts in the model-index (metrics.json of `safemerge eval`).
EVAL_METRICS = {"harm": "harmful_rate", "utility": "accuracy", "benign": "refusal_rate"}


def check_pushable(out: Path) -> dict[str, Any]:
    """Refuse what push must not upload: a missing folder, one safemerge did not write, one without a
    model card. Returns the marker."""
    if not out.is_dir():
        raise InputError(f"{out}: no such directory")
    try:
        marker = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("written_by") != "safemerge":
        raise InputError(
            f"{out} was not written by safemerge (no {MARKER} marker): push uploads safemerge's outputs only"
        )
    if not (out / CARD).is_file():
        raise InputError(
            f"{out} has no model card ({CARD}): push uploads the outputs of merge, defend and subspace, "
            f"which have one (this is a `{marker.get('command')}` output)"
        )
    return marker


def check_token() -> str:
    """The Hugging Face token push uses; InputError (exit 2) when offline or not logged in."""
    if hub_constants.HF_HUB_OFFLINE:
        raise InputError("HF_HUB_OFFLINE=1 is set, and push needs the network: unset HF_HUB_OFFLINE")
    token = get_token()
    if not token:
        raise InputError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN to a token with write access"
        )
    return token


# --- local paths -> hub ids or basenames --------------------------------------------------------------
def _inputs(data: Any) -> Iterator[Mapping[str, Any]]:
    """Every input description in a report or sketch JSON: a mapping with a `path` and a `revision`."""
    if isinstance(data, Mapping):
        if isinstance(data.get("path"), str) and "revision" in data:
            yield data
        for value in data.values():
            yield from _inputs(value)
    elif isinstance(data, list):
        for value in data:
            yield from _inputs(value)


def path_names(out: Path, repo_id: str) -> dict[str, str]:
    """Local path -> the name the pushed copy gives it: a hub input's cache snapshot -> its hub id; a
    local input -> its hub id when its config names one, else its basename; OUT -> the repository."""
    names: dict[str, str] = {}
    docs = []
    for name in (REPORT_JSON, "subspace.json"):
        try:
            docs.append(json.loads((out / name).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    for info in (i for doc in docs for i in _inputs(doc)):
        path, local = str(info["path"]), info.get("local_dir")
        if info.get("revision"):  # a hub input: its path is the hub id as given; the cache dir is local
            if local:
                names[str(local)] = split_revision(path)[0]
            continue
        public = input_hub_id(info) or display_name(info)
        for key in (path, local, str(Path(path).expanduser().resolve())):
            if key:
                names[str(key)] = public
    for doc in docs:
        given = (doc.get("options") or {}).get("out") if isinstance(doc, Mapping) else None
        if isinstance(given, str):
            names[given] = repo_id
    names[str(out)] = repo_id
    names[str(out.resolve())] = repo_id
    return {k.rstrip("/"): v for k, v in names.items() if k.rstrip("/") and k != v}


def replacer(names: Mapping[str, str]) -> Callable[[str], str]:
    """A function replacing the local paths of `names` in a string: a string equal to one, or (paths
    with a `/` only, so a basename never replaces a word) one standing alone as a path or path prefix."""
    keys = sorted(names, key=len, reverse=True)
    patterns = [(re.compile(rf"(?<![\w.~/-]){re.escape(k)}(?![\w.-])"), names[k]) for k in keys if "/" in k]

    def replace(text: str) -> str:
        if text in names:
            return names[text]
        for pattern, public in patterns:
            text = pattern.sub(public.replace("\\", "\\\\"), text)
        return text

    return replace


def _walk(data: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(data, str):
        return fn(data)
    if isinstance(data, dict):
        return {k: _walk(v, fn) for k, v in data.items()}
    if isinstance(data, list):
        return [_walk(v, fn) for v in data]
    return data


def sanitised_text(path: Path, fn: Callable[[str], str]) -> str:
    """The text of `path` with local paths replaced: JSON and YAML value by value (YAML keeps its
    leading comment lines), Markdown as text."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.dumps(_walk(json.loads(text), fn), indent=2, ensure_ascii=False) + "\n"
    if path.suffix in (".yaml", ".yml"):
        comments = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        return comments + yaml.safe_dump(_walk(yaml.safe_load(text), fn), sort_keys=False)
    return fn(text)


# --- the card -------------------------------------------------------------------------------------------
def eval_results(eval_dir: Path, out: Path) -> list[EvalResult]:
    """The model-index entries of OUT from a `safemerge eval` output: the variant whose adapter (or, for
    a model, whose model) is OUT; its harmful rate, accuracy or refusal rate per benchmark."""
    try:
        metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"--eval {eval_dir}: no readable metrics.json of `safemerge eval` ({exc})") from exc
    target = out.resolve()
    for key, variant in metrics.items():
        evaluated = variant.get("adapter") or key
        if Path(str(evaluated)).expanduser().resolve() == target:
            return [r for name, m in variant.get("benchmarks", {}).items() if (r := _result(name, m))]
    raise InputError(
        f"--eval {eval_dir}: metrics.json has no results for {out} (it evaluated: {', '.join(metrics)}); "
        f"evaluate it with `safemerge eval --adapter {out}` (or --model for a full model)"
    )


def _result(benchmark: str, m: Mapping[str, Any]) -> EvalResult | None:
    metric = EVAL_METRICS.get(str(m.get("kind")))
    if metric is None or m.get(metric) is None:
        return None
    name = Path(benchmark).stem if "/" in benchmark else benchmark  # a JSONL file: its name, not its path
    judge = f" ({m['judge']})" if m.get("judge") else ""
    return EvalResult(
        task_type="text-generation",
        dataset_type=name,
        dataset_name=name,
        metric_type=metric,
        metric_name=f"{metric.replace('_', ' ')}{judge}, n={m.get('n')}",
        metric_value=float(m[metric]),
    )


def pushed_card(text: str, repo_id: str, subfolder: str, results: list[EvalResult] | None) -> str:
    """The card as pushed: it loads from the repository (not PATH_TO_THIS_DIRECTORY) and, with
    `results`, carries them as the model-index."""
    where = f'"{repo_id}"' + (f', subfolder="{subfolder}"' if subfolder else "")
    text = text.replace(f'"{THIS_DIRECTORY}"', where)
    if not results:
        return text
    card = ModelCard(text)
    assert isinstance(card.data, ModelCardData)  # a ModelCard's data (typed as the generic CardData)
    card.data.model_name = repo_id.split("/")[-1]
    card.data.eval_results = results
    return str(card)


# --- the upload ---------------------------------------------------------------------------------------
def operations(
    out: Path, repo_id: str, results: list[EvalResult] | None
) -> tuple[list[CommitOperationAdd], dict[str, bytes]]:
    """One upload per file of OUT (not the marker, nor hidden files): text files that may name local
    paths rewritten in memory (returned too, by path in the repository), every other file as it is."""
    fn = replacer(path_names(out, repo_id))
    ops, rewritten = [], {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        rel = path.relative_to(out)
        if any(part.startswith(".") for part in rel.parts):  # the marker, hidden files
            continue
        name = rel.as_posix()
        if path.suffix in TEXT_SUFFIXES and not NEVER_TEXT.match(path.name):
            text = sanitised_text(path, fn)
            if path.name == CARD:
                text = pushed_card(
                    text, repo_id, rel.parent.as_posix().strip("."), results if name == CARD else None
                )
            rewritten[name] = text.encode("utf-8")
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=rewritten[name]))
        else:
            ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    return ops, rewritten


def push(
    out: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    eval_dir: str | Path | None = None,
) -> str:
    """Upload the safemerge output `out` to the hub repository `repo_id` (created when missing; private
    with `private`) in one commit, on `branch` (created when missing; default main). Returns the URL.
    Every check runs before the first call to the hub."""
    folder = Path(out).expanduser()
    marker = check_pushable(folder)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{repo_id}: not a hub repository id of the form owner/name")
    token = check_token()
    results = eval_results(Path(eval_dir).expanduser(), folder) if eval_dir is not None else None
    ops, _ = operations(folder, repo_id, results)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    api.create_commit(
        repo_id, ops, commit_message=f"safemerge {marker.get('command')} output", revision=branch
    )
    return f"https://huggingface.co/{repo_id}" + (f"/tree/{branch}" if branch else "")
