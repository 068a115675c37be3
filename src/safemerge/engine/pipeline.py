"""The public Python API: `scan()` and `merge()` stream modules through the criterion and the merge.

One pass over the task adapter's modules reads W_al and W_un of one module at a time, computes ρ and
forgets them. The merge itself needs only the adapters' factors (small), and the optional full model is
written shard by shard. Everything is written to a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from safemerge.common.config_io import plain_dump
from safemerge.common.errors import InputError, SafemergeWarning
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.engine.checkpoint import Checkpoint, file_sha256, find_module_weight, resolve_local_dir
from safemerge.engine.config import MergeConfig, MergeOptions, ScanConfig, SelectionConfig
from safemerge.engine.criterion import (
    ZERO_V,
    Similarity,
    select_fraction,
    select_threshold,
    select_top_k,
    weights_similarity,
)
from safemerge.engine.fullft import (
    FullMerge,
    FullModel,
    LoraSafety,
    ModelSafety,
    SafetyUpdates,
    conv1d_layout,
    full_similarities,
    full_sketch_similarities,
    write_full_merge,
)
from safemerge.engine.inputs import (
    check_distinct,
    check_fits,
    check_lora_inputs,
    check_not_swapped,
    check_some_v,
    role_warning,
)
from safemerge.engine.lora import LoraAdapter, LoraFactors, layer_index, module_type, write_adapter
from safemerge.engine.merging import (
    dare_no_pruning,
    exact_merge,
    merge_dense,
    module_seed,
    pad_rank,
    peft_linear_merge,
    svd_factors,
)
from safemerge.engine.report import (
    NO_COUNTERPART,
    ModuleRecord,
    Report,
    full_model_card,
    library_versions,
    merged_model_card,
    model_card,
    write_report,
)
from safemerge.engine.rerun import rerun_comment, rerunnable
from safemerge.engine.subspace import Sketch, load_sketch, measured_error, near_threshold
from safemerge.engine.writer import write_merged_model

ALLOW_PARTIAL_FLAG = "--allow-partial (YAML: allow_partial: true)"  # how the CLI and YAML spell it


# --- tensor-level API ------------------------------------------------------------------------------
def lora_delta_norm(factors: LoraFactors) -> float:
    """‖s · B A‖_F from the factors alone (float64): s · sqrt(tr(BᵀB · A Aᵀ))."""
    a = factors.A.to(torch.float64)
    b = factors.B.to(torch.float64)
    val = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(factors.scaling) * math.sqrt(max(val, 0.0))


def module_similarity(
    w_aligned: torch.Tensor, w_unaligned: torch.Tensor, task: LoraFactors, fan_in_fan_out: bool = False
) -> Similarity:
    """ρ of one module from its aligned/unaligned weights and the task factors (tensors in memory)."""
    block_rows = w_aligned.shape[0] if w_aligned.is_cuda else 256  # CPU: blocks that stay in cache
    return weights_similarity(w_aligned, w_unaligned, task.A, task.B, fan_in_fan_out, block_rows)


def select(rhos: list[float], selection: SelectionConfig, last: Collection[int] = ()) -> list[bool]:
    """Apply the configured selection policy to a list of ρ. The ranking policies (top-k, fraction) rank
    the indices in `last` (the `zero-V` modules, see `ranked_last`) after all others; the threshold
    policy compares every ρ with τ as it is. `order` / `order_seed` (top-k and fraction only) take the
    highest ρ or a seeded random draw instead of the lowest: the selection controls. A k above the
    number of modules is refused (InputError): it would silently select them all."""
    if selection.top_k is not None:
        if selection.top_k > len(rhos):
            raise InputError(
                f"top_k {selection.top_k} is more than the {len(rhos)} modules scanned: give --top-k between "
                f"1 and {len(rhos)} (or --fraction 1 for every module)"
            )
        return select_top_k(rhos, selection.top_k, last, selection.order, selection.order_seed)
    if selection.fraction is not None:
        return select_fraction(rhos, selection.fraction, last, selection.order, selection.order_seed)
    assert selection.threshold is not None
    return select_threshold(rhos, selection.threshold)


def ranked_last(records: list[ModuleRecord]) -> set[int]:
    """Indices of the modules flagged `zero-V` (V = 0: ρ = 0 by convention, not measured), which the
    ranking policies place last (docs/method.md §9)."""
    return {i for i, r in enumerate(records) if ZERO_V in r.flags}


# --- helpers ---------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=not enabled) as bar:
        yield bar


def open_checkpoint(name: str, label: str, allow_pickle: bool) -> tuple[Checkpoint, dict[str, Any]]:
    """Open a base checkpoint and describe it for the report (path, hub revision, fingerprint)."""
    directory, revision = resolve_local_dir(name, allow_pickle=allow_pickle)
    ckpt = Checkpoint(directory, allow_pickle=allow_pickle, label=label)
    info = {
        "path": str(name),
        "local_dir": str(directory),
        "revision": revision,
        "fingerprint": ckpt.fingerprint(),
    }
    return ckpt, info


def _adapter_info(adapter: LoraAdapter, name: str) -> dict[str, Any]:
    return {
        "path": str(name),
        "local_dir": str(adapter.directory),
        "revision": adapter.revision,
        "sha256": file_sha256(adapter.weights_file),
        "config": {k: adapter.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")},
    }


def _check_finite_inputs(tensors: list[tuple[str, Checkpoint | LoraAdapter, torch.Tensor]]) -> None:
    for name, source, t in tensors:
        if not bool(torch.isfinite(t.to(torch.float32)).all()):
            where = source.directory
            raise InputError(f"tensor {name!r} of {source.label} {where} has NaN or Inf")


def _similarities(
    aligned: Checkpoint, unaligned: Checkpoint, task: LoraAdapter, device: torch.device, progress: bool
) -> list[ModuleRecord]:
    """Stream the task adapter's modules: read W_al and W_un of one module, compute ρ, forget them."""
    records: list[ModuleRecord] = []
    with progress_bar(progress) as bar:
        job = bar.add_task("scanning modules", total=len(task.lora_modules))
        for module in task.lora_modules:
            factors = task.factors(module)
            key_al, key_un = _base_keys(aligned, unaligned, task, module, factors)
            w_al = aligned.get(key_al).to(device)
            w_un = unaligned.get(key_un).to(device)
            dev_factors = LoraFactors(factors.A.to(device), factors.B.to(device), factors.scaling)
            try:
                sim = module_similarity(w_al, w_un, dev_factors, task.fan_in_fan_out)
            except ValueError:  # non-finite input: name the tensor
                inputs: list[tuple[str, Checkpoint | LoraAdapter, torch.Tensor]] = [
                    (key_al, aligned, w_al),
                    (key_un, unaligned, w_un),
                    (f"{module}.lora_A", task, factors.A),
                ]
                _check_finite_inputs(inputs)
                raise
            del w_al, w_un
            records.append(module_record(module, factors, sim))
            bar.advance(job)
    return records


