"""On-disk cache of generations (and judge outputs), so an interrupted evaluation resumes.

One append-only JSONL file per (model, adapter, decoding settings) key under the cache directory
(default `$SAFEMERGE_CACHE/generations`); entries are keyed by the prompt's hash and may carry a `meta`
object (a generation's `truncated`). Lines cut off by a kill are ignored on reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safemerge.common.packaged import cache_root, is_packaged_alias, resolve_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
# Files of a model directory whose content keys its generations besides the weights: the architecture
# and the generation defaults (eos ids and the like; transformers merges them into every generate call).
CONFIG_FILES = ("config.json", "generation_config.json")


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def fingerprint_model(name: str) -> str:
    """A local model: its config.json and generation_config.json plus weight file names, sizes and
    mtimes; a hub id: the id and the revision (commit) of its snapshot in the local hub cache, the one
    that was loaded (`@unknown` when none is cached). The tokenizer and chat template are keyed apart
    (`tokenizer_fingerprint`), from the tokenizer the backend really uses."""
    path = Path(resolve_model(name)) if is_packaged_alias(name) else Path(name)
    if not path.is_dir():
        return f"hub:{name}@{hub_revision(name) or 'unknown'}"
    parts = [(path / f).read_text(encoding="utf-8") if (path / f).is_file() else "" for f in CONFIG_FILES]
    for f in sorted(path.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "dir:" + _sha("\n".join(parts))


def hub_revision(repo_id: str) -> str | None:
    """The commit of the snapshot of `repo_id` in the local hub cache that `main` points to (what
    transformers and vLLM load); None when it is not cached. Reads the cache only, never the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id: nothing cached under it
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a tokenizer does to text: its whole definition (a fast tokenizer's JSON: vocabulary,
    merges, normaliser, added tokens; else its vocabulary), its special tokens and its chat template.
    "none" without a tokenizer."""
    if tokenizer is None:
        return "none"
    to_str = getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)
    body = (
        call_free_definition(str(to_str()))
        if callable(to_str)
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    extra = {
        "class": type(tokenizer).__name__,
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _sha(body + json.dumps(extra, sort_keys=True, default=str))


def call_free_definition(definition: str) -> str:
    """A fast tokenizer's JSON without the padding and truncation that transformers writes into it on
    each padded call (they are set per call, so they decide nothing): the key of a tokenizer must not
    depend on whether it has been called before. A tokenizer loaded without them keeps its JSON as is."""
    from tokenizers import Tokenizer  # lazy: only fast tokenizers reach here, and they bring it

    copy = Tokenizer.from_str(definition)
    copy.no_padding()
    copy.no_truncation()
    return str(copy.to_str())


def chat_template_fingerprint(tokenizer: Any, chat: bool) -> str | None:
    """A hash of the chat template the prompts are rendered with; None when they are not (`chat` off)."""
    if not chat:
        return None
    return _sha(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str))


def fingerprint_adapter(path: str | None) -> str:
    """An adapter: hash of its config and weights (content, so a retrained adapter never hits the cache)."""
    if path is None:
        return "none"
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        f = Path(path) / name
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


class Cache:
    """prompt -> output for one key; `folder=None` keeps it in memory only (no resume)."""

    def __init__(self, folder: Path | None, key: dict[str, Any]) -> None:
        self.key = key
        self.entries: dict[str, str] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        self.path: Path | None = None
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        digest = _sha(json.dumps(key, sort_keys=True))
        self.path = folder / f"{digest}.jsonl"
        meta = folder / f"{digest}.key.json"
        if not meta.exists():
            meta.write_text(json.dumps(key, indent=1, sort_keys=True), encoding="utf-8")
        if self.path.exists():
            raw = self.path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # terminate a line cut off by a kill
                with self.path.open("ab") as fb:
                    fb.write(b"\n")
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["h"]] = rec["out"]
                    if isinstance(rec.get("meta"), dict):
                        self.meta[rec["h"]] = rec["meta"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by a kill

    def get(self, text: str) -> str | None:
        return self.entries.get(_sha(text))

    def get_meta(self, text: str) -> dict[str, Any]:
        """What was stored beside an output (empty when nothing was)."""
        return self.meta.get(_sha(text), {})

    def put_many(
        self, texts: Sequence[str], outputs: Sequence[str], meta: Sequence[dict[str, Any]] | None = None
    ) -> None:
        """Store outputs (each with its `meta`, if given) and append them to disk (flushed and synced: a
        kill loses at most this batch)."""
        metas = list(meta) if meta is not None else [{}] * len(texts)
        lines = []
        for t, o, m in zip(texts, outputs, metas, strict=True):
            h = _sha(t)
            self.entries[h] = o
            rec: dict[str, Any] = {"h": h, "out": o}
            if m:
                self.meta[h] = dict(m)
                rec["meta"] = m
            lines.append(json.dumps(rec) + "\n")
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())


def default_cache_dir() -> Path:
    return cache_root() / "generations"
