"""Safety-subspace sketches: ρ from the top-K left singular vectors and values of V (docs/subspace.md).

ρ (docs/method.md §3) depends on V only through C = V Vᵀ / ‖V‖_F. With V ≈ U_K S_K W_Kᵀ (top-K SVD),
C ∝ U_K S_K² U_Kᵀ, and with X = U_Kᵀ ΔW (K × d_in):

    ⟨C ΔW, ΔW⟩ ∝ ‖S_K X‖²,   ‖C ΔW‖ ∝ ‖S_K² X‖,   so   ρ_K = ‖S_K X‖² / (‖S_K² X‖ · ‖ΔW‖)

(method.md §3.4 with the sum cut at K). For a LoRA update ΔW ∝ B A, X = (U_Kᵀ B) A: O(d_out·r·K) and no
base model at all. At K = rank(V) the sketch is exact; below, it drops V's weakest directions.

A sketch directory (written by `subspace()` / `safemerge subspace`) holds:

- `subspace.json`: the two models (path, hub revision, fingerprint), K, seed, layout, the safemerge
  version, and per module its shape (d_out, d_in), the K used, ‖V‖_F, the energy fraction, the file;
- safetensors shards with, per module, `<module>.U` (d_out × K, float32, or float16 to halve the size)
  and `<module>.S` (K, float64);
- `README.md`: a model card.

U is always in the nn.Linear orientation (d_out rows, the rows of a LoRA B), also for GPT-2's Conv1D
weights, which are stored d_in × d_out and transposed here (docs/method.md §2).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open
from safetensors.torch import save_file

from safemerge import __version__
from safemerge.common.config_io import FlatConfig
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.engine.checkpoint import (
    Checkpoint,
    _read_safetensors_header,
    candidate_keys,
    resolve_local_dir,
)
from safemerge.engine.criterion import FLOAT32_TINY, ZERO_V, Similarity
from safemerge.engine.inputs import check_distinct
from safemerge.engine.lora import natural_key
from safemerge.engine.merging import module_seed

SKETCH_JSON = "subspace.json"
SKETCH_KEYS = ("aligned", "unaligned", "rank", "layout", "dtype", "modules")  # what readers rely on
MODULE_KEYS = ("shape", "rank", "energy", "frobenius", "file")
SKETCH_FORMAT = "safemerge-subspace"
FORMAT_VERSION = 1
# Linear layers sketched by default: attention and MLP projections of Llama-style models, and GPT-2's
# Conv1D c_attn / c_proj / c_fc. `--modules REGEX` narrows this set.
DEFAULT_MODULES = re.compile(r"(?:^|\.)(?:(?:q|k|v|o|gate|up|down)_proj|c_attn|c_proj|c_fc)$")
# model_type values whose projections are transformers' Conv1D (weight stored d_in × d_out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# Randomised SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4): K + OVERSAMPLE columns, POWER_ITERATIONS
# re-orthonormalised power steps. Modules with min(d_out, d_in) ≤ EXACT_MAX_DIM, or where K + OVERSAMPLE
# reaches min(d_out, d_in), get an exact float64 SVD instead (as engine/merging.svd_factors).
OVERSAMPLE = 16
POWER_ITERATIONS = 4
EXACT_MAX_DIM = 1024
MAX_SHARD_BYTES = 2 * 10**9
U_DTYPES = {"float32": torch.float32, "float16": torch.float16}

# Largest |ρ_sketch − ρ_exact| measured per K (benchmarks/subspace_fidelity.py, docs/subspace.md §4),
# rounded up: the worse of the organism's V (0.193, 0.0744, 0.00906, 0.00121) and the synthetic
# 7B-shaped V (0.988, 0.987, 0.0412, 0.0310). At K ≤ 32 an update on directions beyond K can lose
# almost all of its ρ. A sketch of rank K gets the entry of the largest measured K ≤ K.
MEASURED_RHO_ERROR: dict[int, float] = {8: 0.99, 32: 0.99, 128: 0.042, 256: 0.032}


# --- maths ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleSketch:
    """The top-K of one module's V: left singular vectors u (d_out × k), values s (k, descending)."""

    u: torch.Tensor
    s: torch.Tensor
    frobenius: float  # ‖V‖_F (float64)
    energy: float  # Σ s² / ‖V‖²_F: the share of V's energy the k components hold (1 when V = 0)
    method: str  # "exact" or "randomized"