def _base_keys(
    aligned: Checkpoint, unaligned: Checkpoint, task: LoraAdapter, module: str, factors: LoraFactors
) -> tuple[str, str]:
    """The module's weight keys in both checkpoints, after checking that their shapes fit the adapter."""
    key_al = find_module_weight(aligned, module)
    key_un = find_module_weight(unaligned, module)
    shape_al, shape_un = aligned.shape(key_al), unaligned.shape(key_un)
    if shape_al != shape_un:
        raise InputError(
            f"{key_al}: aligned shape {shape_al} ({aligned.directory}) differs from unaligned shape "
            f"{shape_un} ({unaligned.directory})"
        )
    d_out, d_in = factors.B.shape[0], factors.A.shape[1]
    expected = (d_in, d_out) if task.fan_in_fan_out else (d_out, d_in)
    if tuple(shape_al) != expected:
        raise InputError(
            f"module {module}: {task.label} expects a weight of shape {expected}, but {key_al} in "
            f"{aligned.directory} has {tuple(shape_al)} — is the adapter for this architecture?"
        )
    return key_al, key_un


def module_record(module: str, factors: LoraFactors, sim: Similarity) -> ModuleRecord:
    """The report row of a scanned module (not yet selected): its name, layer, type, shape, rank, ρ and
    ‖ΔW‖, with the degeneracy as a flag. The file-based scan and the in-memory one (`safemerge.peft`)
    both build their rows here."""
    return ModuleRecord(
        name=module,
        layer=layer_index(module),
        module_type=module_type(module),
        shape=(int(factors.B.shape[0]), int(factors.A.shape[1])),
        rank_task=factors.rank,
        rho=sim.rho,
        rho_rounded=sim.rho_rounded,
        selected=False,
        delta_norm_in=lora_delta_norm(factors),
        flags=[sim.degenerate] if sim.degenerate else [],
    )


@dataclass
class ScanSources:
    """Where V comes from: the aligned and unaligned checkpoints, or a sketch (`subspace`), plus the
    aligned checkpoint when given; `inputs` describes them for the report."""

    aligned: Checkpoint | None
    unaligned: Checkpoint | None
    sketch: Sketch | None
    inputs: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def open_sources(cfg: ScanConfig) -> ScanSources:
    """Open the base checkpoints and the sketch the config names; a sketch must match the aligned model's
    fingerprint when both are given (InputError, unless `ignore_fingerprint`, which the report records)."""
    run, given = cfg.run, cfg.inputs
    src = ScanSources(None, None, None, {})
    if given.aligned is not None:
        src.aligned, src.inputs["aligned"] = open_checkpoint(given.aligned, "aligned", run.allow_pickle)
    if given.unaligned is not None:
        unaligned = open_checkpoint(given.unaligned, "unaligned", run.allow_pickle)
        src.unaligned, src.inputs["unaligned"] = unaligned
    if given.subspace is not None:
        src.sketch = load_sketch(given.subspace)
        src.inputs["subspace"] = sketch_info(src.sketch, given.subspace)
        if src.aligned is not None:
            mismatch = src.sketch.check_fingerprint(src.aligned, ignore=given.ignore_fingerprint)
            src.inputs["subspace"]["fingerprint_matches"] = mismatch is None
            if mismatch:
                src.warnings.append(f"{mismatch}; used anyway (ignore_fingerprint)")
    return src


