"""Smoke test of the merge-engine benchmark: the generator's tiny preset and bench_merge run end to end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _synthetic() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic", BENCH / "synthetic.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synthetic"] = mod
    spec.loader.exec_module(mod)
    return mod


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != "synthetic.json"):
        h.update(f.relative_to(d).as_posix().encode())
        h.update(f.read_bytes().replace(str(d).encode(), b""))
    return h.hexdigest()


def test_generator_tiny_is_deterministic_and_loadable(tmp_path: Path) -> None:
    syn = _synthetic()
    m1 = syn.generate("tiny", tmp_path / "a", seed=3, quiet=True)
    syn.generate("tiny", tmp_path / "b", seed=3, quiet=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert m1["modules"] == 2 * m1["num_hidden_layers"]

    from safemerge.engine.checkpoint import Checkpoint
    from safemerge.engine.lora import LoraAdapter

    al = Checkpoint(tmp_path / "a" / "aligned")
    un = Checkpoint(tmp_path / "a" / "unaligned")
    task = LoraAdapter.load(tmp_path / "a" / "task_adapter")
    assert len(task.lora_modules) == m1["modules"]
    name = "model.layers.1.self_attn.v_proj.weight"
    assert al.dtype_name(name) == "BF16"
    assert al.shape(name) == tuple(m1["v_shape"])
    v = al.get_float(name) - un.get_float(name)
    assert float(v.norm()) > 0
    assert float(task.factors("model.layers.1.self_attn.v_proj").B.norm()) > 0


def _bench_merge() -> ModuleType:
    _synthetic()  # bench_merge imports it as a top-level module
    spec = importlib.util.spec_from_file_location("bench_merge", BENCH / "bench_merge.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_merge_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench_merge()
    out = tmp_path / "figures.json"
    argv = [
        "--preset",
        "tiny",
        "--data-root",
        str(tmp_path),
        "--repeats",
        "1",
        "--linearity-layers",
        "0",
        "--dense-d",
        "256",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    t = res["timing"]
    assert t["floor_min_s"] > 0 and t["merge_min_s"] > 0 and t["scan_min_s"] > 0
    assert t["summary"]["modules"] == res["data"]["modules"]
    rss = next(iter(res["rss"].values()))  # measured in a fresh child process
    assert 0 < rss["peak_rss"] < 4 * 2**30
    assert res["dense_vs_lowrank"]["abs_diff_vs_f64"] < 1e-6
    assert "(scan+merge)/floor" in capsys.readouterr().out
