"""Lazy, name-addressed tensor reads from Hugging Face checkpoints (local directory or hub id).

A `Checkpoint` opens safetensors files (single `model.safetensors` or the shards listed in
`model.safetensors.index.json`) and reads one tensor at a time, so memory holds only the tensors in use.
Pickle checkpoints (`*.bin`, `*.pt`) can run code when loaded: they are refused unless the caller opts in,
and then read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from safemerge.common.errors import InputError
from safemerge.common.packaged import is_packaged_alias, resolve_model
from safemerge.engine.hub import hub_error, looks_like_hub_id, split_revision

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# safetensors' names of torch dtypes, so a pickle checkpoint reports its dtypes as a safetensors one does.
SAFETENSORS_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Files worth fetching from the hub for a base model: weights, configs, tokenizer, and the model card
# (README.md: its license is carried to the cards of safemerge's outputs, engine/hub.py).
HUB_PATTERNS = [
    "*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja", "README.md"
]  # fmt: skip


def resolve_local_dir(
    name_or_path: str | Path, revision: str | None = None, allow_pickle: bool = False
) -> tuple[Path, str | None]:
    """Return a local directory for a checkpoint and its hub revision (None for local directories).

    A path that exists is used as it is (even one containing `@`). Anything else must be a hub id,
    `owner/name` or `owner/name@revision` (a branch, tag or commit; `revision` is the same pin given
    apart), resolved with `huggingface_hub.snapshot_download`, fetching only safetensors, json, tokenizer
    files and the card (and pickle weights only when `allow_pickle`); with HF_HUB_OFFLINE=1 this reads
    the local cache. The revision returned is the commit the snapshot holds.
    """
    if is_packaged_alias(str(name_or_path)):  # the model that ships inside a package (docs/method.md §8)
        name_or_path = resolve_model(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{path} is not a directory (expected a checkpoint or adapter directory)")
        return path, None
    text = str(name_or_path)
    repo_id, pinned = split_revision(text)
    if not looks_like_hub_id(repo_id):
        raise InputError(f"{text}: no such directory, and it is not a hub id of the form owner/name")
    if pinned and revision and pinned != revision:
        raise InputError(f"{text} names revision {pinned!r}, but revision {revision!r} was asked for")
    wanted = pinned or revision
    try:
        patterns = HUB_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
        local = snapshot_download(repo_id=repo_id, revision=wanted, allow_patterns=patterns)
    except Exception as exc:  # network, auth, offline cache miss: all bad input from the user's side
        raise hub_error(text, repo_id, wanted, exc) from exc
    local_path = Path(local)
    return local_path, local_path.name


def _read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header, so a truncated file fails with its name."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise InputError(f"{path}: corrupted safetensors file (header length {n} beyond file size)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: corrupted safetensors header ({exc})") from exc
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            if not 0 <= begin <= stop:
                raise ValueError(f"data offsets {begin}, {stop}")
            end = max(end, stop)
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise InputError(f"{path}: corrupted safetensors header entry for {key!r}") from exc
    if 8 + n + end > size:
        raise InputError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return dict(header)


class Checkpoint:
    """Read tensors by name from a checkpoint directory, lazily, one tensor at a time."""

    def __init__(self, directory: str | Path, *, allow_pickle: bool = False, label: str = "model"):
        self.directory = Path(directory)
        self.label = label
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        self._nbytes: dict[str, int] = {}  # bytes on disk (safetensors data offsets; numel × size)
        self._pickle_state: dict[str, torch.Tensor] | None = None
        self.headers: dict[Path, dict[str, Any]] = {}
        index = self.directory / SAFE_INDEX
        single = self.directory / SAFE_SINGLE
        if index.exists():
            self._init_index(index)
        elif single.exists():
            self._init_files([single])
        else:
            others = sorted(self.directory.glob("*.safetensors"))
            if others and not (self.directory / "adapter_model.safetensors").exists():
                self._init_files(others)
            else:
                self._init_pickle(allow_pickle)

    # --- construction -------------------------------------------------------------------------
    def _init_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index}: not a valid safetensors index (needs a 'weight_map')") from exc
        files = sorted({self.directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise InputError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        self._init_files(files)
        for name, fname in weight_map.items():
            if name not in self._files:
                raise InputError(f"{index} maps {name!r} to {fname}, but that shard has no such tensor")

    def _init_files(self, files: list[Path]) -> None:
        for f in files:
            header = _read_safetensors_header(f)
            self.headers[f] = header
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                self._files[name] = f
                self._shapes[name] = tuple(int(x) for x in info["shape"])
                self._dtypes[name] = str(info["dtype"])
                begin, end = (int(x) for x in info["data_offsets"])  # checked when the header was read
                self._nbytes[name] = end - begin

    def _init_pickle(self, allow_pickle: bool) -> None:
        candidates = [self.directory / PICKLE_SINGLE, self.directory / PICKLE_INDEX]
        candidates += sorted(self.directory.glob("*.bin")) + sorted(self.directory.glob("*.pt"))
        found = [c for c in candidates if c.exists()]
        if not found:
            raise InputError(
                f"{self.directory}: no model.safetensors, {SAFE_INDEX} or *.safetensors found ({self.label})"
            )
        if not allow_pickle:
            raise InputError(
                f"{self.directory} has only pickle weights ({found[0].name}); pickle files can execute code "
                "when loaded. Convert the checkpoint to safetensors, or pass --allow-pickle to load it "
                "with torch.load(weights_only=True)"
            )
        state: dict[str, torch.Tensor] = {}
        if (self.directory / PICKLE_INDEX).exists():
            weight_map = json.loads((self.directory / PICKLE_INDEX).read_text())["weight_map"]
            files = sorted({self.directory / f for f in weight_map.values()})
        else:
            files = [f for f in found if f.suffix in (".bin", ".pt")][:1]
        for f in files:
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise InputError(f"{f}: cannot be loaded with torch.load(weights_only=True): {exc}") from exc
            state.update(loaded)
        self._pickle_state = state
        for name, t in state.items():
            self._files[name] = files[0]
            self._shapes[name] = tuple(t.shape)
            self._dtypes[name] = SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype).removeprefix("torch."))
            self._nbytes[name] = t.numel() * t.element_size()

    # --- queries ------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[self._check(name)]

    def dtype_name(self, name: str) -> str:
        """The on-disk dtype as safetensors spells it (e.g. 'BF16', 'F32')."""
        return self._dtypes[self._check(name)]

    def nbytes(self, name: str) -> int:
        """The tensor's size in bytes as stored (any dtype, float8 and integer ones included)."""
        return self._nbytes[self._check(name)]

    def file_of(self, name: str) -> Path:
        return self._files[self._check(name)]

    def _check(self, name: str) -> str:
        if name not in self._files:
            raise InputError(f"tensor {name!r} is missing from the {self.label} checkpoint {self.directory}")
        return name

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (in its on-disk dtype)."""
        self._check(name)
        if self._pickle_state is not None:
            return self._pickle_state[name]
        f = self._files[name]
        try:
            # Open per read: the file is memory-mapped while open, and a long-lived handle would keep
            # every page read so far resident (RSS growing with the number of layers).
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise InputError(f"{f}: cannot read tensor {name!r}: {exc}") from exc

    def get_float(self, name: str) -> torch.Tensor:
        """Read one tensor converted to float32, refusing NaN or Inf values."""
        t = self.get(name).to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise InputError(
                f"tensor {name!r} of the {self.label} checkpoint {self.directory} has NaN or Inf"
            )
        return t

    def fingerprint(self) -> str:
        """A cheap identity of the checkpoint: sha256 over every file's header and size.

        Hashing the full content of a 7B checkpoint costs a full read; this fingerprint changes whenever
        a tensor's name, shape, dtype or file layout changes. `content_sha256` hashes everything.
        """
        h = hashlib.sha256()
        for f in sorted(set(self._files.values())):
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            h.update(json.dumps(self.headers.get(f, {}), sort_keys=True).encode())
        return h.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Full sha256 of one file (used for adapters, which are small)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def candidate_keys(module_path: str, suffix: str = "weight") -> list[str]:
    """Checkpoint keys that may hold the weight of `module_path`.

    PEFT names modules from the task model (`model.layers.3...` for Llama, `transformer.h.3...` for GPT-2),
    while some checkpoints store them without the base-model prefix (GPT-2's `h.3...`). The exact name
    comes first; dropping the first component is the only fallback (never substring matching).
    """
    names = [f"{module_path}.{suffix}"]
    head, _, rest = module_path.partition(".")
    if rest and head in ("model", "transformer", "gpt_neox", "backbone"):
        names.append(f"{rest}.{suffix}")
    return names


def find_module_weight(ckpt: Checkpoint, module_path: str) -> str:
    """The checkpoint key of a module's weight, or a clear error listing near names."""
    for key in candidate_keys(module_path):
        if key in ckpt:
            return key
    leaf = module_path.rsplit(".", 1)[-1]
    near = [k for k in ckpt.keys() if k.endswith(f"{leaf}.weight")][:5]  # noqa: SIM118
    hint = f" (keys with the same leaf: {', '.join(near)})" if near else ""
    raise InputError(
        f"module {module_path!r}: no weight {module_path}.weight in the {ckpt.label} checkpoint "
        f"{ckpt.directory}{hint} — is the adapter for this architecture?"
    )
