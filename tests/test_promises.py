"""Promises of the docs that no other test held the code to (docs/method.md §3.2, §4.3, §5; cli/common.py).

Bugs this file catches (each was planted by hand and seen to fail here, see docs/testing.md):

- `merge --method ties --rank R` not writing rank R (the option ignored), or a `--rank` below the task
  rank not being refused with exit code 2 and a message naming `--rank`;
- an internal error (an unexpected exception) not exiting with code 1 and an "internal error" message;
- pickle checkpoints loaded without `weights_only=True`: a pickle that would run code when loaded must
  be refused without `--allow-pickle`, and refused (without running) with it;
- `--top-k` ties not broken by module order in natural order (`layers.2` before `layers.10`).

Oracles: the adapter's own files (config and tensor shapes), a dense float64 TIES plus a float64 SVD
truncation written here, a pickle whose loading would leave a visible trace, and hand-built inputs whose
ρ tie exactly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_oracles_merge import ties_oracle
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.engine import ScanConfig, scan

F64 = torch.float64
GOLDEN_LLAMA = Path(__file__).resolve().parent / "fixtures" / "golden" / "inputs" / "llama"
PREFIX = "base_model.model."


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    return result.exit_code, " ".join(text.split())


@pytest.fixture
def llama(tmp_path: Path) -> dict[str, Path]:
    """A copy of the golden tiny Llama inputs (task and safety LoRAs r = 4, alpha 8)."""
    env = {}
    for part in ("aligned", "unaligned", "task", "safety"):
        env[part] = shutil.copytree(GOLDEN_LLAMA / part, tmp_path / part)
    return env


def merge_args(env: dict[str, Path], out: Path, **over: Path) -> list[str]:
    p = {**env, **over}
    return [
        "merge", "-a", str(p["aligned"]), "-u", str(p["unaligned"]), "-t", str(p["task"]),
        "-s", str(p["safety"]), "--out", str(out), "--no-plot", "--quiet",
    ]  # fmt: skip


def updates(adapter: Path) -> tuple[dict[str, Any], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    conf = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    mods = [k[len(PREFIX) : -len(".lora_A.weight")] for k in t if k.endswith(".lora_A.weight")]
    return conf, {m: (t[f"{PREFIX}{m}.lora_A.weight"], t[f"{PREFIX}{m}.lora_B.weight"]) for m in mods}


# --- --rank ---------------------------------------------------------------------------------------------
def test_ties_rank_option_sets_the_output_rank(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ties6"
    code, text = invoke([*merge_args(llama, out), "--method", "ties", "--rank", "6", "--threshold", "0.8"])
    assert code == 0, text
    conf, got = updates(out)
    assert conf["r"] == 6 and conf["lora_alpha"] == 12  # the task scaling 8 / 4 = 2 is kept: alpha = 2 · 6
    for a, b in got.values():
        assert a.shape[0] == 6 and b.shape[1] == 6
    report = json.loads((out / "safemerge_report.json").read_text())
    assert report["options"]["output_rank"] == 6
    selected = {m["name"] for m in report["modules"] if m["selected"]}
    assert 0 < len(selected) < len(got)  # τ = 0.8 merges some modules, not all
    # values: selected modules hold the best rank-6 approximation of TIES(ΔW_f, ΔW_s); the others ΔW_f
    _, task = updates(llama["task"])
    _, safety = updates(llama["safety"])
    for module, (a, b) in got.items():
        dwf = 2.0 * task[module][1].to(F64) @ task[module][0].to(F64)
        want = dwf
        if module in selected:
            dws = 2.0 * safety[module][1].to(F64) @ safety[module][0].to(F64)
            u, s, vh = torch.linalg.svd(ties_oracle([dwf, dws], [0.8, 0.2], 0.5))
            want = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
        torch.testing.assert_close(2.0 * b.to(F64) @ a.to(F64), want, rtol=1e-4, atol=1e-5)


def test_rank_below_the_task_rank_is_refused_naming_the_option(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ties3"
    code, text = invoke([*merge_args(llama, out), "--method", "ties", "--rank", "3"])
    assert code == 2, text
    assert "--rank 3" in text and "rank 4" in text
    assert not out.exists()


# --- exit code 1 on an internal error --------------------------------------------------------------------
def test_internal_error_exits_1_with_a_message(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safemerge.engine.pipeline as pipeline

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planted failure in the engine")

    monkeypatch.setattr(pipeline, "merge_modules", broken)
    out = tmp_path / "out"
    code, text = invoke(merge_args(llama, out))
    assert code == 1, text
    assert "internal error: RuntimeError: planted failure in the engine" in text
    assert not out.exists()


# --- pickle checkpoints -------------------------------------------------------------------------------------
class LeavesATrace:
    """Unpickling this object creates the directory `path`: a harmless stand-in for code execution."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.path),))