def sketch_info(sketch: Sketch, name: str) -> dict[str, Any]:
    """The report's description of a sketch: path, K, and the models it was made from."""
    meta = sketch.meta
    return {
        "path": str(name),
        "local_dir": str(sketch.directory),
        "rank": sketch.rank,
        "layout": meta.get("layout"),
        "aligned": {k: meta["aligned"].get(k) for k in ("path", "revision", "fingerprint")},
        "unaligned": {k: meta["unaligned"].get(k) for k in ("path", "revision", "fingerprint")},
    }


def _sketch_similarities(
    sketch: Sketch, task: LoraAdapter, device: torch.device, progress: bool
) -> list[ModuleRecord]:
    """ρ of every task module from the sketch (no base weights read); the record keeps its energy."""
    sketch.require(task.lora_modules)
    records: list[ModuleRecord] = []
    with progress_bar(progress) as bar:
        job = bar.add_task("scanning modules", total=len(task.lora_modules))
        for module in task.lora_modules:
            factors = task.factors(module)
            shape = (int(factors.B.shape[0]), int(factors.A.shape[1]))
            if sketch.shape(module) != shape:
                raise InputError(
                    f"module {module}: the {task.label} expects (d_out, d_in) = {shape}, the subspace sketch "
                    f"{sketch.directory} holds {sketch.shape(module)}"
                )
            sim = sketch.similarity(module, factors.A.to(device), factors.B.to(device))
            records.append(module_record(module, factors, sim))
            records[-1].sketch_energy = sketch.energy(module)
            bar.advance(job)
    return records


def note_sketch(report: Report, src: ScanSources, cfg: ScanConfig) -> None:
    """Record that ρ came from a rank-K sketch; warn about fingerprint overrides and about modules whose
    ρ lies within the sketch's measured error of τ (docs/subspace.md), where the exact ρ may decide
    differently. A module sketched at full rank is exact and never warned about."""
    if src.sketch is None:
        return
    sketch = src.sketch
    report.options["rho_source"] = f"rank-{sketch.rank} sketch of V ({cfg.inputs.subspace})"
    report.warnings.extend(src.warnings)  # Sketch.check_fingerprint has warned already
    tau = cfg.selection.threshold  # None under top-k / fraction (one policy at a time)
    if tau is None:
        return
    close = [
        r.name
        for r in report.modules
        if sketch.rank_of(r.name) < min(sketch.shape(r.name))
        and near_threshold(r.rho, tau, measured_error(sketch.rank_of(r.name)))
    ]
    if close:
        warn_in_report(
            report,
            f"{len(close)} module(s) have rho within the measured sketch error of the threshold {tau}; the "
            f"exact criterion may decide them differently: {_listed(close)}",
        )


def run_scan(
    cfg: ScanConfig, command: str, progress: bool, safety: LoraAdapter | None = None
) -> tuple[Report, LoraAdapter, Checkpoint | None]:
    """ρ and the selection for every task module; returns the report, the task adapter and the aligned
    model (None for a scan from a sketch without one). The inputs, with the `safety` adapter of a merge,
    are checked for their roles first (`engine/inputs.py`)."""
    if cfg.inputs.task_model is not None:
        raise InputError(f"{command}: this step takes a task adapter, not a full fine-tune (task_model)")
    assert cfg.inputs.task_adapter is not None  # InputsConfig: exactly one task input
    task = LoraAdapter.load(cfg.inputs.task_adapter, label="task adapter")
    src = open_sources(cfg)
    unaligned = (src.unaligned, str(cfg.inputs.unaligned)) if src.unaligned is not None else None
    role_warnings = check_lora_inputs(task, safety, src.aligned, unaligned)
    inputs = src.inputs | {"task_adapter": _adapter_info(task, cfg.inputs.task_adapter)}
    device = resolve_device(cfg.run.device)
    if src.sketch is not None:
        records = _sketch_similarities(src.sketch, task, device, progress)
    else:
        assert src.aligned is not None and src.unaligned is not None  # InputsConfig
        records = _similarities(src.aligned, src.unaligned, task, device, progress)
        check_some_v((r.flags for r in records), ZERO_V, cfg.inputs.aligned, str(cfg.inputs.unaligned))
    report = _selected_report(cfg, command, inputs, records)
    report.warnings[:0] = task.warnings  # LoraAdapter.load has warned already
    note_sketch(report, src, cfg)
    for msg in role_warnings:
        warn_in_report(report, msg)
    return report, task, src.aligned


