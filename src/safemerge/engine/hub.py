"""The Hugging Face Hub at safemerge's edges: hub ids and revisions of inputs, and model-card metadata.

- `split_revision`: the one parser of the `owner/name@revision` form every model and adapter input takes.
- `hub_error`: what a failed hub lookup means for the user (offline cache miss, unknown revision,
  private or gated repository, a local path mistyped), as an `InputError`.
- `input_hub_id` / `display_name`: the hub id an input of a report stands for, and the name a card or a
  pushed report shows for it (the hub id, or the directory's basename: never a local path).
- `card_metadata` / `render_card`: the YAML front matter of an output's README.md, built with
  `huggingface_hub.ModelCardData` (the Hub's own validation and rendering; docs/engine.md, "Hub inputs
  and outputs").
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.repocard import metadata_load

from safemerge.common.errors import InputError

# The hub id form safemerge accepts: owner/name (the Hub's own characters), nothing before or after.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# License fields of a base model's card that an output inherits (`other` licenses name and link theirs).
LICENSE_FIELDS = ("license", "license_name", "license_link")
Kind = Literal["adapter", "model"]


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` has the form owner/name (no leading `.`, `/` or `~`, exactly one slash)."""
    return _HUB_ID.fullmatch(text) is not None


def split_revision(text: str) -> tuple[str, str | None]:
    """`owner/name@rev` -> (`owner/name`, `rev`); anything else -> (`text`, None).

    Only a hub id takes a revision: a local path that contains `@` is checked as a path before this is
    called (`checkpoint.resolve_local_dir`), and `./dir@x` is never read as a hub id."""
    head, sep, rev = text.partition("@")
    if sep and rev and looks_like_hub_id(head):
        return head, rev
    return text, None


def hub_error(text: str, repo_id: str, revision: str | None, exc: Exception) -> InputError:
    """The InputError of a failed hub lookup of input `text` (hub id `repo_id`), saying what to do."""
    where = repo_id + (f" at revision {revision}" if revision else "")
    if isinstance(exc, RevisionNotFoundError):
        msg = f"the hub repository {repo_id} has no revision {revision!r} (a branch, tag or commit)"
    elif isinstance(exc, GatedRepoError):
        msg = (
            f"{repo_id} is gated on the hub: accept its terms on https://huggingface.co/{repo_id} and log "
            "in (`hf auth login`, or set HF_TOKEN)"
        )
    elif isinstance(exc, RepositoryNotFoundError):
        msg = f"no hub repository {repo_id} (if it is private, log in: `hf auth login`, or set HF_TOKEN)"
    elif hub_constants.HF_HUB_OFFLINE or isinstance(exc, OfflineModeIsEnabled):
        msg = (
            f"{where} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids downloading it: download "
            f"it once with network access (`hf download {repo_id}`) or unset HF_HUB_OFFLINE"
        )
    elif isinstance(exc, LocalEntryNotFoundError):
        msg = f"could not reach the hub, and {where} is not in the local hub cache ({exc})"
    else:
        msg = f"could not resolve {where} on the hub or in the local cache: {exc}"
    parent = Path(repo_id).parent
    if parent != Path(".") and parent.is_dir():  # `runs/tsak` beside an existing `runs/`: a typo
        return InputError(f"no such directory {text} (read as a hub id: {msg})")
    return InputError(f"{text}: {msg}")


# --- what a report's inputs stand for ---------------------------------------------------------------
def config_name_or_path(directory: str | Path | None) -> str | None:
    """The `_name_or_path` of a model directory's config.json when it is a hub id (transformers writes
    the name the model was loaded from: a hub id, or a local path, which is left out)."""
    if directory is None:
        return None
    try:
        name = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and looks_like_hub_id(name) else None


def input_hub_id(info: Mapping[str, Any] | None) -> str | None:
    """The hub id a report input stands for: its own id for a hub input (one with a resolved revision, or
    a model in memory loaded from the hub: its `hub_id`), else a local model's `_name_or_path` when that
    is a hub id; None when unknown."""
    if not info:
        return None
    if info.get("revision"):
        return split_revision(str(info["path"]))[0]
    if info.get("hub_id"):
        return str(info["hub_id"])
    return config_name_or_path(info.get("local_dir"))


def display_name(info: Mapping[str, Any]) -> str:
    """How a card or a pushed report names an input: the hub id as given (`owner/name@rev`) for a hub
    input, the directory's basename for a local one (a local path means nothing on the Hub)."""
    path = str(info["path"])
    if info.get("revision") or info.get("hub_id"):
        return path
    return Path(path).name or path


def base_license(directory: str | Path | None) -> dict[str, str]:
    """The license fields (`license`, and `license_name` / `license_link` for `other`) that the base
    model's own README.md front matter names; empty when it has none (or no card)."""
    if directory is None or not (Path(directory) / "README.md").is_file():
        return {}
    try:
        meta = metadata_load(Path(directory) / "README.md") or {}
    except (OSError, ValueError, UnicodeDecodeError):  # a card that is not YAML: no license known
        return {}
    return {k: str(meta[k]) for k in LICENSE_FIELDS if isinstance(meta.get(k), str | int | float)}


def card_base(inputs: Mapping[str, Any], fallback: str | None = None) -> tuple[str | None, dict[str, str]]:
    """(hub id, license fields) of the base model an output belongs to: the aligned input's, or, without
    one (a merge from a sketch), the hub id `fallback` names (the task adapter's base_model_name_or_path)."""
    aligned = inputs.get("aligned")
    if aligned:
        return input_hub_id(aligned), base_license(aligned.get("local_dir"))
    if fallback:
        repo_id = split_revision(fallback)[0]
        return (repo_id if looks_like_hub_id(repo_id) else None), {}
    return None, {}


def card_metadata(kind: Kind, base: str | None, license_fields: Mapping[str, str]) -> ModelCardData:
    """The Hub metadata of an output: `base_model` with its relation (an adapter of the base; a full
    model is a fine-tune of it), the matching `base_model:<relation>:<id>` tag, the pipeline, the library
    that loads it and the base's license (Llama's license requires it on derivatives)."""
    relation = "adapter" if kind == "adapter" else "finetune"
    tags = ["safemerge", "safety", *(["lora"] if kind == "adapter" else [])]
    if base:
        tags.append(f"base_model:{relation}:{base}")
    data = ModelCardData(
        base_model=base,
        license=license_fields.get("license"),
        license_name=license_fields.get("license_name"),
        license_link=license_fields.get("license_link"),
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    if base:  # the Hub's key, not a typed field of ModelCardData: an extra key, as its kwargs are kept
        vars(data).update(base_model_relation=relation)
    return data


def render_card(data: ModelCardData, body: str) -> str:
    """README.md text: the front matter rendered by huggingface_hub, then `body`."""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