def pickle_checkpoint(src: Path, dst: Path, extra: dict[str, object] | None = None) -> Path:
    """`src` (safetensors) re-saved as a pickle-only checkpoint (pytorch_model.bin), plus `extra` entries."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state: dict[str, object] = dict(load_file(src / "model.safetensors"))
    state.update(extra or {})
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def test_pickle_is_loaded_with_weights_only(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    un = pickle_checkpoint(llama["unaligned"], tmp_path / "un_pickle")
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    code, text = invoke([*merge_args(llama, tmp_path / "p", unaligned=un), "--allow-pickle"])
    assert code == 0, text
    assert calls and all(c.get("weights_only") is True for c in calls), calls
    # and the pickle gives the same merge as the safetensors original
    code, text = invoke(merge_args(llama, tmp_path / "s"))
    assert code == 0, text
    assert (tmp_path / "p" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "s" / "adapter_model.safetensors"
    ).read_bytes()


def test_a_pickle_that_runs_code_is_never_executed(llama: dict[str, Path], tmp_path: Path) -> None:
    trace = tmp_path / "code-was-executed"
    un = pickle_checkpoint(llama["unaligned"], tmp_path / "evil", {"payload": LeavesATrace(trace)})
    # without --allow-pickle: refused before reading
    code, text = invoke(merge_args(llama, tmp_path / "out1", unaligned=un))
    assert not trace.exists(), "loading the checkpoint ran the pickle's code"
    assert code == 2 and "--allow-pickle" in text, text
    # with --allow-pickle: torch.load(weights_only=True) refuses the payload; nothing runs
    code, text = invoke([*merge_args(llama, tmp_path / "out2", unaligned=un), "--allow-pickle"])
    assert not trace.exists(), "loading the checkpoint ran the pickle's code"
    assert code == 2 and "weights_only=True" in text, text
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


# --- --top-k ties ----------------------------------------------------------------------------------------
def tied_inputs(root: Path, layers: int = 12, low: int = 5) -> dict[str, Path]:
    """A 12-layer checkpoint pair and task adapter whose q_proj modules are identical in every layer, so
    their ρ tie exactly (≈ 0.18), except layer `low`, whose update has a lower ρ."""
    g = torch.Generator().manual_seed(0)
    w_un = torch.randn(8, 8, generator=g)
    v = torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g) + 0.1 * torch.randn(8, 8, generator=g)
    a, b = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)
    u = torch.linalg.svd(v)[0]
    b_low = u[:, -2:] + 0.03 * u[:, :1]  # mostly V's weakest directions, a little of its strongest: ρ ≈ 0.03
    env = {k: root / k for k in ("aligned", "unaligned", "task")}
    for d in env.values():
        d.mkdir()
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(layers)]
    save_file({f"{n}.weight": w_un + v for n in names}, env["aligned"] / "model.safetensors")
    save_file({f"{n}.weight": w_un.clone() for n in names}, env["unaligned"] / "model.safetensors")
    lora: dict[str, torch.Tensor] = {}
    for i, n in enumerate(names):
        lora[f"{PREFIX}{n}.lora_A.weight"] = a.clone()
        lora[f"{PREFIX}{n}.lora_B.weight"] = (b_low if i == low else b).contiguous().clone()
    save_file(lora, env["task"] / "adapter_model.safetensors", metadata={"format": "pt"})
    conf = json.loads((GOLDEN_LLAMA / "task" / "adapter_config.json").read_text())
    conf.update(r=2, lora_alpha=4, target_modules=["q_proj"])
    (env["task"] / "adapter_config.json").write_text(json.dumps(conf))
    return env


def test_top_k_breaks_exact_ties_by_natural_module_order(tmp_path: Path) -> None:
    env = tied_inputs(tmp_path)
    report = scan(ScanConfig.from_flat(
        aligned=str(env["aligned"]), unaligned=str(env["unaligned"]), task_adapter=str(env["task"]), top_k=4,
    ))  # fmt: skip
    rhos = {m.name: m.rho for m in report.modules}
    tied = {r for n, r in rhos.items() if "layers.5." not in n}
    assert len(tied) == 1 and rhos["model.layers.5.self_attn.q_proj"] < tied.pop()  # the premise
    chosen = [m.name.split(".")[2] for m in report.modules if m.selected]
    # the lowest ρ first, then the tied ones in module order: layers 0, 1, 2 (natural order puts 10 and
    # 11 last; a string order would pick layers.10 before layers.2)
    assert sorted(chosen, key=int) == ["0", "1", "2", "5"]