def run_full_scan(cfg: ScanConfig, command: str, progress: bool) -> tuple[Report, FullModel, Checkpoint]:
    """ρ and the selection for every module of a full fine-tune (docs/method.md §3.7); returns the report,
    the task model and the aligned model."""
    assert cfg.inputs.task_model is not None  # InputsConfig: a full fine-tune needs the aligned model too
    src = open_sources(cfg)
    aligned = src.aligned
    assert aligned is not None
    model, info_task = open_checkpoint(cfg.inputs.task_model, "task model", cfg.run.allow_pickle)
    task = FullModel.open(model, aligned, src.unaligned, cfg.inputs.modules)
    if src.unaligned is not None:
        check_distinct(aligned, src.unaligned, [m + ".weight" for m in task.modules])
    inputs = src.inputs | {"task_model": info_task}
    device = resolve_device(cfg.run.device)
    if src.sketch is not None:
        records = full_sketch_similarities(aligned, src.sketch, task, device, progress)
    else:
        assert src.unaligned is not None  # InputsConfig: unaligned or subspace
        records = full_similarities(aligned, src.unaligned, task, device, progress)
        check_some_v((r.flags for r in records), ZERO_V, cfg.inputs.aligned, str(cfg.inputs.unaligned))
    report = _selected_report(cfg, command, inputs, records)
    note_sketch(report, src, cfg)
    if task.missing_unaligned:
        warn_in_report(
            report,
            f"{len(task.missing_unaligned)} module(s) are not in the unaligned model and were not scanned: "
            f"{_listed(task.missing_unaligned)}",
        )
    return report, task, aligned


def _selected_report(
    cfg: ScanConfig, command: str, inputs: dict[str, Any], records: list[ModuleRecord]
) -> Report:
    """The scan's report of a config: its options (less `force`: how to write, not what was computed)."""
    return selected_report(command, inputs, plain_dump(cfg, exclude=("force",)), records, cfg.selection)


def selected_report(
    command: str,
    inputs: dict[str, Any],
    options: dict[str, Any],
    records: list[ModuleRecord],
    selection: SelectionConfig,
) -> Report:
    """The scan's report: the selection policy applied to the records (`select`, with `zero-V` modules
    ranked last), the policy added to `options`, and a warning per degenerate module. Shared by the
    file-based scan and the in-memory one (`safemerge.peft`)."""
    chosen_all = select([r.rho for r in records], selection, ranked_last(records))
    for rec, chosen in zip(records, chosen_all, strict=True):
        rec.selected = chosen
    options["selection_policy"] = selection.policy
    report = Report(command, inputs, options, records, library_versions())
    for rec in records:
        if rec.flags:
            warn_in_report(
                report, f"{rec.name}: degenerate similarity ({', '.join(rec.flags)}), rho set to 0"
            )
    return report


def input_paths(cfg: ScanConfig) -> dict[str, str | None]:
    """Every input of a scan or merge by label: an output directory must not overlap any of them."""
    safety = {
        "safety adapter": getattr(cfg, "safety_adapter", None),
        "safety model": getattr(cfg, "safety_model", None),
    }
    return {**cfg.inputs.paths(), **safety}


def scan(cfg: ScanConfig, progress: bool = False) -> Report:
    """Compute ρ for every module of the task adapter and apply the selection policy.

    With `cfg.out`, also writes the report (JSON, Markdown, plot) there, atomically.
    """
    if cfg.out:
        check_output_dir(Path(cfg.out), cfg.run.force, input_paths(cfg))
    if cfg.inputs.task_model is not None:
        report, _, _ = run_full_scan(cfg, "scan", progress)
    else:
        report, _, _ = run_scan(cfg, "scan", progress)
    if cfg.out:
        with atomic_output_dir(cfg.out, cfg.run.force, input_paths(cfg), "scan") as tmp:
            write_report(report, tmp, plot=cfg.run.plot)
        report.outputs["report"] = str(Path(cfg.out) / "safemerge_report.json")
    return report


# --- merge -----------------------------------------------------------------------------------------
def output_scaling(scalings: Collection[float], rank: int) -> tuple[float, float]:
    """(out_scale, lora_alpha) of the merged adapter, given the task modules' scalings.

    When every task module has the same scaling s, the output keeps s (lora_alpha = s · rank), so the
    factors of unselected modules are stored bit-for-bit unchanged; otherwise the scalings are baked into
    A and the output scaling is 1 (lora_alpha = rank), as in docs/method.md §4.
    """
    scales = set(scalings)
    if len(scales) == 1:
        s = scales.pop()
        alpha = s * rank
        if s > 0 and alpha / rank == s:
            return s, alpha
    return 1.0, float(rank)


