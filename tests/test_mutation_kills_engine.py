"""Tests written to kill the survivors of the mutation run of the engine modules (docs/testing.md,
"Mutation testing"); the same rules as tests/test_mutation_kills.py: each test names the mutants it was
written for and uses an independent oracle (a hand-derived value or a dense float64 computation written
here), never the helper under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from builders import edited_copy, pickle_copy, record_hub_downloads, save_adapter, save_pair
from safetensors.torch import load_file, save_file
from test_fullft import save_finetune

from safemerge.common.errors import InputError
from safemerge.engine import checkpoint
from safemerge.engine.checkpoint import (
    Checkpoint,
    _read_safetensors_header,
    candidate_keys,
    find_module_weight,
    resolve_local_dir,
)
from safemerge.engine.config import MergeConfig, MergeOptions, ScanConfig, parse_weights
from safemerge.engine.lora import LoraFactors
from safemerge.engine.pipeline import (
    _listed,
    check_full_options,
    merge,
    merge_modules,
    module_similarity,
    output_scaling,
    resolve_device,
    run_scan,
    scan,
)
from safemerge.engine.report import ModuleRecord, Report
from safemerge.engine.subspace import SubspaceConfig, subspace
from safemerge.engine.writer import parse_size, write_model


# --- engine/checkpoint.py ------------------------------------------------------------------------------
def _weights(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer{seed}.weight": torch.randn(3, 2, generator=gen).to(dtype)}


def test_pickle_weights_take_precedence_over_other_pickles(tmp_path: Path) -> None:
    """`Checkpoint._init_pickle` 4, 43: a training directory also holds other pickles (optimizer state,
    training arguments); `pytorch_model.bin` is read even when another `.bin` sorts before it, and only
    one unindexed file is read."""
    torch.save(_weights(1), tmp_path / "a_optimizer.bin")
    torch.save(_weights(2), tmp_path / "pytorch_model.bin")
    torch.save(_weights(3), tmp_path / "training_args.bin")
    ckpt = Checkpoint(tmp_path, allow_pickle=True)
    assert ckpt.keys() == ["layer2.weight"]
    assert torch.equal(ckpt.get("layer2.weight"), _weights(2)["layer2.weight"])
    assert ckpt.file_of("layer2.weight") == tmp_path / "pytorch_model.bin"


@pytest.mark.parametrize("name", ["weights.bin", "weights.pt"])
def test_pickle_of_any_name_is_found(tmp_path: Path, name: str) -> None:
    """`Checkpoint._init_pickle` 9, 10, 13, 14, 41, 42, 66-73: `*.bin` and `*.pt` files of any name are
    weights;
    dtypes are reported with safetensors' names (a bfloat16 tensor is 'BF16', as in a safetensors file),
    which the sketch's memory estimate reads (a real bug: it read 'bfloat16' and counted 4 bytes)."""
    torch.save(_weights(4, torch.bfloat16), tmp_path / name)
    ckpt = Checkpoint(tmp_path, allow_pickle=True)
    assert ckpt.keys() == ["layer4.weight"]
    assert ckpt.dtype_name("layer4.weight") == "BF16"
    assert ckpt.get("layer4.weight").dtype == torch.bfloat16
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / name)  # no safetensors name: torch's
    assert Checkpoint(tmp_path, allow_pickle=True).dtype_name("c") == "complex64"


