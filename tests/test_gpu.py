"""GPU code paths of the engine. They run only where torch sees CUDA (the project's device checks);
on CPU-only machines, CI included, they are reported as skipped, never as passed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import save_adapter, save_pair

from safemerge.engine.config import MergeConfig
from safemerge.engine.criterion import dense_similarity, lowrank_similarity
from safemerge.engine.pipeline import merge

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_lowrank_similarity_on_cuda_matches_cpu_and_dense() -> None:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1024, 768, generator=g)
    a = torch.randn(8, 768, generator=g)
    b = torch.randn(1024, 8, generator=g)
    cpu = lowrank_similarity(v, a, b).rho
    gpu = lowrank_similarity(v.cuda(), a.cuda(), b.cuda()).rho
    assert gpu == pytest.approx(cpu, abs=1e-5)
    assert gpu == pytest.approx(dense_similarity(v, b.double() @ a.double()), abs=1e-5)


def test_merge_on_cuda_gives_the_cpu_decisions_and_adapter(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "llama", torch.bfloat16)
    task = save_adapter(al, tmp_path / "task", seed=1)
    safety = save_adapter(al, tmp_path / "safety", seed=2)
    reports = {}
    for device in ("cpu", "cuda"):
        cfg = MergeConfig(
            aligned=str(al), unaligned=str(un), task_adapter=str(task), safety_adapter=str(safety),
            out=str(tmp_path / device), top_k=3, device=device, plot=False,
        )  # fmt: skip
        merge(cfg)
        reports[device] = json.loads((tmp_path / device / "safemerge_report.json").read_text())
    for m_cpu, m_gpu in zip(reports["cpu"]["modules"], reports["cuda"]["modules"], strict=True):
        assert m_cpu["name"] == m_gpu["name"] and m_cpu["selected"] == m_gpu["selected"]
        assert m_gpu["rho"] == pytest.approx(m_cpu["rho"], abs=1e-5)
    # the merge itself only touches adapter factors on the CPU: identical files
    cpu_bytes = (tmp_path / "cpu" / "adapter_model.safetensors").read_bytes()
    assert cpu_bytes == (tmp_path / "cuda" / "adapter_model.safetensors").read_bytes()