@dataclass
class MergedAdapter:
    """The result of merging factors: one (A, B) per module (float64), sharing `rank` and `scaling`."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scaling: float
    lora_alpha: float
    merged: set[str] = field(default_factory=set)
    no_safety_counterpart: list[str] = field(default_factory=list)
    svd_rel_errors: dict[str, float] = field(default_factory=dict)


def merge_modules(
    task: Mapping[str, LoraFactors],
    safety: Mapping[str, LoraFactors],
    selected: Collection[str],
    *,
    weights: tuple[float, float] = (0.8, 0.2),
    mode: str = "exact",
    method: str = "linear",
    density: float = 0.5,
    seed: int = 0,
    rank: int | None = None,
    dtype: torch.dtype = torch.float64,
    allow_partial: bool = False,
) -> MergedAdapter:
    """Merge the selected task modules with their safety counterparts; keep every other module.

    Tensor-level API (adapters held in memory); `merge()` calls it with factors read lazily from disk.
    Results are computed in float64 and stored in `dtype`, module by module (memory holds the output and
    one module's inputs). A selected module without a safety counterpart is refused (`InputError`, before
    any factor is read); with `allow_partial` it is kept as fine-tuned and listed in
    `no_safety_counterpart` (docs/engine.md, "Partial merges").
    """
    if not task:
        raise InputError("no task modules to merge")
    missing = [m for m in task if m in selected and m not in safety]
    if missing and not allow_partial:
        raise InputError(
            f"{len(missing)} selected module(s) have no safety counterpart: {_listed(missing)}; "
            "pass allow_partial=True to keep them as fine-tuned"
        )
    # One pass for the shapes and scalings (factors of lazy mappings are read from disk on access).
    task_meta = {m: (f.rank, f.scaling) for m, f in task.items()}
    safety_rank = {m: f.rank for m, f in safety.items()}
    out_rank = _output_rank(task_meta, safety_rank, mode, method, rank)
    out_scale, alpha = output_scaling([s for _, s in task_meta.values()], out_rank)
    result = MergedAdapter({}, out_rank, out_scale, alpha)
    for name, tf in task.items():
        sf = safety[name] if name in selected and name in safety_rank else None
        if name in selected and sf is None:
            result.no_safety_counterpart.append(name)
        if sf is None:
            a, b = exact_merge(tf, None, 1.0, 0.0, out_scale)
        else:
            a, b = _merge_module(name, tf, sf, result, weights, mode, method, density, seed)
            result.merged.add(name)
        a, b = pad_rank(a, b, out_rank)
        result.factors[name] = (a.to(dtype), b.to(dtype))
    return result


def _output_rank(
    task_meta: Mapping[str, tuple[int, float]],
    safety_rank: Mapping[str, int],
    mode: str,
    method: str,
    rank: int | None,
) -> int:
    """The merged adapter's one rank: the task's for peft-linear, `rank` for TIES/DARE when given (never
    below the task's: unselected modules keep their factors), else the largest r_task + r_safety."""
    r_max = max(r for r, _ in task_meta.values())
    if mode == "peft-linear":
        return r_max
    if method != "linear" and rank is not None:
        if rank < r_max:
            raise InputError(
                f"--rank {rank} is below the task adapter's rank {r_max}; unselected modules need it"
            )
        return rank
    return max(r + safety_rank.get(m, 0) for m, (r, _) in task_meta.items())


def _merge_module(
    name: str,
    tf: LoraFactors,
    sf: LoraFactors,
    result: MergedAdapter,
    weights: tuple[float, float],
    mode: str,
    method: str,
    density: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of one selected module (float64), by the configured operator (docs/method.md §4)."""
    w_f, w_s = weights
    if mode == "peft-linear":
        if tf.rank != sf.rank:
            raise InputError(
                f"mode peft-linear needs equal ranks: {name} has task r={tf.rank}, safety r={sf.rank}"
            )
        return peft_linear_merge(tf, sf, w_f, w_s, result.scaling)
    if method == "linear":
        return exact_merge(tf, sf, w_f, w_s, result.scaling)
    dense = merge_dense([tf.delta(), sf.delta()], [w_f, w_s], method, density, module_seed(seed, name))
    a, b, result.svd_rel_errors[name] = svd_factors(
        dense, result.rank, result.scaling, module_seed(seed + 1, name)
    )
    return a, b


class LazyFactors(Mapping[str, LoraFactors]):
    """An adapter's modules as a mapping whose factors are read from disk on access, not held."""

    def __init__(self, adapter: LoraAdapter, modules: Collection[str]):
        self.adapter, self.modules = adapter, [m for m in adapter.lora_modules if m in modules]

    def __getitem__(self, module: str) -> LoraFactors:
        if module not in self.modules:
            raise KeyError(module)
        return self.adapter.factors(module)

    def __contains__(self, module: object) -> bool:  # without reading factors (Mapping's reads them)
        return module in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def merge(cfg: MergeConfig, progress: bool = False) -> Report:
    """SafeMERGE: scan, then merge the selected modules with the safety adapter; write everything to `out`."""
    out = Path(cfg.out)
    check_output_dir(out, cfg.run.force, input_paths(cfg))
    if cfg.inputs.task_model is not None:
        return merge_full(cfg, progress)
    assert cfg.safety_adapter is not None  # MergeConfig: a LoRA merge takes a safety adapter
    if cfg.merge.merge_into_base and cfg.inputs.aligned is None:
        raise InputError("merge_into_base needs aligned (the base weights the merged update is added to)")
    safety = LoraAdapter.load(cfg.safety_adapter, label="safety adapter")
    report, task, aligned = run_scan(cfg, "merge", progress, safety)
    report.command = "merge"
    report.inputs["safety_adapter"] = _adapter_info(safety, cfg.safety_adapter)
    report.warnings.extend(safety.warnings)  # LoraAdapter.load has warned already
    check_pair(report, (task.fan_in_fan_out, safety.fan_in_fan_out), task.lora_modules, safety.lora_modules)
    modules = set(task.lora_modules)
    fix = (
        "Train a safety adapter on the same modules: "
        f"`safemerge train --recipe safety --like {cfg.inputs.task_adapter} ...`"
    )
    safety_ranks = {m: safety.rank(m) for m in safety.lora_modules}
    result = merge_and_record(
        report,
        LazyFactors(task, modules),
        LazyFactors(safety, modules),
        safety_ranks,
        cfg.merge,
        task.output_dtype(),
        fix,
    )
    with atomic_output_dir(out, cfg.run.force, input_paths(cfg), "merge") as tmp:
        _write_merge(cfg, report, result, task, aligned, tmp, progress)
    return report


def merge_and_record(
    report: Report,
    task: Mapping[str, LoraFactors],
    safety: Mapping[str, LoraFactors],
    safety_ranks: Mapping[str, int],
    opts: MergeOptions,
    dtype: torch.dtype,
    fix: str,
    allow_partial_hint: str = ALLOW_PARTIAL_FLAG,
) -> MergedAdapter:
    """The merge of a scanned report's selected modules, and the report's account of it: no partial
    merge unless allowed (`check_partial`, with `fix` and `allow_partial_hint` in the message),
    `merge_modules` with the options, then per-module ranks, weights, flags and ‖ΔW‖ out, the output
    rank, scaling, alpha and dtype. Shared by `merge()` (factors read lazily from disk) and the
    in-memory `safemerge.peft.add_safemerge_adapter` (factors of a PeftModel)."""
    check_partial(report, safety_ranks.__contains__, opts.allow_partial, fix, allow_partial_hint)
    result = merge_modules(
        task,
        safety,
        {r.name for r in report.modules if r.selected},
        weights=opts.weights,
        mode=opts.mode,
        method=opts.method,
        density=opts.density,
        seed=opts.seed,
        rank=opts.rank,
        dtype=dtype,
        allow_partial=opts.allow_partial,
    )
    record_merge(report, result, safety_ranks, opts.weights)
    report.options["output_dtype"] = dtype_name(dtype)
    note_dare_density(report, opts)
    return result


def _listed(names: list[str]) -> str:
    """Every name, comma-separated: a report lists all the modules a warning is about."""
    return ", ".join(names)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.float32` → "float32", as the report states the output dtype."""
    return str(dtype).removeprefix("torch.")


def note_dare_density(report: Report, opts: MergeOptions) -> None:
    """DARE with density 1 drops nothing: the report says so (merging.merge_dense warns the same words,
    so the report is complete without a second warning on the console)."""
    if opts.method.startswith("dare") and opts.density >= 1.0:
        report.warnings.append(dare_no_pruning(opts.density))


def check_partial(
    report: Report,
    covered: Callable[[str], bool],
    allow_partial: bool,
    fix: str,
    allow_partial_hint: str = ALLOW_PARTIAL_FLAG,
) -> None:
    """No partial merge by default (docs/engine.md, "Partial merges"): when selected modules have no
    counterpart in the safety update, refuse — before anything is written — naming how many and their
    module types, with `fix` (how to get a safety update on the same modules) and how to allow it
    (`allow_partial_hint`: the flag, or the Python keyword)."""
    selected = [r.name for r in report.modules if r.selected]
    missing = [m for m in selected if not covered(m)]
    if not missing or allow_partial:
        return
    have = len(selected) - len(missing)
    types = ", ".join(dict.fromkeys(module_type(m) for m in missing))
    rest = (
        f"merge only the {have} that {'has' if have == 1 else 'have'} one"
        if have
        else "keep them all as fine-tuned (none has one)"
    )
    raise InputError(
        f"{len(missing)} of the {len(selected)} selected modules {'has' if len(missing) == 1 else 'have'} "
        f"no counterpart in the safety adapter (types: {types}); they would stay as fine-tuned. {fix}, or "
        f"pass {allow_partial_hint} to {rest}"
    )


def warn_no_counterpart(report: Report, missing: list[str]) -> None:
    """Warn about selected modules that the safety update lacks (kept as fine-tuned: allow_partial)."""
    if missing:
        warn_in_report(
            report,
            f"{len(missing)} selected module(s) have no safety counterpart and are kept as fine-tuned "
            f"(allow_partial): {_listed(missing)}",
        )


def warn_in_report(report: Report, msg: str) -> None:
    """A warning for the console (a Python warning: the CLI prints it once, a notebook shows it) and for
    the report."""
    warnings.warn(msg, SafemergeWarning, stacklevel=3)
    report.warnings.append(msg)


def check_pair(
    report: Report,
    fan_in_fan_out: tuple[bool, bool],
    task_modules: Collection[str],
    safety_modules: Collection[str],
) -> None:
    """The safety adapter must use the task's layout (`fan_in_fan_out` of the task and the safety
    adapter); modules only it targets are ignored (warned)."""
    task_fifo, safety_fifo = fan_in_fan_out
    if task_fifo != safety_fifo:
        raise InputError(f"fan_in_fan_out differs: task adapter {task_fifo}, safety adapter {safety_fifo}")
    task_set = set(task_modules)
    only_safety = [m for m in safety_modules if m not in task_set]
    if only_safety:
        warn_in_report(
            report,
            f"{len(only_safety)} module(s) targeted only by the safety adapter are ignored: "
            f"{_listed(only_safety)}",
        )


def record_merge(
    report: Report, result: MergedAdapter, safety_ranks: Mapping[str, int], weights: tuple[float, float]
) -> None:
    """What the merge did, per module and in the options: ranks, weights, flags, ‖ΔW‖ out."""
    for rec in report.modules:
        rec.rank_safety = safety_ranks.get(rec.name)
        if rec.name in result.merged:
            rec.merged, rec.w_task, rec.w_safety = True, weights[0], weights[1]
        if rec.name in result.no_safety_counterpart:
            rec.flags.append(NO_COUNTERPART)
        rec.svd_rel_error = result.svd_rel_errors.get(rec.name)
        a, b = result.factors[rec.name]
        rec.delta_norm_out = lora_delta_norm(LoraFactors(a, b, result.scaling))
    warn_no_counterpart(report, result.no_safety_counterpart)
    report.options.update(
        output_rank=result.rank, output_scaling=result.scaling, output_lora_alpha=result.lora_alpha
    )


def _write_merge(
    cfg: MergeConfig,
    report: Report,
    result: MergedAdapter,
    task: LoraAdapter,
    aligned: Checkpoint | None,
    tmp: Path,
    progress: bool,
) -> None:
    """The adapter, its model card, the resolved config, the optional full model and the report."""
    out = Path(cfg.out)
    stored = result.factors
    given = task.config.get("base_model_name_or_path")
    base = cfg.inputs.aligned or (str(given) if given else None)
    write_adapter(tmp, task.config, stored, result.rank, result.lora_alpha, base, task.read_extra())
    (tmp / "README.md").write_text(model_card(report, base))
    (tmp / "safemerge.yaml").write_text(merge_config_yaml(cfg))
    if cfg.merge.merge_into_base:
        assert aligned is not None  # `merge` refuses merge_into_base without the aligned model first
        deltas = {
            m: (a.to(torch.float32), b.to(torch.float32), result.scaling) for m, (a, b) in stored.items()
        }
        full = tmp / "full_model"
        extra = task.extra_for_base(aligned.keys())
        write_merged_model(
            aligned, deltas, task.fan_in_fan_out, full, cfg.merge.max_shard_size, progress, extra
        )
        (full / "README.md").write_text(
            merged_model_card(report, base, "the merged adapter of the parent directory")
        )
        report.outputs["full_model"] = str(out / "full_model")
    report.outputs["adapter"] = str(out)
    report.outputs["report"] = str(out / "safemerge_report.json")
    write_report(report, tmp, plot=cfg.run.plot)


def merge_config_yaml(cfg: MergeConfig) -> str:
    """The resolved config as `safemerge.yaml`: local inputs absolute, hub ids as given (engine/rerun.py),
    so `safemerge merge -c OUT/safemerge.yaml --out NEW_DIR` reruns it from any working directory."""
    data = rerunnable(plain_dump(cfg, exclude=("force",)))
    data["weights"] = list(cfg.merge.weights)
    header = rerun_comment("safemerge merge configuration", "merge", "safemerge.yaml")
    return header + yaml.safe_dump(data, sort_keys=False)


# --- full fine-tunes -------------------------------------------------------------------------------
def check_full_options(opts: MergeOptions) -> None:
    """Merge options that have no meaning for a full fine-tune are refused, naming the option."""
    if opts.mode != "exact":
        raise InputError("`mode` peft-linear mixes LoRA factors: a full fine-tune (`task_model`) has none")
    if opts.rank is not None:
        raise InputError("`rank` sets a LoRA output rank: the output of a full fine-tune is a full model")
    if opts.merge_into_base:
        raise InputError(
            "`merge_into_base` does not apply to `task_model`: the output is already a full model"
        )


def open_safety(cfg: MergeConfig) -> tuple[SafetyUpdates, str, dict[str, Any]]:
    """The safety update of a full merge — a safety LoRA or a full safety model — checked against the
    aligned model before the scan (headers only), with its report key and description."""
    assert cfg.inputs.aligned is not None  # InputsConfig: a full fine-tune needs the aligned model
    aligned, _ = open_checkpoint(cfg.inputs.aligned, "aligned", cfg.run.allow_pickle)
    if cfg.safety_model is not None:
        ckpt, info = open_checkpoint(cfg.safety_model, "safety model", cfg.run.allow_pickle)
        return ModelSafety(ckpt, aligned), "safety_model", info
    assert cfg.safety_adapter is not None  # MergeConfig: exactly one safety input
    adapter = LoraAdapter.load(cfg.safety_adapter, label="safety adapter")
    check_fits(adapter, aligned, "safety adapter")
    safety = LoraSafety(adapter, aligned, conv1d_layout(aligned))
    return safety, "safety_adapter", _adapter_info(adapter, cfg.safety_adapter)


def merge_full(cfg: MergeConfig, progress: bool = False) -> Report:
    """SafeMERGE on a full fine-tune: selected modules become W_al + w_f ΔW_f + w_s ΔW_s (or TIES / DARE of
    the two); every other tensor is the task model's. `out` holds the full model and the report."""
    out = Path(cfg.out)
    check_output_dir(out, cfg.run.force, input_paths(cfg))
    check_full_options(cfg.merge)
    safety, safety_key, safety_info = open_safety(cfg)
    report, task, aligned = run_full_scan(cfg, "merge", progress)
    report.inputs[safety_key] = safety_info
    if isinstance(safety, LoraSafety):  # after the scan's check that the two models differ
        report.warnings.extend(safety.adapter.warnings)  # LoraAdapter.load has warned already
        if cfg.inputs.unaligned is not None:
            local = Path(report.inputs["unaligned"]["local_dir"])
            check_not_swapped(safety.adapter, "safety adapter", (cfg.inputs.unaligned, local))
        if msg := role_warning(safety.adapter, "safety adapter"):
            warn_in_report(report, msg)
    note_dare_density(report, cfg.merge)
    if isinstance(safety, LoraSafety) and (unused := safety.unused(task.modules)):
        ignored = f"module(s) of the safety adapter are not scanned and are ignored: {_listed(unused)}"
        warn_in_report(report, f"{len(unused)} {ignored}")
    opts = cfg.merge
    types = ",".join(dict.fromkeys(r.module_type for r in report.modules))
    fix = (
        "Give a full safety fine-tune (--safety-model) or train a safety adapter on the same module "
        f"types: `safemerge train --recipe safety --target-modules {types} ...`"
    )
    check_partial(report, safety.covers, opts.allow_partial, fix)
    selected = {r.name for r in report.modules if r.selected}
    with atomic_output_dir(out, cfg.run.force, input_paths(cfg), "merge") as tmp:
        inner = tmp / "_model"
        how = (opts.weights, opts.method, opts.density, opts.seed)
        result = write_full_merge(task, aligned, safety, selected, how, inner, opts.max_shard_size, progress)
        for entry in inner.iterdir():
            entry.rename(tmp / entry.name)
        inner.rmdir()
        record_full_merge(report, result, safety, opts.weights)
        report.outputs = {"full_model": str(out), "report": str(out / "safemerge_report.json")}
        (tmp / "README.md").write_text(full_model_card(report))
        (tmp / "safemerge.yaml").write_text(merge_config_yaml(cfg))
        write_report(report, tmp, plot=cfg.run.plot)
    return report


def record_full_merge(
    report: Report, result: FullMerge, safety: SafetyUpdates, weights: tuple[float, float]
) -> None:
    """What a full merge did, per module: weights, ‖W_out − W_al‖ (= ‖ΔW_f‖ where unchanged), flags."""
    for rec in report.modules:
        rec.rank_safety = safety.rank(rec.name)
        rec.delta_norm_out = result.norms_out.get(rec.name, rec.delta_norm_in)
        if rec.name in result.merged:
            rec.merged, rec.w_task, rec.w_safety = True, weights[0], weights[1]
        if rec.name in result.no_safety_counterpart:
            rec.flags.append(NO_COUNTERPART)
    warn_no_counterpart(report, result.no_safety_counterpart)