def test_pickle_saved_from_gpu_tensors_loads_on_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Checkpoint._init_pickle` 46, 48: a checkpoint saved on a GPU records each storage's device
    ("cuda:0"); without `map_location="cpu"` torch.load would put it back on the GPU (or fail where there
    is none). The file is written here as a GPU machine writes it: torch.save with the storages' location
    tag reading "cuda:0" (CPU tensors underneath, so no GPU is needed to write it)."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(_weights(7), tmp_path / "pytorch_model.bin")
    monkeypatch.undo()
    assert b"cuda:0" in (tmp_path / "pytorch_model.bin").read_bytes()
    if not torch.cuda.is_available():  # the file really asks for the GPU: plain torch.load refuses it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    got = Checkpoint(tmp_path, allow_pickle=True).get("layer7.weight")
    assert got.device.type == "cpu" and torch.equal(got, _weights(7)["layer7.weight"])


def test_sharded_pickle_reads_every_shard_of_its_index(tmp_path: Path) -> None:
    """`Checkpoint._init_pickle` 29-36: `pytorch_model.bin.index.json` names the shards; every tensor of
    every shard is read (the unindexed rule would read only the first file)."""
    shards = {
        "pytorch_model-00001-of-00002.bin": _weights(5),
        "pytorch_model-00002-of-00002.bin": _weights(6),
    }
    weight_map = {}
    for fname, state in shards.items():
        torch.save(state, tmp_path / fname)
        weight_map.update(dict.fromkeys(state, fname))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = Checkpoint(tmp_path, allow_pickle=True)
    assert sorted(ckpt.keys()) == ["layer5.weight", "layer6.weight"]
    assert torch.equal(ckpt.get("layer6.weight"), _weights(6)["layer6.weight"])
    assert ckpt.dtype_name("layer6.weight") == "F32"


def test_checkpoint_refusals_are_worded(tmp_path: Path) -> None:
    """`Checkpoint._init_pickle` 17, 20-26: the two refusals, word for word (the file named is the first
    pickle found: a lone `extra.pt`, then `pytorch_model.bin` before any other)."""
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path, label="task model")
    assert (
        str(info.value)
        == f"{tmp_path}: no model.safetensors, model.safetensors.index.json or *.safetensors found "
        "(task model)"
    )
    torch.save(_weights(7), tmp_path / "extra.pt")
    with pytest.raises(InputError, match=r"has only pickle weights \(extra\.pt\)"):
        Checkpoint(tmp_path)
    torch.save(_weights(8), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path)
    assert str(info.value) == (
        f"{tmp_path} has only pickle weights (pytorch_model.bin); pickle files can execute code when "
        "loaded. Convert the checkpoint to safetensors, or pass --allow-pickle to load it with "
        "torch.load(weights_only=True)"
    )


# --- engine/writer.py and engine/config.py -----------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("3KiB", 3 * 1024),
        ("2MiB", 2 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("3KB", 3_000),
        ("5MB", 5_000_000),
        ("2GB", 2_000_000_000),
        ("7B", 7),
        ("123", 123),
        (" 1.5 gb ", 1_500_000_000),
        ("500mib", 500 * 1024 * 1024),
    ],
)
def test_parse_size_by_hand(text: str, size: int) -> None:
    """`writer.parse_size` 2-22: every unit, case-insensitive, decimal and binary (values by hand)."""
    assert parse_size(text) == size


def test_parse_size_and_weights_refusals_are_worded() -> None:
    """`writer.parse_size`'s and `config.parse_weights` 7, 10 messages, word for word."""
    for bad in ("2 jiggabytes", "twoGB"):  # the second ends in a unit whose number does not parse
        with pytest.raises(InputError) as info:
            parse_size(bad)
        assert str(info.value) == f"max_shard_size: cannot parse {bad!r} (use e.g. 2GB or 500MiB)"
    for bad in ("a,b", "0.8", "1,2,3"):
        with pytest.raises(ValueError) as err:
            parse_weights(bad)
        assert str(err.value) == f"weights must be two numbers like 0.8,0.2 (got {bad!r})"
    assert parse_weights(" 0.7, 0.3") == (0.7, 0.3)


def test_merge_into_a_bfloat16_base_keeps_bfloat16(tmp_path: Path) -> None:
    """`writer.write_merged_model` 11, 16: the full model of `--merge-into-base` keeps the aligned model's
    dtype for merged weights and for the adapter's modules_to_save (saved in float32 here); values
    against W_al + s·B A formed in float64 here (bfloat16 rounding: relative 2^-8)."""
    al, un = save_pair(tmp_path, "llama", torch.bfloat16)
    task = save_adapter(al, tmp_path / "task", seed=1, r=4, alpha=8, modules_to_save=["lm_head"])
    safety = save_adapter(al, tmp_path / "safety", seed=2, r=4, alpha=8)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extra tensors are carried through (a warning says so)
        merge(MergeConfig.from_flat(aligned=str(al), unaligned=str(un), task_adapter=str(task),
                                    safety_adapter=str(safety), out=str(out), merge_into_base=True,
                                    plot=False, threshold=0.0))  # fmt: skip
    full = load_file(out / "full_model" / "model.safetensors")
    base = load_file(al / "model.safetensors")
    assert {t.dtype for t in full.values()} == {torch.bfloat16}
    lora = load_file(task / "adapter_model.safetensors")
    (head_key,) = [k for k in lora if "lm_head" in k]
    assert lora[head_key].dtype == torch.float32
    assert torch.equal(full["lm_head.weight"], lora[head_key].to(torch.bfloat16))
    key = "model.layers.0.self_attn.q_proj"
    a = lora[f"base_model.model.{key}.lora_A.weight"].to(torch.float64)
    b = lora[f"base_model.model.{key}.lora_B.weight"].to(torch.float64)
    want = base[key + ".weight"].to(torch.float64) + 2.0 * (b @ a)  # scaling = alpha / r = 2
    torch.testing.assert_close(full[key + ".weight"].to(torch.float64), want, rtol=2**-8, atol=1e-6)


def test_get_float_widens_and_names_a_non_finite_tensor(tmp_path: Path) -> None:
    """`Checkpoint.get_float` 2, 7: a bfloat16 tensor comes back as float32 (same values), and NaN is
    refused with a message naming tensor, label and directory."""
    tmp_path.mkdir(exist_ok=True)
    good = torch.tensor([[1.5, -2.25]], dtype=torch.bfloat16)
    save_file({"w": good, "bad": torch.tensor([float("nan")])}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path, label="unaligned model")
    got = ckpt.get_float("w")
    assert got.dtype == torch.float32 and got.tolist() == [[1.5, -2.25]]
    with pytest.raises(InputError) as info:
        ckpt.get_float("bad")
    assert str(info.value) == f"tensor 'bad' of the unaligned model checkpoint {tmp_path} has NaN or Inf"


def _tensor(fill: float) -> torch.Tensor:
    return torch.full((10,), fill)  # 10 float32 values: 40 bytes


def test_write_model_shards_greedily_in_file_order_with_an_exact_index(tmp_path: Path) -> None:
    """`writer.write_model` 4, 5, 10, 26, 29, 31, 33, 62, 63, 67, 68, 77, 78, 92, 93, 102-105: the shard
    layout worked out by hand. Source: two files, `a.safetensors` holding "z" and `b.safetensors` holding
    "a", "b", "c" (tensors are written file by file, then by name: z, a, b, c), every tensor 40 bytes; a
    limit of 80 bytes keeps a shard while it fits (80 ≤ 80), so the shards are [z, a] and [b, c]."""
    src = tmp_path / "src"
    src.mkdir()
    save_file({"z": _tensor(1.0)}, src / "a.safetensors")
    save_file({"a": _tensor(2.0), "b": _tensor(3.0), "c": _tensor(4.0)}, src / "b.safetensors")
    out = tmp_path / "nested" / "out"  # its parent does not exist yet
    write_model(Checkpoint(src), lambda name, t: t * 2, out, "80B")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    first, second = (load_file(out / n) for n in names[:2])
    assert sorted(first) == ["a", "z"] and sorted(second) == ["b", "c"]
    assert torch.equal(first["z"], _tensor(2.0)) and torch.equal(second["b"], _tensor(6.0))
    assert (out / "model.safetensors.index.json").read_text() == (
        "{\n"
        '  "metadata": {\n'
        '    "total_size": 160\n'
        "  },\n"
        '  "weight_map": {\n'
        '    "a": "model-00001-of-00002.safetensors",\n'
        '    "b": "model-00002-of-00002.safetensors",\n'
        '    "c": "model-00002-of-00002.safetensors",\n'
        '    "z": "model-00001-of-00002.safetensors"\n'
        "  }\n"
        "}\n"
    )
    single = tmp_path / "single"
    write_model(Checkpoint(src), lambda name, t: t, single, "160B")  # everything fits: one file, no index
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]


def test_safetensors_index_refusals_are_worded(tmp_path: Path) -> None:
    """`Checkpoint._init_index` 5, 9: an index without a weight map, and one naming a missing shard."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}}')
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path)
    assert str(info.value) == f"{index}: not a valid safetensors index (needs a 'weight_map')"
    index.write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path)
    assert (
        str(info.value)
        == f"{index} lists shards that do not exist: {tmp_path / 'model-00001-of-00002.safetensors'}"
    )
    index.write_text(json.dumps({"weight_map": {"w": "one.safetensors", "v": "two.safetensors"}}))
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path)
    assert str(info.value) == (
        f"{index} lists shards that do not exist: {tmp_path / 'one.safetensors'}, "
        f"{tmp_path / 'two.safetensors'}"
    )
    save_file({"w": _tensor(1.0)}, tmp_path / "one.safetensors")
    save_file({"u": _tensor(1.0)}, tmp_path / "two.safetensors")
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path)
    assert str(info.value) == f"{index} maps 'v' to two.safetensors, but that shard has no such tensor"


def test_a_missing_module_weight_lists_up_to_five_keys_of_its_leaf(tmp_path: Path) -> None:
    """`checkpoint.find_module_weight` 3-13: the hint lists the first five keys ending in the module's
    last name component (the adapter may be for another architecture's naming)."""
    keys = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(7)] + [
        "model.layers.0.mlp.up_proj.weight"
    ]
    save_file({k: _tensor(0.0) for k in keys}, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path, label="aligned model")
    with pytest.raises(InputError) as info:
        find_module_weight(ckpt, "transformer.h.0.attn.q_proj")
    near = ", ".join(keys[:5])
    assert str(info.value) == (
        f"module 'transformer.h.0.attn.q_proj': no weight transformer.h.0.attn.q_proj.weight in the aligned "
        f"model checkpoint {tmp_path} (keys with the same leaf: {near}) — is the adapter for this "
        "architecture?"
    )
    with pytest.raises(InputError) as info:
        find_module_weight(ckpt, "h.0.attn.c_attn")
    assert str(info.value).endswith(f"checkpoint {tmp_path} — is the adapter for this architecture?")


def test_candidate_keys_drop_only_a_known_base_model_prefix() -> None:
    """`checkpoint.candidate_keys` 8, 10-17: the fallback drops the first component only when it is a
    base-model
    prefix (model, transformer, gpt_neox, backbone) and something follows it (lists by hand)."""
    assert candidate_keys("model.layers.0.q_proj") == [
        "model.layers.0.q_proj.weight",
        "layers.0.q_proj.weight",
    ]
    assert candidate_keys("transformer.h.1.attn.c_attn", "U") == [
        "transformer.h.1.attn.c_attn.U",
        "h.1.attn.c_attn.U",
    ]
    assert candidate_keys("gpt_neox.layers.0.attention.dense")[1] == "layers.0.attention.dense.weight"
    assert candidate_keys("backbone.layers.0.mixer.in_proj")[1] == "layers.0.mixer.in_proj.weight"
    assert candidate_keys("layers.0.q_proj") == ["layers.0.q_proj.weight"]
    assert candidate_keys("model") == ["model.weight"]


# --- safetensors headers, written byte by byte (format: 8-byte little-endian header length, JSON header,
# data; every tensor's data_offsets index into the data) --------------------------------------------------
def _raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def test_safetensors_header_checks_at_their_boundaries(tmp_path: Path) -> None:
    """`checkpoint._read_safetensors_header` 10, 17-24, 30, 34, 44-46, 50-52: each refusal word for word,
    and the two boundaries that are valid (a header that fills the file; data that ends at the file's
    end)."""
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: truncated safetensors file (no header)"
    assert _read_safetensors_header(_raw(f, b"{}")) == {}  # n = size - 8 exactly, nothing after it
    _raw(f, b"{}  ", length=5)  # n = 5 > size - 8 = 4
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: corrupted safetensors file (header length 5 beyond file size)"
    f.write_bytes(b"\xff" * 8 + b"{}")  # an unsigned length of 2^64 - 1, not -1
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: corrupted safetensors file (header length {2**64 - 1} beyond file size)"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    header = json.dumps({"__metadata__": {"format": "pt"}, "w": entry}).encode()
    assert _read_safetensors_header(_raw(f, header, bytes(8)))["w"] == entry  # data ends at the end
    _raw(f, header, bytes(5))  # 3 bytes short: the metadata entry comes first and is skipped, not the end
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    size = 8 + len(header) + 5
    assert str(info.value) == f"{f}: truncated safetensors file ({size} bytes, header promises {size + 3})"
    _raw(f, json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode())
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: corrupted safetensors header entry for 'w'"


def test_safetensors_header_length_cap_is_100_mb(tmp_path: Path) -> None:
    """`checkpoint._read_safetensors_header` 22, 23: a header of exactly 100,000,000 bytes is read (here it
    is not JSON), one byte more is refused as corrupted. Sparse files: no disk is used."""
    f = tmp_path / "big.safetensors"
    with f.open("wb") as fh:
        fh.write(struct.pack("<Q", 100_000_000))
        fh.truncate(8 + 100_000_000)
    with pytest.raises(InputError, match="corrupted safetensors header \\("):
        _read_safetensors_header(f)
    with f.open("r+b") as fh:
        fh.write(struct.pack("<Q", 100_000_001))
        fh.truncate(8 + 100_000_001)
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: corrupted safetensors file (header length 100000001 beyond file size)"


def test_checkpoint_files_dtypes_and_refusals(tmp_path: Path) -> None:
    """`Checkpoint.__init__` 18, 21, 22, 24-28, `_init_files` 15, `_check` 2, `get` 16: a checkpoint of
    safetensors files with other names is read (not when it is an adapter directory); dtypes keep
    safetensors' names; a missing tensor and an unreadable one are named."""
    save_file({"w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "weights.safetensors")
    ckpt = Checkpoint(tmp_path, label="aligned model")
    assert ckpt.keys() == ["w"] and ckpt.dtype_name("w") == "BF16"
    with pytest.raises(InputError) as info:
        ckpt.get("v")
    assert str(info.value) == f"tensor 'v' is missing from the aligned model checkpoint {tmp_path}"
    save_file({"a": torch.ones(2)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(InputError, match=r"no model\.safetensors"):
        Checkpoint(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    header = json.dumps({"w": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}).encode()
    _raw(odd / "model.safetensors", header, bytes(8))
    with pytest.raises(InputError) as info:
        Checkpoint(odd).get("w")
    assert str(info.value).startswith(f"{odd / 'model.safetensors'}: cannot read tensor 'w': ")


def test_checkpoint_defaults_refuse_pickle_and_name_the_checkpoint(tmp_path: Path) -> None:
    """`Checkpoint.__init__` 1-3: by default pickle is refused and messages say "model checkpoint"."""
    torch.save(_weights(1), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="only pickle weights"):
        Checkpoint(tmp_path)
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError) as info:
        Checkpoint(tmp_path).get("v")
    assert str(info.value) == f"tensor 'v' is missing from the model checkpoint {tmp_path}"


def test_fingerprint_is_the_documented_hash(tmp_path: Path) -> None:
    """`Checkpoint.fingerprint` 13, 15: sketches store it (docs/subspace.md), so its formula must not
    drift: sha256 over each weight file, in order, of its name, its size in bytes and its header as JSON
    with sorted keys ({} for a pickle file, which has none). Computed here with hashlib and json."""
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    want = hashlib.sha256()
    want.update(b"model.safetensors")
    want.update(str(len(raw)).encode())
    want.update(json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True).encode())
    assert Checkpoint(tmp_path).fingerprint() == want.hexdigest()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(_weights(2), pickled / "pytorch_model.bin")
    size = (pickled / "pytorch_model.bin").stat().st_size
    want = hashlib.sha256(b"pytorch_model.bin" + str(size).encode() + b"{}")
    assert Checkpoint(pickled, allow_pickle=True).fingerprint() == want.hexdigest()


def test_resolve_local_dir_aliases_and_hub_patterns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`checkpoint.resolve_local_dir` 1-6, 10, 13, 15-17, 23-37: the packaged model's alias resolves to its
    directory; a file is not a checkpoint; a name that starts like a path or is not owner/name is refused
    before the hub is asked; a hub id is fetched with the revision asked for and the documented patterns
    (pickle files only when allowed). `snapshot_download` is replaced by a recorder."""
    monkeypatch.setattr(
        checkpoint, "resolve_model", lambda name: str(tmp_path) if name == "smollm2" else name
    )
    assert resolve_local_dir("smollm2") == (tmp_path, None)
    calls: list[dict] = []
    snapshot = tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)

    def fake_download(**kwargs: object) -> str:
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(checkpoint, "snapshot_download", fake_download)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError) as info:
        resolve_local_dir(tmp_path / "file")
    assert (
        str(info.value)
        == f"{tmp_path / 'file'} is not a directory (expected a checkpoint or adapter directory)"
    )
    for name in ("./ab", "/ab", "~/ab", "a/b/c", "ab"):
        with pytest.raises(InputError) as info:
            resolve_local_dir(name)
        assert str(info.value) == f"{name}: no such directory, and it is not a hub id of the form owner/name"
    assert calls == []
    assert resolve_local_dir("owner/name") == (snapshot, "abc123")
    resolve_local_dir("owner/name", revision="v2", allow_pickle=True)
    patterns = [
        "*.safetensors",
        "*.json",
        "tokenizer*",
        "*.model",
        "*.txt",
        "*.tiktoken",
        "*.jinja",
        "README.md",
    ]
    assert calls == [
        {"repo_id": "owner/name", "revision": None, "allow_patterns": patterns},
        {"repo_id": "owner/name", "revision": "v2", "allow_patterns": [*patterns, "*.bin", "*.pt"]},
    ]


# --- engine/pipeline.py ----------------------------------------------------------------------------------
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama pair, a task LoRA, a full-rank sketch of V (rank 64 ≥ every side: exact) and a
    rank-2 one."""
    root = tmp_path_factory.mktemp("kills_pipeline")
    al, un = save_pair(root, "llama", torch.float32)
    task = save_adapter(al, root / "task", seed=1, r=4, alpha=8)
    sketch = root / "sketch"
    subspace(SubspaceConfig(aligned=str(al), unaligned=str(un), rank=64, out=str(sketch)))
    subspace(SubspaceConfig(aligned=str(al), unaligned=str(un), rank=2, out=str(root / "sketch2")))
    return {"aligned": al, "unaligned": un, "task": task, "sketch": sketch, "sketch2": root / "sketch2"}


def test_listed_names_every_module() -> None:
    """`pipeline._listed`: warnings list every name (the report must be complete), comma-separated."""
    assert _listed(["a", "b", "c", "d"]) == "a, b, c, d"
    assert _listed(["a", "b", "c", "d", "e"]) == "a, b, c, d, e"


def test_full_merge_option_refusals_are_worded() -> None:
    """`pipeline.check_full_options` 5, 6, 9-14: the options a full fine-tune has no use for."""
    cases = [
        (
            {"mode": "peft-linear"},
            "`mode` peft-linear mixes LoRA factors: a full fine-tune (`task_model`) has none",
        ),
        ({"rank": 8}, "`rank` sets a LoRA output rank: the output of a full fine-tune is a full model"),
        (
            {"merge_into_base": True},
            "`merge_into_base` does not apply to `task_model`: the output is already a full model",
        ),
    ]
    for options, message in cases:
        with pytest.raises(InputError) as info:
            check_full_options(MergeOptions(**options))
        assert str(info.value) == message


def test_a_non_finite_unaligned_weight_is_named(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._check_finite_inputs` 1, 2, 5: a NaN in the unaligned model (the second tensor checked)
    is named with its checkpoint's directory."""
    bad = tmp_path / "unaligned"
    key = "model.layers.1.self_attn.v_proj.weight"
    edited_copy(lora_env["unaligned"], bad, lambda t: t[key].__setitem__((0, 0), float("inf")))
    with pytest.raises(InputError) as info:
        scan(ScanConfig.from_flat(aligned=str(lora_env["aligned"]), unaligned=str(bad),
                                  task_adapter=str(lora_env["task"]), plot=False))  # fmt: skip
    assert str(info.value) == f"tensor {key!r} of unaligned {bad} has NaN or Inf"


