"""The floating-point precision to train and generate in on this machine: bfloat16 only where it is
clearly faster than float32.

On CPUs with native bfloat16 products (x86 AVX512-BF16 or AMX-BF16) a bfloat16 matrix product runs
several times faster than a float32 one; on CPUs without them (AVX2-only x86: many laptops, older
servers and cloud VMs) torch emulates bfloat16 and the same product runs 10x slower or worse
(docs/organism.md, "Precision"). The CPU's flags alone do not settle it (torch's kernels and their
dispatch do), so on the CPU a short probe times one product at the organism's shapes in both
precisions and the rule `faster_precision` picks; the result is cached per machine in
`$SAFEMERGE_CACHE/precision.json`.

`resolve_precision` decides in this order: an explicit request (float32 / bfloat16), then
`$SAFEMERGE_DTYPE` (float32, bfloat16 or auto), then on a GPU bfloat16 where torch says the GPU supports
it (float32 otherwise), then on the CPU the probe.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError
from safemerge.common.packaged import cache_root

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16")
CHOICES = (*PRECISIONS, "auto")
ENV = "SAFEMERGE_DTYPE"
# bfloat16 must beat float32 by this factor: at 1 thread bfloat16 measured 5-7x float32's speed with
# native kernels and under 0.1x emulated (docs/benchmarks.md), so the margin only keeps a noisy near-tie
# in float32, the exact one.
MIN_SPEEDUP = 1.3
# The probe's product: a batch of 8 sequences × 64 tokens (the organism's training batch at a typical
# length) through SmolLM2-135M's MLP up-projection, hidden 576 → intermediate 1536.
PROBE_TOKENS, PROBE_IN, PROBE_OUT = 512, 576, 1536
PROBE_REPS = 5  # timed products per precision at most (2 at least); the minimum counts
PROBE_BUDGET_S = 0.2  # stop repeating after this long (an emulated bfloat16 product takes ~0.1 s)
CACHE_FILE = "precision.json"
CACHE_FORMAT = 1
# CPU flags that change how fast torch runs a bfloat16 product (x86 and Arm); they key the cache.
BF16_FLAGS = (
    "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile",  # x86
    "asimd", "bf16", "i8mm", "sve", "sve2", "svebf16",  # Arm (/proc/cpuinfo "Features")
)  # fmt: skip

_memo: dict[str, PrecisionChoice] = {}  # machine key → the choice, once per process


@dataclass(frozen=True)
class ProbeTimings:
    """The probe's best time of one product in each precision, and its shape and thread count."""

    float32_s: float
    bfloat16_s: float
    tokens: int = PROBE_TOKENS
    d_in: int = PROBE_IN
    d_out: int = PROBE_OUT
    threads: int = 1

    @property
    def speedup(self) -> float:
        """bfloat16's speed as a multiple of float32's (above 1: bfloat16 is faster)."""
        return self.float32_s / self.bfloat16_s

    def gflops(self, dtype: str) -> float:
        """The product's rate in GFLOP/s (2·tokens·d_in·d_out flops)."""
        seconds = self.float32_s if dtype == "float32" else self.bfloat16_s
        return 2 * self.tokens * self.d_in * self.d_out / seconds / 1e9


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision and why: `source` is "requested", "$SAFEMERGE_DTYPE", "gpu", "probe" or
    "probe (cached)"; a probe's timings and the machine they were measured on come with it."""

    dtype: str
    source: str
    probe: ProbeTimings | None = None
    machine: str = ""

    def describe(self) -> str:
        """One line for tables and logs, e.g. `float32 (probe: bfloat16 at 0.11x float32's speed on
        this CPU, 1 thread; bfloat16 needs >= 1.3x)`."""
        if self.probe is None:
            return f"{self.dtype} ({self.source})"
        p, n = self.probe, self.probe.threads
        return (
            f"{self.dtype} ({self.source}: bfloat16 at {p.speedup:.2f}x float32's speed on this CPU, "
            f"{n} thread{'s' if n != 1 else ''}; bfloat16 needs >= {MIN_SPEEDUP:g}x)"
        )

    def as_dict(self) -> dict[str, Any]:
        """What results files record."""
        out: dict[str, Any] = {"dtype": self.dtype, "chosen_by": self.source}
        if self.probe is not None:
            out["probe"] = {
                **asdict(self.probe),
                "bfloat16_speedup": round(self.probe.speedup, 3),
                "min_speedup": MIN_SPEEDUP,
            }
            out["machine"] = self.machine
        return out


def faster_precision(float32_s: float, bfloat16_s: float, min_speedup: float = MIN_SPEEDUP) -> str:
    """The rule: bfloat16 when its product takes at most 1/`min_speedup` of float32's time, else float32
    (float32 is exact where bfloat16 rounds, so a tie goes to float32)."""
    if bfloat16_s > 0 and float32_s / bfloat16_s >= min_speedup:
        return "bfloat16"
    return "float32"


def check_precision(value: str, where: str) -> str:
    """`value` if it is float32, bfloat16 or auto; else InputError naming `where` and the allowed values."""
    if value not in CHOICES:
        raise InputError(f"{where}={value!r}: expected one of {', '.join(CHOICES)}")
    return value


