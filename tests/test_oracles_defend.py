"""`safemerge defend` (through the CLI) against dense float64 oracles written here (docs/method.md §6).

Bugs this file catches (each was planted by hand and seen to fail here, see docs/testing.md):

- Safe LoRA computing something other than B_f ← C B_f with C = V Vᵀ / ‖V‖_F (e.g. a normalisation by
  ‖V‖_F², or none), or selecting with another rule than round(ρ, 5) ≤ τ;
- `--preserve-norm` skipping the projection (only rescaling), or skipping the rescale;
- `--merge-into-base` on a GPT-2 (Conv1D, fan_in_fan_out) model dropping the transpose of ΔW, for
  Safe LoRA and SafeMERGE, both on the non-square c_attn and on a square attn.c_proj (where a dropped
  transpose would not even raise a shape error).

Everything expected is computed here from the input safetensors with plain torch in float64: V from the
weights, C formed densely, ρ from its definition, ΔW = (lora_alpha / r) · B A. Nothing is imported from
safemerge except the CLI app: the defences' Python modules are being reorganised, the CLI is the
contract.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from builders import save_adapter, save_pair
from safetensors.torch import load_file
from typer.testing import CliRunner

from safemerge.cli import app

F64 = torch.float64
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden" / "inputs"
PREFIX = "base_model.model."
Expected = dict[str, tuple[torch.Tensor, bool]]  # module → (expected ΔW', selected)


# --- oracle helpers --------------------------------------------------------------------------------------
def adapter_updates(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module → (A, B, scaling) of a PEFT adapter directory, read with safetensors (float64)."""
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert not conf.get("use_rslora") and not conf.get("rank_pattern") and not conf.get("alpha_pattern")
    scaling = conf["lora_alpha"] / conf["r"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX) : -len(".lora_A.weight")]
            b = tensors[f"{PREFIX}{module}.lora_B.weight"]
            out[module] = (a.to(F64), b.to(F64), scaling)
    return out