def test_report_describes_the_sketch_it_used(lora_env: dict[str, Path]) -> None:
    """`pipeline.sketch_info` 10-36: the report's `inputs.subspace` holds the sketch's path, directory, K,
    layout and the two models' path / revision / fingerprint, read here from subspace.json."""
    meta = json.loads((lora_env["sketch"] / "subspace.json").read_text())
    report = scan(ScanConfig.from_flat(subspace=str(lora_env["sketch"]), task_adapter=str(lora_env["task"]),
                                       plot=False))  # fmt: skip
    info = report.inputs["subspace"]
    assert info == {
        "path": str(lora_env["sketch"]),
        "local_dir": str(lora_env["sketch"]),
        "rank": 64,
        "layout": "linear",
        "aligned": {k: meta["aligned"][k] for k in ("path", "revision", "fingerprint")},
        "unaligned": {k: meta["unaligned"][k] for k in ("path", "revision", "fingerprint")},
    }
    assert info["aligned"]["fingerprint"] and info["aligned"]["path"] == str(lora_env["aligned"])


def test_a_sketch_of_other_shapes_is_refused_naming_the_module(
    lora_env: dict[str, Path], tmp_path: Path
) -> None:
    """`pipeline._sketch_similarities` 20, 21: a sketch whose module shape differs from the adapter's."""
    sketch = tmp_path / "sketch"
    shutil.copytree(lora_env["sketch"], sketch)
    meta = json.loads((sketch / "subspace.json").read_text())
    module = next(m for m in meta["modules"] if m.endswith("q_proj"))  # a module the task LoRA has
    d_out, d_in = meta["modules"][module]["shape"]
    meta["modules"][module]["shape"] = [d_out + 1, d_in]
    (sketch / "subspace.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as info:
        scan(ScanConfig.from_flat(subspace=str(sketch), task_adapter=str(lora_env["task"]), plot=False))
    assert str(info.value) == (
        f"module {module}: the task adapter expects (d_out, d_in) = {(d_out, d_in)}, the subspace sketch "
        f"{sketch} holds {(d_out + 1, d_in)}"
    )


def test_scan_with_an_output_directory(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline.scan` 3, 27, 29, 35-43: the report is written only with a plot when asked, the returned
    report names the file it wrote, an existing directory is refused and replaced with `force`."""
    out = tmp_path / "out"
    kw = {"aligned": str(lora_env["aligned"]), "unaligned": str(lora_env["unaligned"]),
          "task_adapter": str(lora_env["task"]), "out": str(out)}  # fmt: skip
    report = scan(ScanConfig.from_flat(**kw, plot=False))
    assert report.outputs == {"report": str(out / "safemerge_report.json")}
    assert (out / "safemerge_report.json").exists() and not (out / "similarity.png").exists()
    with pytest.raises(InputError, match="exists"):
        scan(ScanConfig.from_flat(**kw, plot=False))
    scan(ScanConfig.from_flat(**kw, plot=True, force=True))
    assert (out / "similarity.png").exists()


def test_scan_of_a_full_finetune_reports_the_scan_command(tmp_path: Path) -> None:
    """`pipeline.scan` 10, 15, 16 and `pipeline.run_full_scan` 9: a full-fine-tune scan says "scan", and
    a pickle task model is opened with `allow_pickle`."""
    al, un = save_pair(tmp_path, "llama", torch.float32)
    task = save_finetune(al, tmp_path / "task", seed=3)
    pickled = pickle_copy(task, tmp_path / "task_pkl")
    out = tmp_path / "out"
    want = scan(ScanConfig.from_flat(aligned=str(al), unaligned=str(un), task_model=str(task), plot=False))
    got = scan(ScanConfig.from_flat(aligned=str(al), unaligned=str(un), task_model=str(pickled), plot=False,
                                    allow_pickle=True, out=str(out)))  # fmt: skip
    assert [m.rho for m in got.modules] == [m.rho for m in want.modules]
    assert json.loads((out / "safemerge_report.json").read_text())["command"] == "scan"


def _adapter_rank(directory: Path) -> int:
    return int(json.loads((directory / "adapter_config.json").read_text())["r"])


def test_output_rank_rules(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._output_rank` 8, 9, 11, 19: `--rank` applies to TIES / DARE only, may equal the task's
    rank, and without it the output rank is the largest r_task + r_safety over the task's modules, a
    module without a safety counterpart counting r_task + 0. Ranks by hand: the task LoRA has r 4 on
    q_proj and 8 on v_proj (`rank_pattern`), the safety LoRA r 2 on q_proj only: max(4 + 2, 8 + 0) = 8."""
    al = lora_env["aligned"]
    task = save_adapter(al, tmp_path / "task", seed=1, r=4, alpha=8, rank_pattern={"v_proj": 8})
    safety = save_adapter(al, tmp_path / "safety", seed=2, r=2, alpha=4, targets=["q_proj"])
    kw = {"aligned": str(al), "unaligned": str(lora_env["unaligned"]), "task_adapter": str(task),
          "safety_adapter": str(safety), "plot": False, "fraction": 1.0, "allow_partial": True}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v_proj has no safety counterpart: a partial merge, warned
        merge(MergeConfig.from_flat(**kw, out=str(tmp_path / "linear"), rank=12))
        merge(MergeConfig.from_flat(**kw, out=str(tmp_path / "ties"), method="ties", rank=8))
    assert _adapter_rank(tmp_path / "linear") == 8  # --rank ignored by the linear merge
    assert _adapter_rank(tmp_path / "ties") == 8  # equal to the task's largest rank: accepted


def test_a_merge_without_the_aligned_model(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._write_merge` 6-11, 38-40: with a sketch and no aligned model, the merged adapter and its
    model card name the task adapter's base model; `merge_into_base` then has no base weights and says
    so."""
    safety = save_adapter(lora_env["aligned"], tmp_path / "safety", seed=2, r=4, alpha=8)
    kw = {"subspace": str(lora_env["sketch"]), "task_adapter": str(lora_env["task"]),
          "safety_adapter": str(safety), "plot": False}  # fmt: skip
    merge(MergeConfig.from_flat(**kw, out=str(tmp_path / "out")))
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    given = json.loads((lora_env["task"] / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == given["base_model_name_or_path"] == str(lora_env["aligned"])
    # a real bug: the model card read the aligned model's path from the report and crashed (KeyError);
    # the base named there is a local path, which a card leaves out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model:" not in card and "A LoRA adapter for `BASE_MODEL`" in card
    with pytest.raises(InputError) as info:
        merge(MergeConfig.from_flat(**kw, out=str(tmp_path / "full"), merge_into_base=True))
    assert str(info.value) == "merge_into_base needs aligned (the base weights the merged update is added to)"
    assert not (tmp_path / "full").exists()


def _bf16_adapter(aligned: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter on `aligned` stored in bfloat16."""
    d = save_adapter(aligned, out, seed=seed, r=4, alpha=8)
    lora = {k: v.to(torch.bfloat16) for k, v in load_file(d / "adapter_model.safetensors").items()}
    save_file(lora, d / "adapter_model.safetensors")
    return d


def _check_full_model_adds_the_stored_adapter(aligned: Path, out: Path) -> None:
    """The written adapter holds float32 factors (a bfloat16 adapter's merged factors are not rounded back
    to bfloat16: docs/engine.md), and out/full_model = W_al + s·B A of its stored factors, added in
    float32 (their product in bfloat16 would be off by ~1e-3 relative). Oracle in float64; measured
    error < 1e-6."""
    merged = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    base, full = load_file(aligned / "model.safetensors"), load_file(out / "full_model" / "model.safetensors")
    keys = [k for k in merged if k.endswith("lora_A.weight")]
    assert keys and {t.dtype for t in merged.values()} == {torch.float32}
    for key_a in keys:
        module = key_a.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a = merged[key_a].to(torch.float64)
        b = merged[key_a.replace("lora_A", "lora_B")].to(torch.float64)
        want = base[module + ".weight"].to(torch.float64) + scale * (b @ a)
        torch.testing.assert_close(full[module + ".weight"].to(torch.float64), want, rtol=0, atol=1e-6)


def test_merge_into_base_of_bfloat16_adapters_adds_in_float32(
    lora_env: dict[str, Path], tmp_path: Path
) -> None:
    """`pipeline._write_merge` 42, 43: a SafeMERGE merge of bfloat16 adapters into the base."""
    task, safety = (
        _bf16_adapter(lora_env["aligned"], tmp_path / n, s) for n, s in (("task", 1), ("safety", 2))
    )
    out = tmp_path / "out"
    merge(MergeConfig.from_flat(aligned=str(lora_env["aligned"]), unaligned=str(lora_env["unaligned"]),
                                task_adapter=str(task), safety_adapter=str(safety),
                                out=str(out), plot=False, fraction=0.5, merge_into_base=True))  # fmt: skip
    _check_full_model_adds_the_stored_adapter(lora_env["aligned"], out)


def test_safelora_into_base_of_a_bfloat16_adapter_adds_in_float32(
    lora_env: dict[str, Path], tmp_path: Path
) -> None:
    """`safelora.write_outputs` 30, 31: Safe LoRA's adapter of a bfloat16 task adapter, merged into the
    base; its adapter config names the aligned model as the base."""
    from safemerge.defenses import DefendConfig, defend

    task, out = _bf16_adapter(lora_env["aligned"], tmp_path / "task", 1), tmp_path / "out"
    cfg = {"method": "safelora", "aligned": str(lora_env["aligned"]), "unaligned": str(lora_env["unaligned"]),
           "task_adapter": str(task), "out": str(out), "plot": False, "top_k": 2,
           "merge_into_base": True}  # fmt: skip
    defend(DefendConfig.model_validate(cfg))
    _check_full_model_adds_the_stored_adapter(lora_env["aligned"], out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(lora_env["aligned"])


def test_output_scaling_by_hand() -> None:
    """`pipeline.output_scaling` 8-10: one shared positive scaling s is kept (lora_alpha = s · rank) only
    when alpha / rank gives s back exactly; otherwise (scalings differ, s = 0, or 0.1 · 3 / 3 ≠ 0.1 in
    floats) the output scaling is 1 and lora_alpha = rank."""
    assert output_scaling([0.5, 0.5], 4) == (0.5, 2.0)
    assert output_scaling([2.0], 8) == (2.0, 16.0)
    assert output_scaling([0.5, 2.0], 4) == (1.0, 4.0)
    assert output_scaling([0.0], 4) == (1.0, 4.0)
    assert 0.1 * 3 / 3 != 0.1  # the premise of the next line
    assert output_scaling([0.1], 3) == (1.0, 3.0)


def test_merge_refusals_are_worded(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline.check_pair` 2 and `pipeline.merge_modules` 8-10: adapters of different layouts, and a
    merge of nothing."""
    safety = tmp_path / "safety"
    save_adapter(lora_env["aligned"], safety, seed=2, r=4, alpha=8)
    config = json.loads((safety / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True
    (safety / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as info:
        merge(MergeConfig.from_flat(aligned=str(lora_env["aligned"]), unaligned=str(lora_env["unaligned"]),
                                    task_adapter=str(lora_env["task"]), safety_adapter=str(safety),
                                    out=str(tmp_path / "out"), plot=False))  # fmt: skip
    assert str(info.value) == "fan_in_fan_out differs: task adapter False, safety adapter True"
    with pytest.raises(InputError) as info:
        merge_modules({}, {}, set())
    assert str(info.value) == "no task modules to merge"


def test_a_safety_adapter_error_names_the_safety_adapter(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline.merge` 21, 23-25: the safety adapter is loaded under its label, which its errors name."""
    safety = tmp_path / "safety"
    save_adapter(lora_env["aligned"], safety, seed=2, r=4, alpha=8)
    (safety / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError) as info:
        merge(MergeConfig.from_flat(aligned=str(lora_env["aligned"]), unaligned=str(lora_env["unaligned"]),
                                    task_adapter=str(lora_env["task"]), safety_adapter=str(safety),
                                    out=str(tmp_path / "out"), plot=False))  # fmt: skip
    assert str(info.value) == f"{safety}: adapter_model.safetensors is missing — safety adapter"


def test_module_similarity_defaults_to_linear_layout() -> None:
    """`pipeline.module_similarity` 1: without `fan_in_fan_out` the weights are nn.Linear's d_out × d_in.
    Oracle: ρ = ⟨C ΔW, ΔW⟩ / (‖C ΔW‖ ‖ΔW‖) with C = V Vᵀ / ‖V‖, formed densely in float64 here."""
    gen = torch.Generator().manual_seed(0)
    w_al, w_un = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    a, b = torch.randn(2, 4, generator=gen), torch.randn(6, 2, generator=gen)
    v, d = (w_al - w_un).double(), (b @ a).double()
    cd = (v @ v.T / torch.linalg.vector_norm(v)) @ d
    want = float((cd * d).sum() / (torch.linalg.vector_norm(cd) * torch.linalg.vector_norm(d)))
    sim = module_similarity(w_al, w_un, LoraFactors(a, b, 2.0))
    assert abs(sim.rho - want) < 1e-6


def test_scan_refusals_name_the_task_adapter(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._base_keys` 24, 25 and `pipeline.run_scan` 2, 6, 8-10: an adapter whose factor does not
    fit the model's weight, a task adapter without weights, and a full fine-tune given to a LoRA step."""
    task = tmp_path / "task"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    lora = load_file(lora_env["task"] / "adapter_model.safetensors")
    r, d_in = lora[key].shape
    edited_copy(lora_env["task"], task, lambda t: t.update({key: torch.ones(r, d_in + 1)}), ADAPTER)
    kw = {"aligned": str(lora_env["aligned"]), "unaligned": str(lora_env["unaligned"]), "plot": False}
    d_out = lora[key.replace("lora_A", "lora_B")].shape[0]
    with pytest.raises(InputError) as info:
        scan(ScanConfig.from_flat(**kw, task_adapter=str(task)))
    assert str(info.value) == (
        "module model.layers.0.self_attn.q_proj: task adapter expects a weight of shape "
        f"{(d_out, d_in + 1)}, "
        f"but model.layers.0.self_attn.q_proj.weight in {lora_env['aligned']} has {(d_out, d_in)} — is the "
        "adapter for this architecture?"
    )
    (task / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError) as info:
        scan(ScanConfig.from_flat(**kw, task_adapter=str(task)))
    assert str(info.value) == f"{task}: adapter_model.safetensors is missing — task adapter"
    with pytest.raises(InputError) as info:
        run_scan(ScanConfig.from_flat(**kw, task_model=str(lora_env["aligned"])), "defend", False)
    assert str(info.value) == "defend: this step takes a task adapter, not a full fine-tune (task_model)"


def test_sketch_warnings_only_for_truncated_modules_near_the_threshold(lora_env: dict[str, Path]) -> None:
    """`pipeline.note_sketch` 10, 12: the "within the measured sketch error" warning needs both a module
    sketched below full rank and a ρ near τ: none for a full-rank sketch with τ at a module's ρ, none for
    a rank-2 sketch with τ = 5 (far from every ρ, a cosine). A rank-2 sketch's measured error is 1, so
    only a τ outside [0, 1] is far from every ρ: users cannot give one (the config refuses it), so τ is
    set here after validation."""

    def near(sketch: Path, tau: float | None = None) -> list[str]:
        cfg = ScanConfig.from_flat(subspace=str(sketch), task_adapter=str(lora_env["task"]), plot=False)
        cfg.selection.threshold = tau if tau is not None else cfg.selection.threshold
        return [w for w in scan(cfg).warnings if "measured sketch error" in w]

    full = scan(ScanConfig.from_flat(subspace=str(lora_env["sketch"]), task_adapter=str(lora_env["task"]),
                                     plot=False))  # fmt: skip
    assert near(lora_env["sketch"], full.modules[0].rho) == []
    assert near(lora_env["sketch2"], 5.0) == []
    low = scan(ScanConfig.from_flat(subspace=str(lora_env["sketch2"]), task_adapter=str(lora_env["task"]),
                                    plot=False))  # fmt: skip
    assert len(near(lora_env["sketch2"], low.modules[0].rho)) == 1  # the premise: the warning exists


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline.resolve_device` 2-10, 17: "auto" is the GPU when torch sees one, else the CPU; "cuda"
    without one is refused (torch.cuda.is_available patched to test both sides on this CPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError) as info:
        resolve_device("cuda")
    assert str(info.value) == "--device cuda was asked for, but torch sees no CUDA device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_zero_update_is_warned_about(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._selected_report` 38: a module whose LoRA update is zero (B = 0) gets ρ = 0, the flag
    "zero-update" and a warning naming it, word for word."""
    task = tmp_path / "task"
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edited_copy(lora_env["task"], task, lambda t: t[key].zero_(), ADAPTER)
    report = scan(ScanConfig.from_flat(aligned=str(lora_env["aligned"]), unaligned=str(lora_env["unaligned"]),
                                       task_adapter=str(task), plot=False))  # fmt: skip
    assert report.warnings == [
        "model.layers.1.self_attn.v_proj: degenerate similarity (zero-update), rho set to 0"
    ]


def test_ties_on_a_module_wider_than_1024_uses_the_seeded_randomised_svd() -> None:
    """`pipeline._merge_module` 49: a module whose both sides exceed 1,024 is re-factorised by the seeded
    randomised SVD; a `None` seed crashed it, and no smaller module reaches that branch. Oracle: TIES
    written in tests/test_oracles_merge.py and the optimal rank-k error from an exact float64 SVD here."""
    from test_oracles_merge import delta64, random_factors, ties_oracle

    name, k = "model.layers.0.self_attn.q_proj", 6
    tf, sf = random_factors(1030, 1027, 3, 2.0, 30), random_factors(1030, 1027, 2, 0.5, 31)
    runs = [
        merge_modules({name: tf}, {name: sf}, {name}, weights=(0.7, 0.3), method="ties", density=0.5, rank=k)
        for _ in range(2)
    ]
    (a, b), (a2, b2) = runs[0].factors[name], runs[1].factors[name]
    assert torch.equal(a, a2) and torch.equal(b, b2)  # seeded: the same factors twice
    want = ties_oracle([delta64(tf), delta64(sf)], [0.7, 0.3], 0.5)
    s = torch.linalg.svdvals(want)
    best = float(s[k:].norm() / s.norm())  # Eckart–Young: the smallest rank-k relative error
    got = runs[0].scaling * (b.to(torch.float64) @ a.to(torch.float64))
    err = float((want - got).norm() / want.norm())
    assert best <= err + 1e-9 and err < best * 1.001  # measured 1.00009
    assert runs[0].svd_rel_errors[name] == pytest.approx(err, rel=1e-4)


def test_a_merge_with_no_base_model_named_anywhere(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline._write_merge` 11: a sketch merge without the aligned model, of a task adapter whose config
    names no base model, writes null (PEFT's default), not an empty or invented name, and the model card
    has no `base_model` line for the hub to misread."""
    task = shutil.copytree(lora_env["task"], tmp_path / "task")
    config = json.loads((task / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (task / "adapter_config.json").write_text(json.dumps(config))
    safety = save_adapter(lora_env["aligned"], tmp_path / "safety", seed=2, r=4, alpha=8)
    out = tmp_path / "out"
    merge(MergeConfig.from_flat(subspace=str(lora_env["sketch"]), task_adapter=str(task),
                                safety_adapter=str(safety), plot=False, out=str(out)))  # fmt: skip
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] is None
    card = (out / "README.md").read_text()
    assert "base_model:" not in card and "A LoRA adapter for `BASE_MODEL`" in card


def test_report_numbers_below_a_thousandth_keep_their_digits() -> None:
    """`report._fmt` 6: a ρ or norm below 1e-3 is written with 4 significant digits, not rounded to
    "0.0003" or "0.0000" by the fixed-point format used above it (values by hand)."""
    from safemerge.engine.report import _fmt

    assert _fmt(2.5e-4) == "0.00025" and _fmt(-7.5e-5) == "-7.5e-05"
    assert _fmt(0.0) == "0.0000" and _fmt(0.123456) == "0.1235" and _fmt(None) == ""
    assert _fmt(1e-3) == "0.0010"  # exactly a thousandth is not below it


def test_report_records_the_library_versions_by_name() -> None:
    """`report.library_versions` 1-11: the versions a report records, under the names users look up
    (the installed distributions' own versions, read here with importlib.metadata)."""
    import platform
    from importlib.metadata import version

    from safemerge import __version__
    from safemerge.engine.report import library_versions

    want = {"safemerge": __version__, "python": platform.python_version(), "torch": torch.__version__}
    want |= {name: version(name) for name in ("transformers", "peft", "safetensors")}
    assert library_versions() == want


def test_console_summary_of_a_merge(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`report.print_summary`: the console table a user reads after `merge` — its title, the shared name
    prefix cut from the module column, with many modules only the lowest-ρ ones (in ρ order, with a
    caption saying so), each row's ρ to 5 decimals, the selected / merged marks, ‖ΔW‖ in → out and flags;
    then a pointer to the warnings and every output path. Expected text built here from the report."""
    from rich.console import Console

    from safemerge.engine.report import print_summary

    al = lora_env["aligned"]
    safety = save_adapter(al, tmp_path / "safety", seed=2, r=4, alpha=8, targets=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v_proj has no safety counterpart: warned
        cfg = MergeConfig.from_flat(aligned=str(al), unaligned=str(lora_env["unaligned"]),
                                    task_adapter=str(lora_env["task"]), safety_adapter=str(safety),
                                    out=str(tmp_path / "out"), plot=False, fraction=0.7,
                                    allow_partial=True)  # fmt: skip
        report = merge(cfg)
    # the case shows every mark: selected and unselected rows, a flagged one, warnings
    assert report.warnings and any(m.flags for m in report.modules)
    assert {m.selected for m in report.modules} == {True, False}
    s = report.summary
    # the warnings themselves were printed when they arose (once, by the CLI): the summary points to them
    pointer = f"{len(report.warnings)} warning(s), printed above; all of them in {report.outputs['report']}"
    after = [pointer] + [f"{k}: {v}" for k, v in report.outputs.items()]
    for max_rows, shown in ((6, report.modules), (3, sorted(report.modules, key=lambda m: m.rho)[:3])):
        console = Console(record=True, width=300, color_system=None)
        print_summary(report, console, max_rows=max_rows)
        lines = console.export_text().splitlines()
        kept = s["selected"] - s["merged"]
        top = next(i for i, line in enumerate(lines) if line.startswith("┏"))  # the title wraps to the table
        assert " ".join(line.strip() for line in lines[:top]) == (
            f"safemerge merge: {s['selected']} of {s['modules']} modules selected, {s['merged']} merged "
            f"({kept} kept as fine-tuned: no safety counterpart)"
        )
        headers = ["module (model.layers.…)", "ρ", "selected", "merged", "‖ΔW‖ in → out", "flags"]
        assert [c.strip() for c in lines[top + 1].split("┃")[1:-1]] == headers
        rows = [line for line in lines if "│" in line and "0." in line]
        assert len(rows) == len(shown)
        for m, line in zip(shown, rows, strict=True):
            in_out = f"{m.delta_norm_in:.4f} → {m.delta_norm_out:.4f}"
            want = [m.name.removeprefix("model.layers."), f"{m.rho:.5f}", "✔" if m.selected else "",
                    "✔" if m.merged else "", in_out, ", ".join(m.flags)]  # fmt: skip
            assert [c.strip() for c in line.split("│")[1:-1]] == want
        truncated = any("the 3 lowest-ρ of 6 modules; all in the report" in line for line in lines)
        assert truncated == (max_rows == 3)
        assert lines[-len(after) :] == after


def _scan_report(layers: list[int | None], types: list[str], flags: list[list[str]] | None = None) -> Report:
    """A scan report written by hand: module i is `types[i]` on layer `layers[i]` (None: not in a layer)."""
    mods = []
    for i, (layer, mtype) in enumerate(zip(layers, types, strict=True)):
        name = f"model.layers.{layer}.self_attn.{mtype}" if layer is not None else mtype
        rho = 0.1 * (i + 1)
        mods.append(ModuleRecord(name=name, layer=layer, module_type=mtype, shape=(4, 4), rank_task=2,
                                 rho=rho, rho_rounded=rho, selected=rho < 0.25, delta_norm_in=1.0,
                                 flags=(flags or [[]] * len(layers))[i]))  # fmt: skip
    return Report(command="scan", inputs={}, options={"threshold": 0.25}, modules=mods, versions={})


def test_plot_draws_each_module_at_its_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`report.plot_similarity` 22-24, 33: ρ is drawn against the module's layer number, not its position
    in the list, so a scan of layers 10, 12 and 15 only is drawn at x = 10, 12, 15; a module outside the
    layers (`lm_head`) is drawn at its position within its type, 0. Read back from the figure's data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safemerge.engine.report import plot_similarity

    monkeypatch.setattr(plt, "close", lambda *_: None)  # keep the figure to read it back
    plt.close("all")
    report = _scan_report([10, 12, 15, None], ["q_proj", "q_proj", "q_proj", "lm_head"])
    plot_similarity(report, tmp_path / "rho.png")
    ax = plt.gcf().axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines["q_proj"].get_xdata()) == [10, 12, 15]
    assert list(lines["q_proj"].get_ydata()) == pytest.approx([0.1, 0.2, 0.3])
    assert list(lines["lm_head"].get_xdata()) == [0]
    # the points too (the selected ones, ρ < τ, drawn as crosses; the others as dots)
    points = sorted((float(x), round(float(y), 9)) for c in ax.collections for x, y in c.get_offsets())
    assert points == [(0, 0.4), (10, 0.1), (12, 0.2), (15, 0.3)]
    matplotlib.pyplot.close("all")


@pytest.mark.parametrize(
    ("layers", "header", "first"),
    [
        ([3], "module", "model.layers.3.self_attn.q_proj"),  # one module: nothing shared to cut
        ([3, 4], "module (model.layers.…)", "3.self_attn.q_proj"),  # two modules share the prefix
        ([10, 11, 12], "module (model.layers.…)", "10.self_attn.q_proj"),  # cut at the dot, not in "1"
    ],
)
def test_console_table_cuts_the_shared_name_prefix_at_a_dot(
    layers: list[int], header: str, first: str
) -> None:
    """`report.print_summary` 60, 62-64: the module column drops the prefix every name shares, cut at its
    last dot (layers 10-12 share "model.layers.1", of which only "model.layers." is cut), and a one-module
    table shows the whole name. Expected cells written by hand."""
    from rich.console import Console

    from safemerge.engine.report import print_summary

    console = Console(record=True, width=200, color_system=None)
    print_summary(_scan_report(layers, ["q_proj"] * len(layers)), console)
    lines = console.export_text().splitlines()
    assert lines[2].split("┃")[1].strip() == header
    assert lines[4].split("│")[1].strip() == first


def test_two_flags_are_separated_by_a_comma(tmp_path: Path) -> None:
    """`report.markdown` 118, `report.print_summary` 97: a module's flags are listed "a, b" in both the
    Markdown table and the console table."""
    from rich.console import Console

    from safemerge.engine.report import markdown, print_summary

    report = _scan_report([0, 1], ["q_proj", "q_proj"], flags=[["zero_update", "near_threshold"], []])
    assert (
        "| `model.layers.0.self_attn.q_proj` | 0.10000 | yes | zero_update, near_threshold |"
        in markdown(report).splitlines()
    )
    console = Console(record=True, width=200, color_system=None)
    print_summary(report, console)
    assert console.export_text().splitlines()[4].split("│")[4].strip() == "zero_update, near_threshold"


@pytest.mark.parametrize("offsets", [[8, 4], [-4, 8], [0, 4, 8], ["a", 8]])
def test_safetensors_data_offsets_out_of_order_are_refused(tmp_path: Path, offsets: list[object]) -> None:
    """A header entry whose data offsets are not two integers 0 ≤ begin ≤ end is corrupted (a tensor's
    size in bytes is end − begin)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}).encode()
    f = _raw(tmp_path / "x.safetensors", header, bytes(8))
    with pytest.raises(InputError) as info:
        _read_safetensors_header(f)
    assert str(info.value) == f"{f}: corrupted safetensors header entry for 'w'"


DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.int64, torch.int8, torch.uint8, torch.bool]  # fmt: skip


@pytest.mark.parametrize("pickle", [False, True])
def test_checkpoint_nbytes_of_every_dtype(tmp_path: Path, pickle: bool) -> None:
    """`Checkpoint.nbytes`: a tensor's stored size is numel × torch's element size, for float8 and
    integer dtypes too, in a safetensors file (its data offsets) and in a pickle."""
    tensors = {f"t{i}": torch.zeros(3, 5).to(dt) for i, dt in enumerate(DTYPES)}
    tmp_path.joinpath("m").mkdir()
    if pickle:
        torch.save(tensors, tmp_path / "m" / "pytorch_model.bin")
    else:
        save_file(tensors, str(tmp_path / "m" / "model.safetensors"))
    ckpt = Checkpoint(tmp_path / "m", allow_pickle=pickle)
    assert {k: ckpt.nbytes(k) for k in tensors} == {k: 15 * t.element_size() for k, t in tensors.items()}


def test_an_empty_tensor_has_equal_data_offsets(tmp_path: Path) -> None:
    """A tensor with no elements (shape [0]) takes no bytes: its begin and end offsets are equal, which is
    valid (as safetensors writes it), and its size is 0."""
    save_file({"a": torch.zeros(2), "empty": torch.zeros(0)}, str(tmp_path / "model.safetensors"))
    header = _read_safetensors_header(tmp_path / "model.safetensors")
    begin, end = header["empty"]["data_offsets"]
    assert begin == end
    assert Checkpoint(tmp_path).nbytes("empty") == 0 and Checkpoint(tmp_path).nbytes("a") == 8


def test_console_table_shows_forty_rows_by_default() -> None:
    """`report.print_summary` 1: the table holds at most 40 modules unless told otherwise (41 modules:
    the 40 lowest-ρ, with the caption saying so)."""
    from rich.console import Console

    from safemerge.engine.report import print_summary

    console = Console(record=True, width=200, color_system=None)
    print_summary(_scan_report(list(range(41)), ["q_proj"] * 41), console)
    text = console.export_text()
    assert "the 40 lowest-ρ of 41 modules; all in the report" in text
    assert sum("│" in line and "self_attn" in line for line in text.splitlines()) == 40


def test_safelora_reads_a_pickle_unaligned_model_when_allowed(
    lora_env: dict[str, Path], tmp_path: Path
) -> None:
    """`SafeLora.run` 32: Safe LoRA on a LoRA opens the unaligned model (for V) with the run's
    `allow_pickle`, as the scan did: a pickle-only unaligned model is read, and the adapter equals the one
    made from its safetensors original byte for byte."""
    from safemerge.defenses import DefendConfig, defend

    pickled = pickle_copy(lora_env["unaligned"], tmp_path / "unaligned")
    runs = (("st", lora_env["unaligned"], {}), ("pt", pickled, {"allow_pickle": True}))
    for name, unaligned, extra in runs:
        cfg = {"method": "safelora", "aligned": str(lora_env["aligned"]), "unaligned": str(unaligned),
               "task_adapter": str(lora_env["task"]), "out": str(tmp_path / name), "plot": False,
               "top_k": 2}  # fmt: skip
        assert defend(DefendConfig.model_validate(cfg | extra)).modified == 2
    adapter = "adapter_model.safetensors"
    assert (tmp_path / "st" / adapter).read_bytes() == (tmp_path / "pt" / adapter).read_bytes()


def test_scan_of_hub_models_fetches_pickles_only_when_allowed(
    lora_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pipeline.open_checkpoint` 3, 5: a scan of hub models asks the hub for the pickle files (`*.bin`,
    `*.pt`) only with allow_pickle; `snapshot_download` is replaced by a recorder serving the local pair."""
    asked = record_hub_downloads(monkeypatch, lora_env)
    for allow in (False, True):
        scan(ScanConfig.from_flat(aligned="org/aligned", unaligned="org/unaligned",
                                  task_adapter=str(lora_env["task"]), allow_pickle=allow))  # fmt: skip
    assert ["*.bin" in p and "*.pt" in p for p in asked] == [False, False, True, True]


def test_a_non_finite_aligned_weight_is_named(lora_env: dict[str, Path], tmp_path: Path) -> None:
    """`pipeline.open_sources` 13, 18, 19: a NaN in the aligned model is reported as the aligned
    checkpoint's (as `test_a_non_finite_unaligned_weight_is_named` does for the unaligned one)."""
    key = "model.layers.0.self_attn.q_proj.weight"
    bad = edited_copy(lora_env["aligned"], tmp_path / "aligned", lambda t: t[key].fill_(float("nan")))
    with pytest.raises(InputError) as err:
        scan(ScanConfig.from_flat(aligned=str(bad), unaligned=str(lora_env["unaligned"]),
                                  task_adapter=str(lora_env["task"])))  # fmt: skip
    assert str(err.value) == f"tensor {key!r} of aligned {bad} has NaN or Inf"