def sketch_matrix(v: torch.Tensor, rank: int, seed: int) -> ModuleSketch:
    """Top-`rank` left singular vectors and values of V (d_out × d_in), rank clamped to min(d_out, d_in).

    Exact float64 SVD for small modules or when the rank nearly reaches min(d_out, d_in); otherwise a
    seeded randomised SVD whose random test matrix is drawn on the CPU from `seed`, so it does not depend
    on the device or on the caller's RNG state.
    """
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    n = min(v.shape)
    k = min(rank, n)
    fro = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    if n <= EXACT_MAX_DIM or k + OVERSAMPLE >= n:
        u, s, _ = torch.linalg.svd(v.to(torch.float64), full_matrices=False)
        u, s, method = u[:, :k], s[:k], "exact"
    else:
        u, s = _randomized_svd(v.to(torch.float32), k, seed)
        method = "randomized"
    energy = min(float((s * s).sum()) / (fro * fro), 1.0) if fro > 0 else 1.0
    return ModuleSketch(u.to(torch.float32).cpu().contiguous(), s.cpu().contiguous(), fro, energy, method)


def _randomized_svd(v: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HMT Alg. 4.4: range of V from a Gaussian sketch, power steps with QR in float32 (bound by reading
    V), then the small (k + p) × d_in SVD in float64. torch.svd_lowrank draws from the global RNG and does
    its small SVD in the input dtype, hence this short version."""
    q = min(k + OVERSAMPLE, *v.shape)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(v.shape[1], q, generator=gen).to(v.device)
    y = torch.linalg.qr(v @ omega).Q  # d_out × q
    for _ in range(POWER_ITERATIONS):
        z = torch.linalg.qr(v.T @ y).Q  # d_in × q
        y = torch.linalg.qr(v @ z).Q
    small = (y.T @ v).to(torch.float64)  # q × d_in
    u_small, s, _ = torch.linalg.svd(small, full_matrices=False)
    return y.to(torch.float64) @ u_small[:, :k], s[:k]


def _check_basis(u: torch.Tensor, s: torch.Tensor, d_out: int) -> None:
    if u.ndim != 2 or s.ndim != 1 or u.shape[1] != s.shape[0] or u.shape[0] != d_out:
        raise ValueError(f"basis U {tuple(u.shape)}, S {tuple(s.shape)} does not fit d_out = {d_out}")


def _weights(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s², s⁴) in float64 after dividing s by its largest value (ρ is invariant to scaling V, and this
    keeps s⁴ far from overflow and underflow); None when s = 0 (V = 0)."""
    s64 = s.to(torch.float64)
    top = float(s64.abs().max()) if s64.numel() else 0.0
    if top == 0.0:
        return None
    s2 = (s64 / top) ** 2
    return s2, s2 * s2


def _finish(num: float, cdw2: float, dw2: float) -> Similarity:
    """ρ from its three terms with the degenerate cases of docs/method.md §3.3 (V ≠ 0 here)."""
    if not all(math.isfinite(x) for x in (num, cdw2, dw2)):
        raise ValueError("non-finite values in the sketch or in the update")
    if dw2 <= 0.0:
        return Similarity(0.0, "zero-update")
    if cdw2 <= 0.0:
        return Similarity(0.0, "orthogonal")  # orthogonal to the sketched directions
    return Similarity(min(max(num / math.sqrt(cdw2 * dw2), 0.0), 1.0))


def sketch_similarity_lowrank(
    u: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> Similarity:
    """ρ of ΔW ∝ B A from a sketch (u: d_out × K, s: K), in float64; the LoRA scaling may be left out.

    With Y = Uᵀ B (K × r) and G = A Aᵀ: ‖S X‖² = tr(Yᵀ S² Y G), ‖S² X‖² = tr(Yᵀ S⁴ Y G),
    ‖ΔW‖² = tr(Bᵀ B G). Cost O(d_out·r·K + d_in·r²). Degenerate cases as `criterion.lowrank_similarity`:
    `zero-update` first, then `zero-V` (s = 0), then `orthogonal` (ΔW orthogonal to the K directions).
    """
    _check_basis(u, s, b.shape[0])
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"A {tuple(a.shape)} does not fit B {tuple(b.shape)}")
    dev = u.device
    a64 = a.to(device=dev, dtype=torch.float64)
    b64 = b.to(device=dev, dtype=torch.float64)
    g = a64 @ a64.T  # r × r
    dw2 = float(((b64.T @ b64) * g).sum())
    w = _weights(s.to(dev))
    if w is None:
        return Similarity(0.0, "zero-update") if dw2 <= 0.0 else Similarity(0.0, ZERO_V)
    y = u.to(torch.float64).T @ b64  # K × r
    num = float(((y.T @ (w[0][:, None] * y)) * g).sum())
    cdw2 = float(((y.T @ (w[1][:, None] * y)) * g).sum())
    return _finish(num, cdw2, dw2)


def sketch_similarity_dense(u: torch.Tensor, s: torch.Tensor, delta: torch.Tensor) -> Similarity:
    """ρ of a dense update ΔW (d_out × d_in, e.g. a full fine-tune's W_task − W_al) from a sketch.

    X = Uᵀ ΔW is one float32 product, O(d_out·d_in·K) (bound by reading ΔW); the row norms of X are
    accumulated in float64, and so is ‖ΔW‖² over rows (each row's d_in squares summed in float32 by
    torch's cascade summation, relative error ~1e-7, which halves a float64 pass over ΔW; counted again in
    float64 when those squares under- or overflow). Degenerate cases as `sketch_similarity_lowrank`.
    """
    _check_basis(u, s, delta.shape[0])
    d32 = delta.to(torch.float32)
    dw2 = float((d32 * d32).sum(dim=1).to(torch.float64).sum())
    if not FLOAT32_TINY <= dw2 < math.inf:
        # float32 squares under- or overflow (entries below ~1e-19 or above ~1e19): count in float64
        dw2 = float(torch.linalg.vector_norm(d32, dtype=torch.float64)) ** 2
    w = _weights(s.to(d32.device))
    if w is None:
        return Similarity(0.0, "zero-update") if dw2 <= 0.0 else Similarity(0.0, ZERO_V)
    x = u.to(device=d32.device, dtype=torch.float32).T @ d32  # K × d_in
    rows = (x.to(torch.float64) ** 2).sum(dim=1)  # ‖x_j‖²
    return _finish(float((w[0] * rows).sum()), float((w[1] * rows).sum()), dw2)


def measured_error(rank: int) -> float:
    """The largest |ρ_sketch − ρ_exact| measured for a sketch of this K (docs/subspace.md): the entry of
    the largest measured K ≤ `rank`; 1.0 (anything may change) below the smallest measured K."""
    known = [k for k in MEASURED_RHO_ERROR if k <= rank]
    return MEASURED_RHO_ERROR[max(known)] if known else 1.0


def near_threshold(rho: float, tau: float, error: float) -> bool:
    """Whether a sketch's ρ is too close to τ to trust its decision: |ρ − τ| ≤ error.

    Use `error = measured_error(sketch.rank_of(module))`; a module for which this is true may be decided
    differently by the exact criterion (method.md §3.2), so callers should warn and name it.
    """
    return abs(rho - tau) <= error


# --- the sketch directory --------------------------------------------------------------------------
class Sketch:
    """A sketch directory opened for reading: metadata in memory, tensors read per module on demand.

    Module names are the checkpoint's weight names without `.weight`; lookups also accept the name a
    PEFT adapter uses (with a leading `model.` / `transformer.` etc.), matched as
    `engine/checkpoint.candidate_keys` does, never by substring.
    """

    def __init__(self, directory: Path, meta: dict[str, Any]):
        self.directory = directory
        self.meta = meta
        self._modules: dict[str, dict[str, Any]] = meta["modules"]

    # --- facts ------------------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """The sketched modules, in natural order (`layers.10` after `layers.9`)."""
        return list(self._modules)

    @property
    def rank(self) -> int:
        """K as asked for when the sketch was built (a module may hold fewer: see `rank_of`)."""
        return int(self.meta["rank"])

    @property
    def transposed(self) -> bool:
        """Whether the weights were Conv1D (stored d_in × d_out); U is in Linear orientation either way."""
        return self.meta["layout"] == "conv1d"

    def resolve(self, module: str) -> str | None:
        """The sketch's name for `module` (exact name first, then without a leading base-model prefix)."""
        for key in candidate_keys(module, "U"):
            name = key[: -len(".U")]
            if name in self._modules:
                return name
        return None

    def _entry(self, module: str) -> dict[str, Any]:
        name = self.resolve(module)
        if name is None:
            raise InputError(f"module {module!r} is not in the subspace sketch {self.directory}")
        return self._modules[name]

    def rank_of(self, module: str) -> int:
        """K held for this module: min(K, d_out, d_in)."""
        return int(self._entry(module)["rank"])

    def shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of the module's V, in nn.Linear orientation."""
        d_out, d_in = self._entry(module)["shape"]
        return int(d_out), int(d_in)

    def energy(self, module: str) -> float:
        """Σ_{j≤K} σ_j² / ‖V‖²_F: the share of V's energy the sketch keeps (1.0 means exact)."""
        return float(self._entry(module)["energy"])

    def frobenius(self, module: str) -> float:
        """‖V‖_F of the module (float64), needed by callers that use C itself (Safe LoRA)."""
        return float(self._entry(module)["frobenius"])

    # --- checks -----------------------------------------------------------------------------------
    def require(self, modules: Iterable[str]) -> None:
        """InputError naming every module (e.g. of a task adapter) that the sketch does not hold."""
        missing = [m for m in modules if self.resolve(m) is None]
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InputError(
                f"the subspace sketch {self.directory} has no module {listed}; rebuild it with "
                "`safemerge subspace` covering these modules (see its --modules)"
            )

    def check_fingerprint(self, aligned: Checkpoint, ignore: bool = False) -> str | None:
        """Check that the sketch was built from this aligned checkpoint.

        Two checks: `Checkpoint.fingerprint` (file names, sizes and headers: cheap, but equal for any two
        checkpoints of one architecture and dtype, e.g. the aligned and the unaligned model), then the
        sha256 of the content of one sketched weight (the first module's; one tensor read). On a mismatch:
        InputError naming both fingerprints, or, with `ignore`, a warning whose text is returned (for a
        report's warnings). Returns None when they match.
        """
        info = self.meta["aligned"]
        recorded, actual = info["fingerprint"], aligned.fingerprint()
        probe = info["probe"]
        if recorded == actual:
            if probe["key"] in aligned and tensor_sha256(aligned.get(probe["key"])) == probe["sha256"]:
                return None
            recorded = f"{recorded} with {probe['key']} of sha256 {probe['sha256']}"
            actual = f"{actual} with {probe['key']} of another content"
        msg = (
            f"the subspace sketch {self.directory} was built from an aligned model with fingerprint "
            f"{recorded}, but {aligned.directory} has fingerprint {actual}"
        )
        if not ignore:
            raise InputError(msg + " (a different model, or a re-saved one)")
        warnings.warn(msg, SafemergeWarning, stacklevel=2)
        return msg

    # --- tensors ----------------------------------------------------------------------------------
    def basis(self, module: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(U, S) of a module: U (d_out × k, float32 also when stored as float16), S (k, float64,
        descending), on `device`."""
        name = self.resolve(module)
        entry = self._entry(module)
        path = self.directory / entry["file"]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                u, s = fh.get_tensor(f"{name}.U"), fh.get_tensor(f"{name}.S")
        except Exception as exc:
            raise InputError(f"{path}: cannot read the sketch of {name!r}: {exc}") from exc
        k = entry["rank"]
        if tuple(u.shape) != (entry["shape"][0], k) or tuple(s.shape) != (k,):
            raise InputError(
                f"{path}: {name} has U {tuple(u.shape)}, S {tuple(s.shape)}; {SKETCH_JSON} says k={k}"
            )
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(s).all())):
            raise InputError(f"{path}: the sketch of {name!r} has NaN or Inf")
        return u.to(device=device, dtype=torch.float32), s.to(device)

    def similarity(self, module: str, a: torch.Tensor, b: torch.Tensor) -> Similarity:
        """ρ of a LoRA update ΔW ∝ B A (factors in Linear orientation, as PEFT stores them)."""
        u, s = self.basis(module, a.device)
        return sketch_similarity_lowrank(u, s, a, b)


def load_sketch(directory: str | Path) -> Sketch:
    """Open a sketch directory: `subspace.json` read and checked, every listed tensor present in its
    file's header. InputError naming the file for anything missing or malformed."""
    directory = Path(directory)
    meta_path = directory / SKETCH_JSON
    if not meta_path.is_file():
        raise InputError(
            f"{directory}: not a subspace sketch ({SKETCH_JSON} missing; see `safemerge subspace`)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: invalid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != SKETCH_FORMAT:
        raise InputError(f"{meta_path}: not a safemerge subspace sketch (format {SKETCH_FORMAT!r} expected)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{meta_path}: format version {meta.get('format_version')} "
            f"(this safemerge reads version {FORMAT_VERSION})"
        )
    missing = [k for k in SKETCH_KEYS if k not in meta]
    if not isinstance(meta.get("modules"), dict) and "modules" not in missing:
        missing.append("modules (a mapping)")
    bad = (
        []
        if missing
        else [m for m, e in meta["modules"].items() if not isinstance(e, dict) or set(MODULE_KEYS) - set(e)]
    )
    if missing or bad:
        what = f"keys {', '.join(missing)}" if missing else f"module entries {', '.join(bad[:3])}"
        raise InputError(f"{meta_path}: incomplete subspace sketch metadata (missing or malformed {what})")
    headers: dict[str, dict[str, Any]] = {}
    for name, entry in meta["modules"].items():
        f = entry["file"]
        if f not in headers:
            if "/" in f or not (directory / f).is_file():
                raise InputError(f"{meta_path} lists {f!r} for {name}, but {directory / f} does not exist")
            headers[f] = _read_safetensors_header(directory / f)
        for t in ("U", "S"):
            if f"{name}.{t}" not in headers[f]:
                raise InputError(f"{directory / f} has no tensor {name}.{t} (listed in {meta_path})")
    return Sketch(directory, meta)


# --- building a sketch: config, module discovery, writing ------------------------------------------
class SubspaceConfig(FlatConfig):
    """Inputs and options of `safemerge subspace` (YAML keys = these fields, flags override them)."""

    aligned: str = Field(description="aligned model (directory or hub id)")
    unaligned: str = Field(description="unaligned (pre-alignment) model (directory or hub id)")
    rank: int = Field(
        ge=1, description="K: singular directions kept per module (clamped to min(d_out, d_in))"
    )
    out: str = Field(description="output directory (must not exist, see force)")
    modules: str | None = Field(
        None, description="regex (re.search on module names) narrowing the default set"
    )
    seed: int = Field(0, description="seed of the randomised SVD")
    layout: Literal["auto", "linear", "conv1d"] = Field(
        "auto", description="weight layout; auto reads config.json's model_type (GPT-2: conv1d)"
    )
    u_dtype: Literal["float32", "float16"] = Field(
        "float32", description="storage of U; float16 halves the size (docs/subspace.md: its cost in ρ)"
    )
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    allow_pickle: bool = Field(False, description="allow pickle checkpoints, loaded with weights_only=True")
    force: bool = Field(False, description="overwrite an existing output directory")

    @field_validator("modules")
    @classmethod
    def _valid_regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        return value


@dataclass
class SubspaceResult:
    """What `subspace()` wrote: the directory, its modules and size, and how long it took."""

    out: Path
    modules: int
    rank: int
    clamped: int  # modules holding fewer than K directions (min(d_out, d_in) < K)
    bytes_on_disk: int
    model_bytes: int  # the sketched weights' size in the aligned plus the unaligned checkpoint
    seconds: float
    energy: list[float] = field(default_factory=list)


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def _layout(ckpt: Checkpoint, layout: str) -> str:
    """'linear' or 'conv1d': as given, or from config.json's model_type (auto)."""
    if layout != "auto":
        return layout
    cfg_path = ckpt.directory / "config.json"
    if not cfg_path.is_file():
        raise InputError(
            f"{ckpt.directory} has no config.json to tell the weight layout; pass --layout linear|conv1d"
        )
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"{cfg_path}: invalid JSON ({exc})") from exc
    return "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"


def discover_modules(aligned: Checkpoint, unaligned: Checkpoint, pattern: str | None) -> dict[str, str]:
    """{module: weight key} of the default linear layers present in both models, narrowed by `pattern`.

    A default module present in one model only, or with different shapes, is an InputError (the two are
    not an aligned/unaligned pair of one architecture).
    """

    def found(ckpt: Checkpoint) -> dict[str, str]:
        keys = [k for k in ckpt.keys() if k.endswith(".weight") and len(ckpt.shape(k)) == 2]  # noqa: SIM118
        mods = {k[: -len(".weight")]: k for k in keys}
        return {m: k for m, k in mods.items() if DEFAULT_MODULES.search(m)}

    al, un = found(aligned), found(unaligned)
    if pattern is not None:
        rx = re.compile(pattern)
        al = {m: k for m, k in al.items() if rx.search(m)}
        un = {m: k for m, k in un.items() if rx.search(m)}
    only = sorted(set(al) ^ set(un), key=natural_key)
    if only:
        raise InputError(
            f"modules present in only one model: {', '.join(only[:5])}"
            f"{' ...' if len(only) > 5 else ''} (aligned {aligned.directory}, "
            f"unaligned {unaligned.directory})"
        )
    if not al:
        what = f"the regex {pattern!r} matches no" if pattern is not None else "no"
        raise InputError(
            f"{what} attention/MLP projection weights in {aligned.directory} "
            "(q/k/v/o/gate/up/down_proj, c_attn/c_proj/c_fc)"
        )
    for k in al.values():
        if aligned.shape(k) != unaligned.shape(k):
            raise InputError(
                f"{k}: aligned shape {aligned.shape(k)} ({aligned.directory}) differs from unaligned shape "
                f"{unaligned.shape(k)} ({unaligned.directory})"
            )
    return {m: al[m] for m in sorted(al, key=natural_key)}


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes, dtype and shape: tells apart checkpoints of one layout."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _open(name: str, label: str, allow_pickle: bool) -> tuple[Checkpoint, dict[str, Any]]:
    directory, revision = resolve_local_dir(name, allow_pickle=allow_pickle)
    ckpt = Checkpoint(directory, allow_pickle=allow_pickle, label=label)
    return ckpt, {"path": str(name), "revision": revision, "fingerprint": ckpt.fingerprint()}


def _probe(ckpt: Checkpoint, key: str) -> dict[str, str]:
    """The content hash of one weight: the fingerprint cannot tell two checkpoints of one layout apart."""
    return {"key": key, "sha256": tensor_sha256(ckpt.get(key))}


def _plan_shards(sizes: dict[str, int]) -> dict[str, str]:
    """{module: file}: modules in order, a new shard when the current one would pass MAX_SHARD_BYTES."""
    groups: list[list[str]] = [[]]
    used = 0
    for m, n in sizes.items():
        if groups[-1] and used + n > MAX_SHARD_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(m)
        used += n
    if len(groups) == 1:
        return dict.fromkeys(groups[0], "subspace.safetensors")
    total = len(groups)
    return {m: f"subspace-{i + 1:05d}-of-{total:05d}.safetensors" for i, g in enumerate(groups) for m in g}


def subspace(cfg: SubspaceConfig, progress: bool = False) -> SubspaceResult:
    """Build the sketch of every selected module of the aligned/unaligned pair and write `cfg.out`.

    Reads one module's two weights at a time (V in float32, then its top-K SVD), keeps only U and S, and
    writes shard by shard into a temporary directory renamed to `cfg.out` when complete.
    """
    start = time.perf_counter()
    out = Path(cfg.out)
    inputs = {"aligned model": cfg.aligned, "unaligned model": cfg.unaligned}
    check_output_dir(out, cfg.force, inputs)
    aligned, info_al = _open(cfg.aligned, "aligned", cfg.allow_pickle)
    unaligned, info_un = _open(cfg.unaligned, "unaligned", cfg.allow_pickle)
    layout = _layout(aligned, cfg.layout)
    device = _device(cfg.device)
    keys = discover_modules(aligned, unaligned, cfg.modules)
    check_distinct(aligned, unaligned, list(keys.values()))  # V = 0: nothing to sketch
    first = next(iter(keys.values()))
    info_al["probe"], info_un["probe"] = _probe(aligned, first), _probe(unaligned, first)
    with atomic_output_dir(out, cfg.force, inputs, "subspace") as tmp:
        entries = _sketch_all(cfg, aligned, unaligned, keys, layout, device, tmp, progress)
        meta = _metadata(cfg, info_al, info_un, layout, device, entries)
        (tmp / SKETCH_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "README.md").write_text(sketch_card(meta))
        size = sum(f.stat().st_size for f in tmp.iterdir())
    model_bytes = sum(c.nbytes(k) for c in (aligned, unaligned) for k in keys.values())
    clamped = sum(e["rank"] < cfg.rank for e in entries.values())
    energies = [e["energy"] for e in entries.values()]
    seconds = time.perf_counter() - start
    return SubspaceResult(out, len(keys), cfg.rank, clamped, size, model_bytes, seconds, energies)


def _sketch_all(
    cfg: SubspaceConfig,
    aligned: Checkpoint,
    unaligned: Checkpoint,
    keys: dict[str, str],
    layout: str,
    device: torch.device,
    tmp: Path,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Sketch the modules in order and write each shard into `tmp` as soon as its last module is done
    (memory holds one shard); returns the per-module entries of subspace.json."""
    shapes = {m: _linear_shape(aligned.shape(k), layout) for m, k in keys.items()}
    ranks = {m: min(cfg.rank, *shape) for m, shape in shapes.items()}
    u_dtype = U_DTYPES[cfg.u_dtype]
    files = _plan_shards({m: shapes[m][0] * ranks[m] * u_dtype.itemsize + ranks[m] * 8 for m in keys})
    order = list(keys)
    entries: dict[str, dict[str, Any]] = {}
    pending: dict[str, torch.Tensor] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not progress) as bar:
        job = bar.add_task("sketching modules", total=len(keys))
        for i, m in enumerate(order):
            seed = module_seed(cfg.seed, m)
            sk = _sketch_module(aligned, unaligned, keys[m], layout, cfg.rank, seed, device)
            pending[f"{m}.U"], pending[f"{m}.S"] = sk.u.to(u_dtype), sk.s
            entries[m] = {
                "key": keys[m], "shape": list(shapes[m]), "rank": ranks[m], "svd": sk.method,
                "frobenius": sk.frobenius, "energy": sk.energy, "file": files[m],
            }  # fmt: skip
            if i + 1 == len(order) or files[order[i + 1]] != files[m]:
                save_file(pending, str(tmp / files[m]), metadata={"format": "pt"})
                pending = {}
            bar.advance(job)
    return entries


def _linear_shape(stored: tuple[int, ...], layout: str) -> tuple[int, int]:
    """(d_out, d_in) of a stored 2-D weight: Conv1D stores d_in × d_out (docs/method.md §2)."""
    rows, cols = stored
    return (cols, rows) if layout == "conv1d" else (rows, cols)


def _sketch_module(
    aligned: Checkpoint,
    unaligned: Checkpoint,
    key: str,
    layout: str,
    rank: int,
    seed: int,
    device: torch.device,
) -> ModuleSketch:
    """Read one module's two weights (refusing NaN/Inf), form V in float32 (Linear orientation), sketch it."""
    v = aligned.get_float(key).to(device)
    v.sub_(unaligned.get_float(key).to(device))
    return sketch_matrix(v.T if layout == "conv1d" else v, rank, seed)


def _metadata(
    cfg: SubspaceConfig,
    info_al: dict[str, Any],
    info_un: dict[str, Any],
    layout: str,
    device: torch.device,
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The content of subspace.json: deterministic (no timestamps, no output path)."""
    return {
        "format": SKETCH_FORMAT,
        "format_version": FORMAT_VERSION,
        "safemerge_version": __version__,
        "torch_version": torch.__version__,
        "aligned": info_al,
        "unaligned": info_un,
        "rank": cfg.rank,
        "seed": cfg.seed,
        "modules_regex": cfg.modules,
        "layout": layout,
        "device": device.type,
        "dtype": {"U": cfg.u_dtype, "S": "float64"},
        "svd": {
            "oversample": OVERSAMPLE,
            "power_iterations": POWER_ITERATIONS,
            "exact_max_dim": EXACT_MAX_DIM,
        },
        "modules": entries,
    }


def sketch_card(meta: dict[str, Any]) -> str:
    """README.md of a sketch directory: YAML front matter for the hub, then what it holds, how to use it."""
    mods = meta["modules"]
    energies = sorted(e["energy"] for e in mods.values())
    clamped = sum(e["rank"] < meta["rank"] for e in mods.values())
    clamp_note = f", {clamped} modules clamped to min(d_out, d_in)" if clamped else ""
    front = "\n".join(
        ["---", f"base_model: {meta['aligned']['path']}", "tags:", "- safemerge", "- safety", "---"]
    )
    body = f"""
# SafeMERGE safety-subspace sketch

The top-{meta["rank"]} left singular vectors and singular values of V = W_aligned − W_unaligned for
{len(mods)} modules, made by [safemerge](https://arxiv.org/abs/2503.17239) `subspace` (version
{meta["safemerge_version"]}, seed {meta["seed"]}, layout `{meta["layout"]}`{clamp_note}).

- aligned: `{meta["aligned"]["path"]}` (fingerprint `{meta["aligned"]["fingerprint"][:16]}…`)
- unaligned: `{meta["unaligned"]["path"]}` (fingerprint `{meta["unaligned"]["fingerprint"][:16]}…`)
- share of ‖V‖²_F kept per module: {energies[0]:.4f} (lowest) to {energies[-1]:.4f} (highest)

It stands in for the model pair when computing SafeMERGE's similarity ρ (`safemerge scan --subspace DIR`):
it holds C = V Vᵀ / ‖V‖_F up to its top-{meta["rank"]} directions, so ρ of a LoRA needs neither model.
How close ρ from a sketch stays to the exact ρ, and where a sketch is not safe to use, is in
safemerge's docs/subspace.md. Per module: `subspace.json`; tensors
`<module>.U` (d_out × K, {meta["dtype"]["U"]}) and `<module>.S` (K, float64) in the safetensors files.
"""
    return front + "\n" + body
