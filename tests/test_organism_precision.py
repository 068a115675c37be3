"""The organism's precision: chosen for the machine, overridable, part of every key and results file;
and its bfloat16 training, where every step must see the weights the previous step wrote.

bfloat16 training's oracle: the same loop in float32 (independent of autocast). Autocast keeps bfloat16
copies of the weights until its context exits, so a context held across steps trains on stale copies;
the loss then barely moves while float32's falls. Planted (one `torch.autocast` around the whole loop):
the loss fell 0.28 nats instead of float32's 1.65 and differed from it by up to 1.37; both checks fail.

The choice's oracles are hand values: injected probe timings, a counting fake probe, the cache file's
text as written.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from tinymodel import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden=64, layers=2)


def losses(model_dir: Path, precision: str) -> list[float]:
    from safemerge.organism.build import load_causal_lm, task_examples, train_loop
    from safemerge.organism.recipe import LoraRecipe

    model, tok = load_causal_lm(model_dir)
    for p in model.parameters():
        p.requires_grad_(True)
    recipe = LoraRecipe(
        samples=32, steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=1, precision=precision
    )
    return train_loop(model, tok, task_examples(recipe), recipe, precision, False)


def test_bfloat16_steps_follow_float32(tiny: Path) -> None:
    torch.set_num_threads(1)
    f32, bf16 = losses(tiny, "float32"), losses(tiny, "bfloat16")
    assert f32[-1] < f32[0] - 0.5  # the oracle learns: the loss falls by more than half a nat
    assert bf16[-1] < bf16[0] - 0.5  # so must bfloat16 (it does not with a stale weight cache)
    # Same batches and initialisation: bfloat16 rounding moved the losses by at most 0.002 nats over
    # these 12 steps (measured); a stale cache was off by 1.37.
    assert max(abs(a - b) for a, b in zip(f32, bf16, strict=True)) < 0.05


# --- the choice ------------------------------------------------------------------------------------


def test_rule_on_injected_timings() -> None:
    from safemerge.common.precision import MIN_SPEEDUP, faster_precision

    assert MIN_SPEEDUP == 1.3
    assert faster_precision(4.0, 1.0) == "bfloat16"  # AVX512-BF16 / AMX: ~4-6x
    assert faster_precision(1.0, 9.0) == "float32"  # AVX2 only: emulated, ~9x slower
    assert faster_precision(1.3, 1.0) == "bfloat16"  # exactly the margin
    assert faster_precision(1.29, 1.0) == "float32"  # a near-tie stays exact
    assert faster_precision(1.0, 1.0) == "float32"
    assert faster_precision(1.0, 0.0) == "float32"  # a broken timing never picks bfloat16


class CountingProbe:
    """A fake probe: fixed timings, counts its calls."""

    def __init__(self, float32_s: float, bfloat16_s: float) -> None:
        self.calls, self.f32, self.bf16 = 0, float32_s, bfloat16_s

    def __call__(self) -> Any:
        from safemerge.common.precision import ProbeTimings

        self.calls += 1
        return ProbeTimings(self.f32, self.bf16, threads=torch.get_num_threads())


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The precision module with no in-process memo and no $SAFEMERGE_DTYPE."""
    from safemerge.common import precision

    monkeypatch.setattr(precision, "_memo", {})
    monkeypatch.delenv("SAFEMERGE_DTYPE", raising=False)
    return precision