def delta_w(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return scaling * (b @ a)


def safety_v(aligned: Path, unaligned: Path, module: str, conv1d: bool) -> torch.Tensor:
    """V = W_al − W_un in nn.Linear layout (d_out × d_in); GPT-2's Conv1D stores the transpose."""
    w_al = load_file(aligned / "model.safetensors")[f"{module}.weight"].to(F64)
    w_un = load_file(unaligned / "model.safetensors")[f"{module}.weight"].to(F64)
    v = w_al - w_un
    return v.T if conv1d else v


def dense_c(v: torch.Tensor) -> torch.Tensor:
    """C = V Vᵀ / ‖V‖_F, formed densely (method.md §3.1)."""
    return v @ v.T / math.sqrt(float((v * v).sum()))


def rho(c: torch.Tensor, dw: torch.Tensor) -> float:
    cdw = c @ dw
    return float((cdw * dw).sum() / (cdw.norm() * dw.norm()))


def run_cli(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--no-plot", "--quiet"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, (
        f"{args[:3]} exited {result.exit_code}: {result.output}\n{result.exception!r}"
    )


def inputs(root: Path, arch: str) -> dict[str, Path]:
    return {k: root / arch / k for k in ("aligned", "unaligned", "task", "safety")}


def base_args(env: dict[str, Path], safety: bool = False) -> list[str]:
    args = ["-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(env["task"])]
    return [*args, "-s", str(env["safety"])] if safety else args


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the committed golden inputs (tiny Llama and GPT-2 pairs with task and safety LoRAs)."""
    root = tmp_path_factory.mktemp("golden")
    shutil.copytree(GOLDEN, root, dirs_exist_ok=True)
    return root


def expected_safelora(env: dict[str, Path], conv1d: bool, tau: float, preserve_norm: bool) -> Expected:
    """module → (expected ΔW', selected) of Safe LoRA with threshold τ (round(ρ, 5) ≤ τ), dense float64."""
    out: Expected = {}
    for module, (a, b, s) in adapter_updates(env["task"]).items():
        dw = delta_w(a, b, s)
        c = dense_c(safety_v(env["aligned"], env["unaligned"], module, conv1d))
        picked = round(rho(c, dw), 5) <= tau
        new = c @ dw if picked else dw
        if picked and preserve_norm:
            new = new * (dw.norm() / new.norm())
        out[module] = (new, picked)
    return out


def expected_safemerge(
    env: dict[str, Path], conv1d: bool, tau: float, weights: tuple[float, float]
) -> Expected:
    """module → (expected ΔW', selected) of SafeMERGE (round(ρ, 5) < τ, exact merge), dense float64."""
    safety = adapter_updates(env["safety"])
    out: Expected = {}
    for module, (a, b, s) in adapter_updates(env["task"]).items():
        dw = delta_w(a, b, s)
        c = dense_c(safety_v(env["aligned"], env["unaligned"], module, conv1d))
        picked = round(rho(c, dw), 5) < tau
        new = weights[0] * dw + weights[1] * delta_w(*safety[module]) if picked else dw
        out[module] = (new, picked)
    return out


def check_adapter(out: Path, expected: Expected) -> None:
    got = adapter_updates(out)
    assert set(got) == set(expected)
    report = {m["name"]: m for m in json.loads((out / "safemerge_report.json").read_text())["modules"]}
    for module, (want, picked) in expected.items():
        torch.testing.assert_close(delta_w(*got[module]), want, rtol=1e-5, atol=1e-6)
        assert report[module]["selected"] == picked, module


def check_full_model(out: Path, env: dict[str, Path], expected: Expected) -> None:
    """OUT/full_model: W_al + ΔW'ᵀ on the LoRA modules (Conv1D layout), W_al bit for bit elsewhere."""
    aligned = load_file(env["aligned"] / "model.safetensors")
    full = load_file(out / "full_model" / "model.safetensors")
    assert set(full) == set(aligned)
    targets = {f"{m}.weight": want for m, (want, _) in expected.items()}
    for key, w_al in aligned.items():
        if key in targets:
            torch.testing.assert_close(full[key].to(F64), w_al.to(F64) + targets[key].T, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(full[key], w_al), key


# --- Safe LoRA -------------------------------------------------------------------------------------------
def test_safelora_equals_dense_c_times_b_on_selected_modules(golden: Path, tmp_path: Path) -> None:
    env = inputs(golden, "llama")
    expected = expected_safelora(env, conv1d=False, tau=0.5, preserve_norm=False)
    assert {p for _, p in expected.values()} == {True, False}  # the default τ = 0.5 splits the modules
    out = tmp_path / "safelora"
    run_cli(["defend", "-m", "safelora", *base_args(env), "--out", str(out)])
    check_adapter(out, expected)
    # A is the task's: Safe LoRA changes B only
    task, got = adapter_updates(env["task"]), adapter_updates(out)
    for module in task:
        assert torch.equal(got[module][0], task[module][0])


def test_safelora_preserve_norm_is_the_projection_rescaled(golden: Path, tmp_path: Path) -> None:
    env = inputs(golden, "llama")
    expected = expected_safelora(env, conv1d=False, tau=0.5, preserve_norm=True)
    task = adapter_updates(env["task"])
    for module, (want, picked) in expected.items():
        if picked:
            dw = delta_w(*task[module])
            c = dense_c(safety_v(env["aligned"], env["unaligned"], module, False))
            # the case discriminates: C changes the norm a lot, and the direction too (ρ < 1)
            assert not 0.5 < float((c @ dw).norm() / dw.norm()) < 2.0
            assert (want - dw).norm() > 0.1 * dw.norm()
    out = tmp_path / "safelora-pn"
    run_cli(["defend", "-m", "safelora", *base_args(env), "--preserve-norm", "--out", str(out)])
    check_adapter(out, expected)
    # and B itself: B' = C B_f · ‖ΔW_f‖ / ‖C ΔW_f‖ (the output keeps the task's rank and scaling)
    got = adapter_updates(out)
    for module, (_, picked) in expected.items():
        a, b, s = task[module]
        if picked:
            c = dense_c(safety_v(env["aligned"], env["unaligned"], module, False))
            ratio = delta_w(a, b, s).norm() / delta_w(a, c @ b, s).norm()
            torch.testing.assert_close(got[module][1], c @ b * ratio, rtol=1e-5, atol=1e-6)


# --- --merge-into-base on GPT-2 (Conv1D) -------------------------------------------------------------------
def test_safelora_merge_into_base_gpt2_transposes_the_update(golden: Path, tmp_path: Path) -> None:
    env = inputs(golden, "gpt2")
    expected = expected_safelora(env, conv1d=True, tau=0.5, preserve_norm=False)
    assert any(p for _, p in expected.values())
    out = tmp_path / "safelora-gpt2"
    run_cli(["defend", "-m", "safelora", *base_args(env), "--merge-into-base", "--out", str(out)])
    check_adapter(out, expected)
    check_full_model(out, env, expected)


def test_safemerge_merge_into_base_gpt2_transposes_the_update(golden: Path, tmp_path: Path) -> None:
    env = inputs(golden, "gpt2")
    expected = expected_safemerge(env, conv1d=True, tau=0.35, weights=(0.8, 0.2))
    assert {p for _, p in expected.values()} == {True, False}  # the default τ = 0.35 splits the modules
    out = tmp_path / "safemerge-gpt2"
    run_cli(
        ["defend", "-m", "safemerge", *base_args(env, safety=True), "--merge-into-base", "--out", str(out)]
    )
    check_adapter(out, expected)
    check_full_model(out, env, expected)


@pytest.fixture(scope="module")
def square_gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny GPT-2 with LoRAs on the square attn.c_proj (32 × 32): a dropped transpose keeps the shape."""
    root = tmp_path_factory.mktemp("gpt2sq")
    al, un = save_pair(root, "gpt2")
    env = {"aligned": al, "unaligned": un}
    for name, seed in (("task", 1), ("safety", 2)):
        env[name] = save_adapter(al, root / name, seed=seed, targets=["attn.c_proj"], arch="gpt2")
        assert json.loads((env[name] / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    return env


@pytest.mark.parametrize("method", ["safelora", "safemerge"])
def test_merge_into_base_square_conv1d(square_gpt2: dict[str, Path], tmp_path: Path, method: str) -> None:
    env = square_gpt2
    if method == "safelora":
        expected = expected_safelora(env, conv1d=True, tau=1.0, preserve_norm=False)
        args = ["defend", "-m", "safelora", *base_args(env), "--threshold", "1"]
    else:
        expected = expected_safemerge(env, conv1d=True, tau=1.0, weights=(0.8, 0.2))
        args = ["defend", "-m", "safemerge", *base_args(env, safety=True), "--threshold", "1"]
    assert all(p for _, p in expected.values())
    for want, _ in expected.values():  # premise: ΔW' is not symmetric, so a transpose is visible
        assert (want - want.T).norm() > 0.1 * want.norm()
    out = tmp_path / method
    run_cli([*args, "--merge-into-base", "--out", str(out)])
    check_full_model(out, env, expected)


def test_threshold_equal_to_rounded_rho_selects_for_safelora_not_for_safemerge(
    golden: Path, tmp_path: Path
) -> None:
    # Safe LoRA selects round(ρ, 5) ≤ τ (as published), SafeMERGE round(ρ, 5) < τ (method.md §3.2, §6).
    # τ = round(ρ, 5) of layers.1.v_proj (ρ = 0.3755443 by the dense oracle, far from a rounding edge).
    env = inputs(golden, "llama")
    tau, module = 0.37554, "model.layers.1.self_attn.v_proj"
    lora = expected_safelora(env, conv1d=False, tau=tau, preserve_norm=False)
    merged = expected_safemerge(env, conv1d=False, tau=tau, weights=(0.8, 0.2))
    assert lora[module][1] and not merged[module][1]  # the premise, from the oracle alone
    run_cli(
        ["defend", "-m", "safelora", *base_args(env), "--threshold", str(tau), "--out", str(tmp_path / "l")]
    )
    check_adapter(tmp_path / "l", lora)
    args = ["defend", "-m", "safemerge", *base_args(env, safety=True), "--threshold", str(tau)]
    run_cli([*args, "--out", str(tmp_path / "m")])
    check_adapter(tmp_path / "m", merged)
