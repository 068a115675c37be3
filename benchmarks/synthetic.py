"""Synthetic checkpoints with real architectures' tensor names and shapes, for the merge-engine benchmark.

For a preset (`tiny`, `llama2-7b`, `llama3-8b`, `llama3-70b`) this writes, under OUT:

- `unaligned/` and `aligned/`: bf16 Llama checkpoints in the Hugging Face layout (sharded safetensors,
  `model.safetensors.index.json`, `config.json`). By default only the tensors the engine reads are written
  (`model.layers.{i}.self_attn.q_proj.weight` and `...v_proj.weight`, at full shape); `--all-tensors` also
  writes embeddings, k/o projections, the MLP and the norms. aligned = unaligned + V, where V is a
  rank-16 term with a decaying spectrum plus Gaussian noise (‖V‖_F ≈ 10 % of ‖W‖_F, so it survives bf16
  rounding);
- `task_adapter/` and `safety_adapter/`: PEFT LoRA adapters (r = 8, lora_alpha = 16, q_proj and v_proj,
  float32, non-zero B). The task adapter's B leans on V's leading directions by an amount that varies with
  the layer, so ρ spans a range and some modules fall below τ = 0.35;
- `synthetic.json`: a manifest (preset, seed, sizes, module count).

Everything is deterministic in `--seed` (each tensor has its own generator) and streamed: each tensor is
generated in row chunks and written straight into its shard, so memory holds one chunk, never a model.
Full-size q/v of both models: 4.3 GB for llama2-7b, 24.2 GB for llama3-70b; `--all-tensors` is 27 GB for
llama2-7b and ~280 GB for llama3-70b (refused when the disk cannot hold it).

    python benchmarks/synthetic.py --preset llama2-7b --out /tmp/safemerge-bench/llama2-7b
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save_file

TARGETS = ("q_proj", "v_proj")
LORA_RANK = 8
LORA_ALPHA = 16
V_RANK = 16  # rank of the structured part of V = W_al - W_un
CHUNK_ELEMS = 1 << 24  # rows are generated in chunks of about this many elements (64 MiB in float32)
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class Preset:
    """The shape-defining fields of a Llama-architecture config."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 4, 256, 688, 8, 2, 1024, 2048, 10000.0),
    "llama2-7b": Preset("llama2-7b", 32, 4096, 11008, 32, 32, 32000, 4096, 10000.0),
    "llama3-8b": Preset("llama3-8b", 32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
    "llama3-70b": Preset("llama3-70b", 80, 8192, 28672, 64, 8, 128256, 8192, 500000.0),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: name, shape (out, in) or (n,), and whether it is a LoRA target."""

    name: str
    shape: tuple[int, ...]
    target: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(p: Preset, all_tensors: bool) -> list[TensorSpec]:
    """The checkpoint's tensors in HF Llama order (only q/v projections unless `all_tensors`)."""
    h, kv, inter = p.hidden_size, p.kv_dim, p.intermediate_size
    specs: list[TensorSpec] = []
    if all_tensors:
        specs.append(TensorSpec("model.embed_tokens.weight", (p.vocab_size, h), False))
    for i in range(p.num_hidden_layers):
        pre = f"model.layers.{i}"
        specs.append(TensorSpec(f"{pre}.self_attn.q_proj.weight", (h, h), True))
        if all_tensors:
            specs.append(TensorSpec(f"{pre}.self_attn.k_proj.weight", (kv, h), False))
        specs.append(TensorSpec(f"{pre}.self_attn.v_proj.weight", (kv, h), True))
        if all_tensors:
            specs += [
                TensorSpec(f"{pre}.self_attn.o_proj.weight", (h, h), False),
                TensorSpec(f"{pre}.mlp.gate_proj.weight", (inter, h), False),
                TensorSpec(f"{pre}.mlp.up_proj.weight", (inter, h), False),
                TensorSpec(f"{pre}.mlp.down_proj.weight", (h, inter), False),
                TensorSpec(f"{pre}.input_layernorm.weight", (h,), False),
                TensorSpec(f"{pre}.post_attention_layernorm.weight", (h,), False),
            ]
    if all_tensors:
        specs.append(TensorSpec("model.norm.weight", (h,), False))
        specs.append(TensorSpec("lm_head.weight", (p.vocab_size, h), False))
    return specs


def plan_shards(specs: list[TensorSpec], max_bytes: int, itemsize: int) -> list[list[TensorSpec]]:
    """Split the tensors, in order, into shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        nbytes = s.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive in declared order, in chunks of rows.

    The header (names, shapes, offsets) is known up front, so data can be streamed to disk without ever
    holding a whole tensor, let alone a shard.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], dtype: torch.dtype):
        self.path = path
        self.specs = specs
        self.dtype = dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            nbytes = s.numel * itemsize
            header[s.name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = offset
        self._fh: BinaryIO = path.open("wb")
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)
        self._written = 0

    def write(self, chunk: torch.Tensor) -> None:
        """Append the next rows (any float dtype; converted to the file's dtype)."""
        data = chunk.to(self.dtype).contiguous().view(torch.uint8).numpy()
        self._fh.write(data.data)  # contiguous: a zero-copy buffer
        self._written += data.nbytes

    def close(self) -> None:
        self._fh.close()
        if self._written != self.total:
            raise RuntimeError(f"{self.path}: wrote {self._written} bytes, header promises {self.total}")


def _generator(seed: int, name: str, salt: str = "") -> torch.Generator:
    """A generator of its own for each tensor, so outputs do not depend on order or chunking of others."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"{salt}{name}".encode()))


@dataclass
class _DeltaFactors:
    """V's structured part, U diag(s) Wt, with the leading directions kept for the adapters."""

    u: torch.Tensor  # (d_out, V_RANK), columns scaled by the decaying spectrum
    wt: torch.Tensor  # (V_RANK, d_in)


def _delta_factors(spec: TensorSpec, seed: int, w_std: float) -> _DeltaFactors:
    d_out, d_in = spec.shape
    g = _generator(seed, spec.name, "V")
    spectrum = torch.tensor([0.7**j for j in range(V_RANK)])
    u = torch.randn(d_out, V_RANK, generator=g) * spectrum
    wt = torch.randn(V_RANK, d_in, generator=g)
    # Structured part carries ~ the same energy as the noise part; ‖V‖_F ≈ 0.1 ‖W‖_F in total.
    target = 0.07 * w_std * math.sqrt(d_out * d_in)
    scale = target / float(torch.linalg.vector_norm(u, dtype=torch.float64)
                           * torch.linalg.vector_norm(wt, dtype=torch.float64) / math.sqrt(V_RANK))
    return _DeltaFactors(u * scale, wt)


def _row_chunks(spec: TensorSpec) -> Iterator[tuple[int, int]]:
    rows = spec.shape[0]
    width = spec.numel // rows if spec.shape else 1
    step = max(1, CHUNK_ELEMS // max(1, width))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _write_pair(spec: TensorSpec, seed: int, un: StreamingSafetensorsWriter,
                al: StreamingSafetensorsWriter) -> _DeltaFactors | None:
    """Generate W_un and W_al = W_un + V for one tensor, chunk by chunk, and write both."""
    if len(spec.shape) == 1:  # norms: ones, slightly changed by alignment
        g = _generator(seed, spec.name)
        w = torch.ones(spec.shape)
        un.write(w)
        al.write(w + 0.01 * torch.randn(spec.shape, generator=g))
        return None
    w_std = 0.02
    g_w = _generator(seed, spec.name, "W")
    g_n = _generator(seed, spec.name, "N")
    factors = _delta_factors(spec, seed, w_std) if spec.target else None
    noise_std = 0.07 * w_std if spec.target else 0.05 * w_std
    for start, stop in _row_chunks(spec):
        rows = (stop - start, *spec.shape[1:])
        w = torch.randn(rows, generator=g_w).mul_(w_std)
        un.write(w)
        w.add_(torch.randn(rows, generator=g_n).mul_(noise_std))
        if factors is not None:
            w.add_(factors.u[start:stop] @ factors.wt)
        al.write(w)
    return factors


def _adapter_tensors(specs: list[TensorSpec], factors: dict[str, _DeltaFactors], seed: int,
                     kind: str, num_layers: int) -> dict[str, torch.Tensor]:
    """LoRA A (r x d_in) and B (d_out x r), float32, B non-zero and partly aligned with V's directions.

    The task adapter's alignment with V goes from ~0 (first layer) to strong (last layer), so ρ spans a
    range; the safety adapter is strongly aligned everywhere.
    """
    out: dict[str, torch.Tensor] = {}
    for s in specs:
        if not s.target:
            continue
        module = s.name.removesuffix(".weight")
        layer = int(module.split(".")[2])
        d_out, d_in = s.shape
        g = _generator(seed, module, kind)
        a = torch.randn(LORA_RANK, d_in, generator=g) / math.sqrt(d_in)
        noise = torch.randn(d_out, LORA_RANK, generator=g)
        lead = factors[s.name].u[:, :LORA_RANK]
        lead = lead / lead.norm(dim=0, keepdim=True) * math.sqrt(d_out)
        frac = 0.9 if kind == "safety" else (layer / max(1, num_layers - 1)) ** 2
        b = (frac * lead + (1.0 - frac) * noise) * 1e-3
        key = f"base_model.model.{module}"
        out[f"{key}.lora_A.weight"] = a.contiguous()
        out[f"{key}.lora_B.weight"] = b.contiguous()
    return out


def _adapter_config(base: Path) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": list(TARGETS),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }


def _model_config(p: Preset) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": p.hidden_size, "intermediate_size": p.intermediate_size,
        "num_attention_heads": p.num_attention_heads, "num_key_value_heads": p.num_key_value_heads,
        "num_hidden_layers": p.num_hidden_layers, "vocab_size": p.vocab_size, "head_dim": p.head_dim,
        "max_position_embeddings": p.max_position_embeddings, "rope_theta": p.rope_theta,
        "rms_norm_eps": p.rms_norm_eps, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
    }


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000; also MB, GiB, MiB, or plain bytes."""
    units = {"GIB": 1 << 30, "MIB": 1 << 20, "GB": 10**9, "MB": 10**6, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def generate(preset: str, out: Path, *, seed: int = 0, layers: int | None = None, all_tensors: bool = False,
             shard_size: int = 2 * 10**9, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write the synthetic unaligned/aligned checkpoints and adapters under `out`; return the manifest."""
    p = PRESETS[preset]
    if layers is not None:
        p = Preset(**{**asdict(p), "num_hidden_layers": layers, "name": f"{p.name}-{layers}l"})
    manifest_path = out / "synthetic.json"
    if manifest_path.exists() and not force:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        wanted = {"preset": p.name, "seed": seed, "all_tensors": all_tensors}
        if all(manifest.get(k) == v for k, v in wanted.items()):
            return manifest
        raise FileExistsError(f"{out} holds another synthetic set ({manifest.get('preset')}); use --force")
    specs = tensor_specs(p, all_tensors)
    itemsize = 2
    model_bytes = sum(s.numel for s in specs) * itemsize
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if 2 * model_bytes > free - 2 * 10**9:
        raise OSError(f"{p.name}: both checkpoints need {2 * model_bytes / 1e9:.1f} GB, "
                      f"{out} has {free / 1e9:.1f} GB free")
    for sub in ("unaligned", "aligned", "task_adapter", "safety_adapter"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        (out / sub).mkdir()
    manifest_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    shards = plan_shards(specs, shard_size, itemsize)
    weight_map: dict[str, str] = {}
    factors: dict[str, _DeltaFactors] = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        un = StreamingSafetensorsWriter(out / "unaligned" / fname, shard, torch.bfloat16)
        al = StreamingSafetensorsWriter(out / "aligned" / fname, shard, torch.bfloat16)
        for s in shard:
            f = _write_pair(s, seed, un, al)
            if f is not None:  # keep only what the adapters need: V's leading left directions
                factors[s.name] = _DeltaFactors(f.u[:, :LORA_RANK].clone(), torch.empty(0))
            weight_map[s.name] = fname
        un.close()
        al.close()
        if not quiet:
            print(f"  shard {k}/{len(shards)} written ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    for sub in ("unaligned", "aligned"):
        index = {"metadata": {"total_size": model_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out / sub / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (out / sub / "config.json").write_text(json.dumps(_model_config(p), indent=2) + "\n")
    for kind in ("task", "safety"):
        d = out / f"{kind}_adapter"
        save_file(_adapter_tensors(specs, factors, seed, kind, p.num_hidden_layers),
                  str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        (d / "adapter_config.json").write_text(json.dumps(_adapter_config(out / "aligned"), indent=2) + "\n")
    manifest = {
        "preset": p.name, "base_preset": preset, "seed": seed, "all_tensors": all_tensors,
        "num_hidden_layers": p.num_hidden_layers, "hidden_size": p.hidden_size,
        "q_shape": [p.hidden_size, p.hidden_size], "v_shape": [p.kv_dim, p.hidden_size],
        "modules": sum(s.target for s in specs), "tensors_per_model": len(specs), "shards": len(shards),
        "bytes_per_model": model_bytes,
        "target_bytes_per_model": sum(s.numel for s in specs if s.target) * itemsize,
        "generation_s": round(time.perf_counter() - t0, 2),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="directory to write (kept outside the repo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override the preset's number of layers")
    ap.add_argument("--all-tensors", action="store_true",
                    help="also write embeddings, k/o, MLP and norms (the 70B full set does not fit on disk)")
    ap.add_argument("--shard-size", default="2GB", help="largest shard (default 2GB)")
    ap.add_argument("--force", action="store_true", help="regenerate even if OUT holds this set")
    args = ap.parse_args(argv)
    try:
        m = generate(args.preset, args.out, seed=args.seed, layers=args.layers, all_tensors=args.all_tensors,
                     shard_size=parse_size(args.shard_size), force=args.force)
    except (OSError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