def test_override_order_and_bad_values(fresh: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safemerge.common.errors import InputError

    probe = CountingProbe(1.0, 0.1)
    assert fresh.resolve_precision("auto", "cpu", tmp_path, probe).dtype == "bfloat16"
    monkeypatch.setenv("SAFEMERGE_DTYPE", "float32")
    env = fresh.resolve_precision("auto", "cpu", tmp_path, probe)
    assert (env.dtype, env.source) == ("float32", "$SAFEMERGE_DTYPE")
    asked = fresh.resolve_precision("bfloat16", "cpu", tmp_path, probe)  # an explicit request wins
    assert (asked.dtype, asked.source) == ("bfloat16", "requested")
    monkeypatch.setenv("SAFEMERGE_DTYPE", "auto")
    assert fresh.resolve_precision("auto", "cpu", tmp_path, probe).source.startswith("probe")
    assert probe.calls == 1  # once; then the memo
    for bad in ("fp16", "float16", "BF16"):
        monkeypatch.setenv("SAFEMERGE_DTYPE", bad)
        with pytest.raises(InputError, match=r"\$SAFEMERGE_DTYPE=.*expected one of float32, bfloat16, auto"):
            fresh.resolve_precision("auto", "cpu", tmp_path, probe)
    monkeypatch.delenv("SAFEMERGE_DTYPE")
    with pytest.raises(InputError, match="expected one of float32, bfloat16, auto"):
        fresh.resolve_precision("half", "cpu", tmp_path, probe)
    # a GPU keeps bfloat16 where torch says it supports it, without a probe
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = fresh.resolve_precision("auto", "cuda", tmp_path, probe)
    assert (gpu.dtype, gpu.source, probe.calls) == ("bfloat16", "gpu", 1)


def test_bad_precision_exits_2_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from safemerge.cli import app
    from safemerge.organism import build

    def no_build(*args: Any) -> Path:
        raise AssertionError("the organism would be built")

    monkeypatch.setattr(build, "smollm2_dir", no_build)  # a test that fails fails fast
    run = CliRunner().invoke
    for args in (["demo", "--out", str(tmp_path / "d")], ["organism", "build", "--cache", str(tmp_path)]):
        res = run(app, [*args, "--precision", "fp16"])
        assert res.exit_code == 2, res.output
        assert "--precision='fp16': expected one of float32, bfloat16, auto" in res.output
    monkeypatch.setenv("SAFEMERGE_DTYPE", "half")
    res = run(app, ["organism", "build", "--reduced", "--cache", str(tmp_path), "--precision", "float32"])
    assert res.exit_code == 2, res.output
    assert "$SAFEMERGE_DTYPE='half': expected one of float32, bfloat16, auto" in res.output
    assert not (tmp_path / "organism").exists()  # nothing built
    assert not (tmp_path / "d").exists()


def test_probe_cache_is_reused_and_keyed_by_the_machine(fresh: Any, tmp_path: Path) -> None:
    probe = CountingProbe(1.0, 9.0)  # an AVX2-only CPU
    first = fresh.resolve_precision("auto", "cpu", tmp_path, probe)
    assert (first.dtype, first.source, probe.calls) == ("float32", "probe", 1)
    key = fresh.machine_key(torch.get_num_threads())
    name, flags = fresh.cpu_identity()
    assert (
        name in key
        and f"torch {torch.__version__}" in key
        and key.endswith(f"threads {torch.get_num_threads()}")
    )
    assert all(f in key for f in flags)
    data = json.loads((tmp_path / "precision.json").read_text())
    entry = data["machines"][key]
    assert (entry["float32_s"], entry["bfloat16_s"], entry["precision"]) == (1.0, 9.0, "float32")

    fresh._memo.clear()  # a new process: the file answers, the probe does not run
    again = fresh.resolve_precision("auto", "cpu", tmp_path, CountingProbe(1.0, 0.1))
    assert (again.dtype, again.source) == ("float32", "probe (cached)")
    assert again.probe is not None and again.probe.bfloat16_s == 9.0

    fresh._memo.clear()  # another thread count is another key: measured again, both entries kept
    old = torch.get_num_threads()
    torch.set_num_threads(old + 1)
    try:
        other = CountingProbe(2.0, 0.5)
        assert fresh.resolve_precision("auto", "cpu", tmp_path, other).dtype == "bfloat16"
        assert other.calls == 1
    finally:
        torch.set_num_threads(old)
    assert len(json.loads((tmp_path / "precision.json").read_text())["machines"]) == 2

    fresh._memo.clear()  # an unreadable cache is measured again and rewritten, never an error
    (tmp_path / "precision.json").write_text("{not json", encoding="utf-8")
    redo = CountingProbe(1.0, 9.0)
    assert fresh.resolve_precision("auto", "cpu", tmp_path, redo).source == "probe" and redo.calls == 1
    assert key in json.loads((tmp_path / "precision.json").read_text())["machines"]


def test_real_probe_times_both_products() -> None:
    from safemerge.common.precision import probe_products

    t = probe_products(tokens=32, reps=2)
    assert t.float32_s > 0 and t.bfloat16_s > 0 and t.threads == torch.get_num_threads()
    assert t.gflops("float32") == pytest.approx(2 * 32 * 576 * 1536 / t.float32_s / 1e9)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's ISA cap is x86's")
def test_real_probe_picks_float32_where_bfloat16_is_emulated() -> None:
    """The whole choice on real products: with oneDNN held to AVX2 (bfloat16 emulated, as on an AVX2-only
    CPU; measured 0.03-0.06x float32's speed) the probe picks float32; on a CPU with native bfloat16
    products (avx512_bf16 or amx_bf16; measured 5.5x or more here, even under load) it picks bfloat16."""
    import subprocess
    import sys

    from safemerge.common.precision import cpu_identity, faster_precision, probe_products

    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from safemerge.common.precision import faster_precision, probe_products\n"
        "t = probe_products(); print(faster_precision(t.float32_s, t.bfloat16_s))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "float32", out.stdout + out.stderr
    if {"avx512_bf16", "amx_bf16"} & set(cpu_identity()[1]):
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t = probe_products()
        finally:
            torch.set_num_threads(old)
        assert faster_precision(t.float32_s, t.bfloat16_s) == "bfloat16", t


# --- the organism: keys, settings, results ----------------------------------------------------------


def test_precision_is_part_of_every_stage_key() -> None:
    from safemerge.organism.recipe import OrganismRecipe, reduced_recipe

    for r in (OrganismRecipe(), reduced_recipe()):
        assert r.requested_precision() == "auto"
        with pytest.raises(ValueError, match="auto"):
            r.stage_key("aligned")  # an unresolved recipe keys nothing
        f32, bf16 = r.resolved("float32"), r.resolved("bfloat16")
        assert {s.precision for s in f32.steps()} == {"float32"}
        ku = f32.stage_key("unaligned")
        assert ku == bf16.stage_key("unaligned")  # U is the packaged model, not trained
        ka32, ka16 = f32.stage_key("aligned", ku), bf16.stage_key("aligned", ku)
        assert ka32 != ka16
        for stage in ("task", "safety", "safeinstr", "taskfull"):
            assert f32.stage_key(stage, ka32) != bf16.stage_key(stage, ka32)  # its own precision too
    explicit = OrganismRecipe().with_precision("float32")
    assert explicit.requested_precision() == "float32"
    assert explicit.resolved("bfloat16") == explicit  # an explicit precision is kept


def test_demo_settings_resolve_once_and_record_it(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from safemerge.organism.demo import DemoSettings, precision_sentence, resolve_settings, settings_dict

    monkeypatch.setenv("SAFEMERGE_DTYPE", "float32")
    s = resolve_settings(DemoSettings(out=Path("demo")))
    assert s.dtype == "float32" and {r.precision for r in s.recipe.steps()} == {"float32"}
    assert s.precision is not None and s.precision.source == "$SAFEMERGE_DTYPE"
    monkeypatch.setenv("SAFEMERGE_DTYPE", "bfloat16")
    assert resolve_settings(s) is s  # resolved once: a later change does not move it
    d = settings_dict(s)
    assert d["precision"] == {"dtype": "float32", "chosen_by": "$SAFEMERGE_DTYPE"} and d["dtype"] == "float32"
    assert d["recipe"]["aligned"]["precision"] == "float32"
    assert precision_sentence(s) == "Precision: training float32 ($SAFEMERGE_DTYPE); generation float32."
    monkeypatch.setenv("SAFEMERGE_DTYPE", "float32")
    asked = resolve_settings(DemoSettings(out=Path("demo"), dtype="bfloat16"))  # explicit generation kept
    assert asked.dtype == "bfloat16" and asked.recipe.requested_precision() == "float32"


def test_train_log_and_step_record_the_precision(tmp_path: Path) -> None:
    from safemerge.organism.build import step_precision, write_train_files
    from safemerge.organism.recipe import LoraRecipe

    write_train_files(
        tmp_path, [("q", "a", True)], [1.0], LoraRecipe(samples=1, steps=1, precision="float32")
    )
    assert json.loads((tmp_path / "train_log.json").read_text())["precision"] == "float32"
    with pytest.raises(ValueError, match="resolve"):
        step_precision("auto", torch.device("cpu"))
