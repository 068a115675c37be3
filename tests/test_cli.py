"""The `safemerge scan` / `merge` command line: YAML + flags, exit codes, bad inputs (docs/engine.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import merge_args, pair_with_adapters, save_adapter, save_pair
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from safemerge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    return pair_with_adapters(root)


def invoke(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args, env={"COLUMNS": "400", "TERM": "dumb"})
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, fname: str, fn) -> None:
    path = directory / fname
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_scan_and_merge_succeed_and_print_a_summary(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = invoke(
        ["scan", "-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(env["task"])]
    )
    assert code == 0, out
    assert "modules selected" in out and "model.layers.…" in out and "0.self_attn.q_proj" in out
    code, out = invoke([*merge_args(env, tmp_path / "m"), "--top-k", "2", "--weights", "0.7,0.3"])
    assert code == 0, out
    report = json.loads((tmp_path / "m" / "safemerge_report.json").read_text())
    assert report["summary"]["merged"] == 2
    assert report["options"]["weights"] == [0.7, 0.3]


def test_yaml_config_with_flag_overrides(env: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(
        f"aligned: {env['aligned']}\nunaligned: {env['unaligned']}\ntask_adapter: {env['task']}\n"
        f"safety_adapter: {env['safety']}\nout: {tmp_path / 'from_yaml'}\nthreshold: 0.0\n"
        "weights: [0.6, 0.4]\nplot: false\n"
    )
    code, out = invoke(["merge", str(config), "--top-k", "1", "--quiet"])
    assert code == 0, out
    report = json.loads((tmp_path / "from_yaml" / "safemerge_report.json").read_text())
    assert report["options"]["top_k"] == 1 and report["options"]["threshold"] is None  # flag replaced policy
    assert report["options"]["weights"] == [0.6, 0.4]  # from the YAML
    assert report["summary"]["merged"] == 1
    # the resolved config reruns the same merge
    code, out = invoke(
        ["merge", str(tmp_path / "from_yaml" / "safemerge.yaml"), "--out", str(tmp_path / "again")]
    )
    assert code == 0, out
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "from_yaml" / "adapter_model.safetensors"
    ).read_bytes()


def test_help_lists_every_option_with_default() -> None:
    code, out = invoke(["merge", "--help"])
    assert code == 0
    for option in ("--threshold", "--top-k", "--fraction", "--weights", "--mode", "--merge-method",
                   "--density", "--seed", "--rank", "--merge-into-base", "--device", "--force"):  # fmt: skip
        assert option in out
    assert "Default 0.8,0.2" in out and "Default 0.35" in out


def assert_bad(env: dict[str, Path], args: list[str], out_dir: Path, *needles: str) -> None:
    code, text = invoke(args)
    assert code == 2, text
    flat = " ".join(text.split())
    for needle in needles:
        assert needle in flat, (needle, text)
    assert not out_dir.exists()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]


def test_missing_tensor(env: dict[str, Path], tmp_path: Path) -> None:
    un = copy_dir(env["unaligned"], tmp_path / "un")
    edit_tensors(un, "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    out = tmp_path / "out"
    assert_bad(env, merge_args(env, out, unaligned=un), out, "model.layers.1.self_attn.v_proj", "unaligned")


def test_shape_mismatch(env: dict[str, Path], tmp_path: Path) -> None:
    un = copy_dir(env["unaligned"], tmp_path / "un")
    key = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(un, "model.safetensors", lambda t: t.__setitem__(key, torch.zeros(32, 16)))
    out = tmp_path / "out"
    assert_bad(env, merge_args(env, out, unaligned=un), out, key, "(32, 16)", "(32, 32)")


def test_adapter_for_another_architecture(env: dict[str, Path], tmp_path: Path) -> None:
    g_al, _ = save_pair(tmp_path, "gpt2", torch.float32)
    gpt_adapter = save_adapter(g_al, tmp_path / "gpt2_task", seed=1, arch="gpt2", fan_in_fan_out=True)
    out = tmp_path / "out"
    assert_bad(
        env, merge_args(env, out, task=gpt_adapter), out, "transformer.h.0.attn.c_attn", "architecture"
    )


@pytest.mark.parametrize("where", ["aligned", "task", "safety"])
def test_nan_or_inf_in_inputs(env: dict[str, Path], tmp_path: Path, where: str) -> None:
    d = copy_dir(env[where], tmp_path / where)
    if where == "aligned":
        key, fname, val = "model.layers.2.self_attn.q_proj.weight", "model.safetensors", float("nan")
    else:
        key, fname = (
            "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
            "adapter_model.safetensors",
        )
        val = float("inf")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key][0, 0] = val

    edit_tensors(d, fname, poison)
    out = tmp_path / "out"
    needle = "model.layers.2.self_attn.q_proj" if where == "aligned" else "model.layers.1.self_attn.v_proj"
    assert_bad(env, [*merge_args(env, out, **{where: d}), "--threshold", "1"], out, needle, "NaN or Inf")


def test_nan_elsewhere_in_the_aligned_model_is_caught_when_writing_the_full_model(
    env: dict[str, Path], tmp_path: Path
) -> None:
    al = copy_dir(env["aligned"], tmp_path / "al")
    edit_tensors(al, "model.safetensors", lambda t: t["model.norm.weight"].__setitem__(0, float("nan")))
    out = tmp_path / "out"
    assert_bad(env, [*merge_args(env, out, aligned=al), "--merge-into-base"], out, "model.norm.weight", "NaN")


def test_dora_adapter(env: dict[str, Path], tmp_path: Path) -> None:
    dora = save_adapter(env["aligned"], tmp_path / "dora", seed=3, use_dora=True)
    out = tmp_path / "out"
    assert_bad(env, merge_args(env, out, task=dora), out, "DoRA", str(dora))


def test_unequal_ranks_in_peft_linear_mode(env: dict[str, Path], tmp_path: Path) -> None:
    r8 = save_adapter(env["aligned"], tmp_path / "r8", seed=3, r=8)
    out = tmp_path / "out"
    args = [*merge_args(env, out, safety=r8), "--mode", "peft-linear", "--threshold", "1"]
    assert_bad(env, args, out, "peft-linear needs equal ranks", "r=4", "r=8")


def test_existing_output_needs_force(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = invoke(merge_args(env, out))
    assert code == 2 and "already exists" in text and "--force" in text
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only safemerge's own output (docs/engine.md, "Outputs and `--force`")
    code, text = invoke([*merge_args(env, out), "--force"])
    assert code == 2 and "keep.txt, which safemerge did not write" in text
    assert (out / "keep.txt").read_text() == "mine" and not (out / "adapter_model.safetensors").exists()
    (out / "keep.txt").unlink()
    code, text = invoke([*merge_args(env, out), "--force"])  # an empty directory
    assert code == 0 and (out / "adapter_model.safetensors").exists()
    code, text = invoke([*merge_args(env, out), "--force"])  # an earlier merge
    assert code == 0 and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupted_safetensors(env: dict[str, Path], tmp_path: Path, damage: str) -> None:
    un = copy_dir(env["unaligned"], tmp_path / "un")
    f = un / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        data[: len(data) // 2]
        if damage == "truncate"
        else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + data[20:]
    )
    out = tmp_path / "out"
    assert_bad(env, merge_args(env, out, unaligned=un), out, str(f))


def test_pickle_only_checkpoint_needs_opt_in(env: dict[str, Path], tmp_path: Path) -> None:
    un = tmp_path / "un_pickle"
    un.mkdir()
    shutil.copy(env["unaligned"] / "config.json", un / "config.json")
    torch.save(load_file(env["unaligned"] / "model.safetensors"), un / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_bad(env, merge_args(env, out, unaligned=un), out, "pickle", "--allow-pickle", str(un))
    code, text = invoke([*merge_args(env, out, unaligned=un), "--allow-pickle"])
    assert code == 0, text


def test_bad_option_values_are_usage_errors(env: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_bad(env, [*merge_args(env, out), "--weights", "0.8"], out, "weights")
    assert_bad(env, [*merge_args(env, out), "--top-k", "2", "--fraction", "0.5"], out, "only one of")
    assert_bad(env, [*merge_args(env, out), "--mode", "fancy"], out, "mode")
    assert_bad(env, [*merge_args(env, out), "--density", "0"], out, "density")
    assert_bad(env, [*merge_args(env, out, task=tmp_path / "nope")], out, "nope")


def test_cuda_request_without_gpu_is_a_clear_error(env: dict[str, Path], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cuda path is exercised by the device check instead")
    out = tmp_path / "out"
    assert_bad(env, [*merge_args(env, out), "--device", "cuda"], out, "CUDA")


def test_error_messages_keep_square_brackets(tmp_path: Path) -> None:
    """An error naming `safemerge[ray]` or a tensor like `w[0]` prints it as written (not as rich markup)."""
    from safemerge.cli.common import run_guarded
    from safemerge.common.errors import InputError

    def body() -> None:
        raise InputError("install it with pip install 'safemerge[ray]' (tensor [bold]w[0])")

    import contextlib
    import io

    import typer

    from safemerge.cli import common

    out = io.StringIO()
    old = common.console
    common.console = common.Console(file=out, width=200)
    try:
        with contextlib.suppress(typer.Exit):
            run_guarded(body)
    finally:
        common.console = old
    assert "pip install 'safemerge[ray]' (tensor [bold]w[0])" in out.getvalue()