def env_precision() -> str:
    """`$SAFEMERGE_DTYPE` checked ("auto" when unset or empty)."""
    value = os.environ.get(ENV, "").strip()
    return check_precision(value, f"${ENV}") if value else "auto"


def cpu_identity() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the bf16-relevant flags it has) from /proc/cpuinfo; the platform's processor
    name and no flags where that file is absent (not Linux)."""
    name, flags = "", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu part") and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return name, tuple(f for f in BF16_FLAGS if f in flags)


def machine_key(threads: int) -> str:
    """What the probe's answer depends on: the CPU, its bf16-relevant flags, torch's version and the
    thread count. Readable, so precision.json says what each entry was measured on."""
    import torch

    name, flags = cpu_identity()
    return f"{name} | flags {' '.join(flags) or '-'} | torch {torch.__version__} | threads {threads}"


def probe_products(
    tokens: int = PROBE_TOKENS, reps: int = PROBE_REPS, budget_s: float = PROBE_BUDGET_S
) -> ProbeTimings:
    """Time `F.linear` of a [tokens, 576] input by a [1536, 576] weight in float32 and in bfloat16 at
    torch's current thread count, alternating, up to `reps` products each, stopping after `budget_s`
    once each has run twice; the minimum of each counts (the machine's own rate, least disturbed by
    other load). No separate warm-up: the first call's one-off costs (kernel selection, weight packing)
    lose to the later ones in the minimum, and an emulated bfloat16 product (~0.1 s) needs no more."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, PROBE_IN, generator=gen)
    w = torch.randn(PROBE_OUT, PROBE_IN, generator=gen)
    pairs = {"float32": (x, w), "bfloat16": (x.bfloat16(), w.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(max(reps, 2)):
            for dtype, (a, b) in pairs.items():
                t0 = time.perf_counter()
                torch.nn.functional.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - t0)
            if i >= 1 and time.perf_counter() - start > budget_s:
                break
    return ProbeTimings(best["float32"], best["bfloat16"], tokens, threads=torch.get_num_threads())


def _read_cache(path: Path) -> dict[str, Any]:
    """precision.json's entries; {} when it is absent or unreadable (it is only a cache: measure again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring the precision cache %s (%s); measuring again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return {}
    machines = data.get("machines")
    return machines if isinstance(machines, dict) else {}


def _cached_timings(entry: Any) -> ProbeTimings | None:
    try:
        t = ProbeTimings(**{k: entry[k] for k in ("float32_s", "bfloat16_s", "tokens", "d_in", "d_out")},
                         threads=entry["threads"])  # fmt: skip
    except (KeyError, TypeError):
        return None
    ok = all(isinstance(v, (int, float)) and v > 0 for v in asdict(t).values())
    return t if ok else None


def _write_cache(path: Path, key: str, timings: ProbeTimings) -> None:
    """Add this machine's entry to precision.json (written whole to a temporary file, then renamed)."""
    machines = _read_cache(path)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    machines[key] = {**asdict(timings), "precision": faster_precision(timings.float32_s,
                     timings.bfloat16_s), "measured": when}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".precision-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "machines": machines}, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the precision cache %s (%s); the probe will run again", path, exc)


def probed_precision(
    cache_dir: Path | None = None, probe: Callable[[], ProbeTimings] = probe_products
) -> PrecisionChoice:
    """The CPU's precision by the probe, from precision.json when this machine (`machine_key`) has an
    entry there, else measured now and added to it."""
    import torch

    key = machine_key(torch.get_num_threads())
    path = (cache_dir or cache_root()) / CACHE_FILE
    memo = f"{path}\n{key}"
    if memo in _memo:
        return _memo[memo]
    timings = _cached_timings(_read_cache(path).get(key))
    source = "probe (cached)"
    if timings is None:
        timings, source = probe(), "probe"
        _write_cache(path, key, timings)
    choice = PrecisionChoice(faster_precision(timings.float32_s, timings.bfloat16_s), source, timings, key)
    _memo[memo] = choice
    return choice


def resolve_precision(
    requested: str = "auto",
    device: str = "cpu",
    cache_dir: Path | None = None,
    probe: Callable[[], ProbeTimings] = probe_products,
) -> PrecisionChoice:
    """The precision to train and generate in on `device`: `requested` unless "auto", then
    `$SAFEMERGE_DTYPE` unless "auto", then bfloat16 on a GPU that supports it (float32 on one that does
    not), then on the CPU the probe's choice (`probed_precision`)."""
    check_precision(requested, "precision")
    if requested != "auto":
        choice = PrecisionChoice(requested, "requested")
    elif (env := env_precision()) != "auto":
        choice = PrecisionChoice(env, f"${ENV}")
    elif device.startswith("cuda"):
        import torch

        choice = PrecisionChoice("bfloat16" if torch.cuda.is_bf16_supported() else "float32", "gpu")
    else:
        choice = probed_precision(cache_dir, probe)
    log.info("precision: %s", choice.describe())
    return choice
