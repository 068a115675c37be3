"""On-disk cache of generations (and judge outputs), so an interrupted evaluation resumes.

One append-only JSONL file per (model, adapter, decoding settings) key under the cache directory
(default `$SAFEMERGE_CACHE/generations`); entries are keyed by the prompt's hash. Lines cut off by a
kill are ignored on reading.
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


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def fingerprint_model(name: str) -> str:
    """A local model: its config plus weight file names, sizes and mtimes; a hub id: the id itself."""
    path = Path(resolve_model(name)) if is_packaged_alias(name) else Path(name)
    if not path.is_dir():
        return f"hub:{name}"
    parts = [(path / "config.json").read_text(encoding="utf-8") if (path / "config.json").is_file() else ""]
    for f in sorted(path.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES:
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "dir:" + _sha("\n".join(parts))


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
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by a kill

    def get(self, text: str) -> str | None:
        return self.entries.get(_sha(text))

    def put_many(self, texts: Sequence[str], outputs: Sequence[str]) -> None:
        """Store outputs and append them to disk (flushed and synced: a kill loses at most this batch)."""
        lines = []
        for t, o in zip(texts, outputs, strict=True):
            self.entries[_sha(t)] = o
            lines.append(json.dumps({"h": _sha(t), "out": o}) + "\n")
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())


def default_cache_dir() -> Path:
    return cache_root() / "generations"
