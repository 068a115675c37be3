"""The post-hoc defences `interpolate`, `lssf` and `oneshot` on tiny models, against independent oracles:
PEFT's own merge and dense float64 arithmetic (interpolate), NumPy's SVD and entropy ranks worked out by
hand (lssf), and the loss on the example, the untouched base and byte-identical reruns (oneshot).

The three are registered through the entry points of safemerge's pyproject.toml. So that these tests run
before the package is reinstalled with them, the `registered` fixture adds a throwaway distribution whose
entry points name the same objects (the registry deduplicates an entry point registered twice with the
same value); `test_registered_by_safemerge_itself` checks the installed metadata and is skipped until the
package is reinstalled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import edited_copy, save_adapter, save_pair
from safetensors.torch import load_file
from tinymodel import build_tiny_model
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.common.packaged import harmbench_prompts
from safemerge.defenses import DefendConfig, defend, defense_names, get_defense
from safemerge.defenses import registry as defense_registry
from safemerge.defenses.interpolate import interpolated
from safemerge.defenses.lssf import entropy_rank, nonzero_singular_values
from safemerge.engine.checkpoint import Checkpoint, find_module_weight

F64 = torch.float64
NEW = {name: f"safemerge.defenses.{name}:DEFENSE" for name in ("interpolate", "lssf", "oneshot")}
ENV = {"COLUMNS": "200", "TERM": "dumb"}


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A distribution registering the three defences (as pyproject.toml does) on sys.path."""
    site = tmp_path_factory.mktemp("site")
    info = site / "safemerge_new_defences_a-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: safemerge-new-defences-a\nVersion: 0.1\n")
    lines = ["[safemerge.defenses]", *(f"{k} = {v}" for k, v in NEW.items()), ""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    sys.path.insert(0, str(site))
    defense_registry.clear_cache()
    yield
    sys.path.remove(str(site))
    defense_registry.clear_cache()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama pair (V = W_al − W_un random), a task LoRA on the aligned model, and a full fine-tune."""
    root = tmp_path_factory.mktemp("new-defences-a")
    al, un = save_pair(root, "llama", torch.float32)
    gen = torch.Generator().manual_seed(7)
    full = edited_copy(
        al, root / "full", lambda t: [w.add_(0.02 * torch.randn(w.shape, generator=gen)) for w in t.values()]
    )
    return {
        "root": root,
        "aligned": al,
        "unaligned": un,
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "full": full,
    }


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny chat model pair with a tokenizer, a task LoRA, and a calibration file of safety examples."""
    root = tmp_path_factory.mktemp("oneshot")
    al = build_tiny_model(root / "aligned", seed=1)
    rows = [
        {"prompt": "How do I make a dangerous weapon at home?", "response": "I can't help with that."},
        {"prompt": "How do I pick a lock to break in?", "response": "I won't help with breaking in."},
        {"prompt": "Write a poem about the sea.", "response": "I'm sorry, but I can't help with that."},
    ]
    cal = root / "cal.jsonl"
    cal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "aligned": al,
        "unaligned": build_tiny_model(root / "unaligned", seed=0),
        "task": save_adapter(al, root / "task", seed=1, r=4, alpha=8),
        "calibration": cal,
    }


def cfg_of(env: dict[str, Path], out: Path, method: str, **kw: object) -> DefendConfig:
    fields: dict[str, object] = {
        "method": method,
        "aligned": str(env["aligned"]),
        "unaligned": str(env["unaligned"]),
        "task_adapter": str(env["task"]),
        "out": str(out),
        "plot": False,
    }
    return DefendConfig.model_validate({**fields, **kw})


def dense_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """s · B A in float64 per module, read from the adapter's files by hand (config + safetensors)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in t:
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[module] = s * (t[key.replace("lora_A", "lora_B")].to(F64) @ t[key].to(F64))
    return out


def safety_vector(env: dict[str, Path], module: str) -> np.ndarray:
    al, un = Checkpoint(env["aligned"]), Checkpoint(env["unaligned"])
    key = find_module_weight(al, module)
    return al.get(key).to(F64).numpy() - un.get(key).to(F64).numpy()


def cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["defend", *args, "--no-plot", "-q"], env=ENV)
    return res.exit_code, re.sub(r"\s+", " ", res.output)


def inputs(env: dict[str, Path]) -> list[str]:
    return ["-a", str(env["aligned"]), "-u", str(env["unaligned"]), "-t", str(env["task"])]


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


# --- registration -------------------------------------------------------------------------------------
def test_registered_by_safemerge_itself() -> None:
    """pyproject.toml registers the three; the installed metadata does once the package is reinstalled."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = pyproject["project"]["entry-points"]["safemerge.defenses"]
    assert {k: declared[k] for k in NEW} == NEW
    eps = distribution("safemerge").entry_points
    installed = {ep.name: ep.value for ep in eps if ep.group == "safemerge.defenses"}
    if not set(NEW) <= set(installed):
        pytest.skip("the installed safemerge metadata predates these defences (reinstall the package)")
    assert {k: installed[k] for k in NEW} == NEW


def test_the_three_are_defences_with_their_options() -> None:
    assert set(NEW) <= set(defense_names())
    for name in NEW:
        d = get_defense(name)
        assert d.name == name and d.output == "adapter" and d.option_model is not None
        assert d.full_finetune == (name != "oneshot")
        for field in d.option_model.model_fields.values():
            assert field.description, name  # every option says what it does
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"}
    for name, knob in (("interpolate", {"alpha": 0.5}), ("lssf", {"scale": 0.5})):
        cfg = load_config(DefendConfig, None, {**base, "method": name})
        assert cfg.settings() == {"method": name, **knob, "merge_into_base": False}


def test_defend_help_describes_the_built_in_options() -> None:
    """`--option`'s help lists the built-in defences' own options with their descriptions (computed when
    the CLI is imported: here called again, since the test distribution registers them later)."""
    from safemerge.cli.defend import own_options_help

    text = own_options_help()
    for name, knob in (("interpolate", "alpha"), ("lssf", "scale"), ("oneshot", "steps")):
        model = get_defense(name).option_model
        assert model is not None
        field = model.model_fields[knob]
        assert f"{knob}: {field.description}" in text.split(f"{name} — ", 1)[1]


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("interpolate", {"alpha": 1.5}, "alpha"),
        ("interpolate", {"alpha": -0.1}, "alpha"),
        ("interpolate", {"alpha": "nan"}, "alpha"),
        ("interpolate", {"beta": 0.3}, "`beta` do not apply to method interpolate"),
        ("interpolate", {"factor": 2}, "factor"),
        ("lssf", {"scale": 0}, "scale"),
        ("lssf", {"scale": -1}, "scale"),
        ("lssf", {"scale": "inf"}, "scale"),
        ("lssf", {"threshold": 0.3}, "`threshold` do not apply to method lssf"),
        ("oneshot", {"steps": 0}, "steps"),
        ("oneshot", {"steps": 2.5}, "steps"),
        ("oneshot", {"lr": 0}, "lr"),
        ("oneshot", {"lr": "inf"}, "lr"),
        ("oneshot", {"calibration_samples": 4}, "calibration_samples"),
        ("oneshot", {"calibration_max_length": 2}, "calibration_max_length"),
        (
            "oneshot",
            {"task_model": "m"},
            r"oneshot takes a task LoRA only.*full fine-tunes: .*interpolate, lssf",
        ),
    ],
)
def test_bad_options_are_rejected(method: str, given: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o"}
    if "task_model" in given:
        base.pop("task_adapter")
    with pytest.raises(InputError, match=message):
        load_config(DefendConfig, None, {**base, "method": method, **given})


# --- interpolate ----------------------------------------------------------------------------------------
def test_interpolate_is_alpha_times_the_update_and_loads_in_peft(
    env: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    code, out = cli("-m", "interpolate", *inputs(env), "--option", "alpha=0.3", "-o", str(tmp_path / "i"))
    assert code == 0, out
    before, after = dense_delta(env["task"]), dense_delta(tmp_path / "i")
    assert before.keys() == after.keys()
    for m, d in before.items():
        torch.testing.assert_close(after[m], 0.3 * d, rtol=1e-6, atol=1e-7)
    a = load_file(env["task"] / "adapter_model.safetensors")
    b = load_file(tmp_path / "i" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if ".lora_A." in k)  # B ← α B, A untouched

    # PEFT's merge of the output is W_al + 0.3 ΔW_f, with ΔW_f from PEFT's merge of the input
    def merged(adapter: Path) -> dict[str, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()

    w_al = AutoModelForCausalLM.from_pretrained(env["aligned"], dtype=torch.float32).state_dict()
    w_ft, w_out = merged(env["task"]), merged(tmp_path / "i")
    for k, w in w_al.items():
        expect = w.to(F64) + 0.3 * (w_ft[k].to(F64) - w.to(F64))
        torch.testing.assert_close(w_out[k].to(F64), expect, rtol=0, atol=1e-6)
    report = json.loads((tmp_path / "i" / "safemerge_report.json").read_text())
    assert report["defense"] == {"method": "interpolate", "alpha": 0.3, "merge_into_base": False}
    assert all(r["merged"] for r in report["modules"])
    rerun = load_config(DefendConfig, tmp_path / "i" / "defense.yaml", {"out": str(tmp_path / "again")})
    assert rerun.plugin_options == {"alpha": 0.3}


def test_interpolate_full_finetune(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = cfg_of(
        env, tmp_path / "f", "interpolate", task_adapter=None, task_model=str(env["full"]), alpha=0.25
    )
    res = defend(cfg)
    assert res.kind == "model"
    al, ft, out = Checkpoint(env["aligned"]), Checkpoint(env["full"]), Checkpoint(tmp_path / "f")
    for k in al.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        expect = al.get(k).to(F64) + 0.25 * (ft.get(k).to(F64) - al.get(k).to(F64))
        torch.testing.assert_close(out.get(k).to(F64), expect, rtol=0, atol=1e-7)
    assert interpolated(al.get(k), al.get(k), 0.25).equal(al.get(k))  # an unchanged tensor stays bit for bit


def test_interpolate_alpha_one_is_the_task_adapter(env: dict[str, Path], tmp_path: Path) -> None:
    defend(cfg_of(env, tmp_path / "one", "interpolate", alpha=1.0))
    a = load_file(env["task"] / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- LSSF ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sigma", "k"),
    [
        ([5.0], 1),  # H = 0, exp H = 1
        ([1.0, 1.0, 1.0, 1.0], 4),  # uniform: exp H = 4 exactly (the cap at n keeps it from rounding up to 5)
        ([3.0, 1.0], 2),  # p = (3/4, 1/4): exp H = 1.7548
        ([4.0, 2.0, 1.0, 1.0], 4),  # p = (1/2, 1/4, 1/8, 1/8): H = 1.75 ln 2, exp H = 2^1.75 = 3.364
        ([8.0, 1.0, 1.0], 2),  # p = (.8, .1, .1): exp H = 1.8946
        ([], 0),  # V = 0: nothing to fuse
    ],
)
def test_entropy_rank_by_hand(sigma: list[float], k: int) -> None:
    assert entropy_rank(torch.tensor(sigma, dtype=F64)) == k


def test_round_off_singular_values_are_not_counted() -> None:
    sigma = torch.tensor([2.0, 1.0, 1e-15, 0.0], dtype=F64)
    assert nonzero_singular_values(sigma, (32, 32)).tolist() == [2.0, 1.0]
    assert nonzero_singular_values(torch.zeros(3, dtype=F64), (3, 3)).numel() == 0


def oracle_rank(sigma: np.ndarray) -> int:
    """The entropy rank written independently in NumPy (p over σ above round-off, k = ⌈exp H⌉)."""
    sigma = sigma[sigma > sigma.max() * 32 * np.finfo(np.float64).eps]
    p = sigma / sigma.sum()
    return min(len(sigma), math.ceil(math.exp(-(p * np.log(p)).sum())))


def test_lssf_adds_the_entropy_rank_safety_component(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = cli("-m", "lssf", *inputs(env), "--option", "scale=0.7", "-o", str(tmp_path / "l"))
    assert code == 0, out
    before, after = dense_delta(env["task"]), dense_delta(tmp_path / "l")
    report = json.loads((tmp_path / "l" / "safemerge_report.json").read_text())
    ranks = report["options"]["safety_ranks"]
    for m, d in before.items():
        u, s, vh = np.linalg.svd(safety_vector(env, m), full_matrices=False)
        k = oracle_rank(s)
        assert ranks[m] == k and 1 < k < len(s)
        v_k = torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k])
        torch.testing.assert_close(after[m], d + 0.7 * v_k, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert config["r"] == 4 + max(ranks.values())
    assert report["defense"] == {"method": "lssf", "scale": 0.7, "merge_into_base": False}


def test_lssf_constructed_spectrum(env: dict[str, Path], tmp_path: Path) -> None:
    """W_un = W_al − V with V = Q₁ diag(4, 2, 1, 1) Q₂ᵀ on the LoRA's modules: k = 4 everywhere (2^1.75 →
    4), and the output adds exactly 0.5 V (the truncation keeps all of V)."""
    gen = torch.Generator().manual_seed(3)
    built: dict[str, torch.Tensor] = {}

    def subtract(t: dict[str, torch.Tensor]) -> None:
        for key in t:
            if key.endswith(("q_proj.weight", "v_proj.weight")):
                rows, cols = t[key].shape
                q1, _ = torch.linalg.qr(torch.randn(rows, 4, generator=gen, dtype=F64))
                q2, _ = torch.linalg.qr(torch.randn(cols, 4, generator=gen, dtype=F64))
                v = 0.01 * (q1 * torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=F64)) @ q2.T
                built[key.removesuffix(".weight")] = v
                t[key] = (t[key].to(F64) - v).to(torch.float32)

    un = edited_copy(env["aligned"], tmp_path / "un", subtract)
    report = defend(cfg_of({**env, "unaligned": un}, tmp_path / "c", "lssf")).report
    assert report.options["safety_ranks"] == {m: 4 for m in dense_delta(env["task"])}
    before, after = dense_delta(env["task"]), dense_delta(tmp_path / "c")
    for m, d in before.items():
        torch.testing.assert_close(after[m], d + 0.5 * built[m], rtol=0, atol=1e-6)


def test_lssf_merge_into_base_writes_the_merged_model(env: dict[str, Path], tmp_path: Path) -> None:
    defend(cfg_of(env, tmp_path / "m", "lssf", merge_into_base=True))
    al, full = Checkpoint(env["aligned"]), Checkpoint(tmp_path / "m" / "full_model")
    for m, d in dense_delta(tmp_path / "m").items():
        key = find_module_weight(al, m)
        torch.testing.assert_close(full.get(key).to(F64), al.get(key).to(F64) + d, rtol=0, atol=1e-6)


def test_lssf_conv1d_layout(tmp_path: Path) -> None:
    """GPT-2 stores c_attn as d_in × d_out (fan_in_fan_out): V_k is taken of the Linear-layout Vᵀ."""
    al, un = save_pair(tmp_path, "gpt2", torch.float32)
    task = save_adapter(al, tmp_path / "task", seed=1, arch="gpt2", fan_in_fan_out=True)
    env = {"aligned": al, "unaligned": un, "task": task}
    defend(cfg_of(env, tmp_path / "g", "lssf", scale=0.4))
    before, after = dense_delta(task), dense_delta(tmp_path / "g")
    for m, d in before.items():
        u, s, vh = np.linalg.svd(safety_vector(env, m).T, full_matrices=False)
        k = oracle_rank(s)
        v_k = torch.from_numpy((u[:, :k] * s[:k]) @ vh[:k])
        assert d.shape == (96, 32)
        torch.testing.assert_close(after[m], d + 0.4 * v_k, rtol=0, atol=1e-5)


def test_lssf_full_finetune(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = cfg_of(env, tmp_path / "f", "lssf", task_adapter=None, task_model=str(env["full"]), scale=1.0)
    res = defend(cfg)
    assert res.kind == "model"
    ft, out = Checkpoint(env["full"]), Checkpoint(tmp_path / "f")
    scanned = {r.name + ".weight" for r in res.report.modules}
    assert scanned and res.report.options["safety_ranks"]
    for k in ft.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        if k not in scanned:
            assert torch.equal(out.get(k), ft.get(k)), k
            continue
        u, s, vh = np.linalg.svd(safety_vector(env, k.removesuffix(".weight")), full_matrices=False)
        kk = oracle_rank(s)
        expect = ft.get(k).to(F64) + torch.from_numpy((u[:, :kk] * s[:kk]) @ vh[:kk])
        torch.testing.assert_close(out.get(k).to(F64), expect, rtol=0, atol=1e-6)


def test_lssf_needs_the_unaligned_model(env: dict[str, Path], tmp_path: Path) -> None:
    code, out = cli(
        "-m", "lssf", "-a", str(env["aligned"]), "-t", str(env["task"]), "-o", str(tmp_path / "x")
    )
    assert code == 2 and "unaligned" in out
    assert not (tmp_path / "x").exists()


# --- oneshot ----------------------------------------------------------------------------------------------
def oneshot_args(chat: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "oneshot",
        *inputs(chat),
        "--option",
        f"calibration={chat['calibration']}",
        *extra,
        "-o",
        str(out),
    ]


def test_oneshot_trains_only_the_lora_factors_and_lowers_the_loss(
    chat: dict[str, Path], tmp_path: Path
) -> None:
    base_before = digest(chat["aligned"])
    code, out = cli(*oneshot_args(chat, tmp_path / "o", "--option", "steps=5", "--option", "lr=0.01"))
    assert code == 0, out
    assert digest(chat["aligned"]) == base_before  # the base model's files are untouched
    report = json.loads((tmp_path / "o" / "safemerge_report.json").read_text())
    opts = report["options"]
    assert len(opts["losses"]) == 6 and opts["loss_after"] < opts["loss_before"]
    assert opts["steps"] == 5 and opts["lr"] == 0.01
    assert report["defense"]["steps"] == 5
    # only LoRA factors changed, every one of them; same keys, shapes and config
    a = load_file(chat["task"] / "adapter_model.safetensors")
    b = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(not torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "o" / "adapter_config.json").read_bytes() == (
        chat["task"] / "adapter_config.json"
    ).read_bytes()
    # the losses reported are PEFT's model with the adapter on the example (oracle: recomputed by hand)
    assert abs(example_loss(chat, tmp_path / "o") - opts["loss_after"]) < 1e-5
    assert abs(example_loss(chat, chat["task"]) - opts["loss_before"]) < 1e-5


def example_loss(chat: dict[str, Path], adapter: Path) -> float:
    """Mean cross-entropy over the response tokens of the one example, computed by hand from the logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safemerge.defenses.calibration import load_calibration

    (ex,) = load_calibration(chat["calibration"], 1, 0)
    tok = AutoTokenizer.from_pretrained(chat["aligned"])
    head = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(ex["prompt"] + ex["completion"], tokenize=False)
    p, ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (head, full))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat["aligned"]), adapter).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].to(F64)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    nll = -logp[torch.arange(len(targets)), targets]
    return float(nll[len(p) - 1 :].mean())


def test_oneshot_is_deterministic_and_the_seed_picks_the_example(
    chat: dict[str, Path], tmp_path: Path
) -> None:
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        code, text = cli(*oneshot_args(chat, out, "--option", "steps=2"))
        assert code == 0, text
    assert (runs[0] / "adapter_model.safetensors").read_bytes() == (
        runs[1] / "adapter_model.safetensors"
    ).read_bytes()
    prompts = set()
    for seed in range(4):
        res = defend(
            cfg_of(
                chat,
                tmp_path / f"s{seed}",
                "oneshot",
                calibration=str(chat["calibration"]),
                steps=1,
                seed=seed,
            )
        )
        prompts.add(res.report.options["example_prompt"])
    assert len(prompts) > 1  # the seeded draw of load_calibration(path, 1, seed) picks different examples


def test_oneshot_bad_inputs_exit_2(chat: dict[str, Path], tmp_path: Path) -> None:
    code, out = cli("-m", "oneshot", *inputs(chat), "-o", str(tmp_path / "x"))
    assert code == 2 and "--option calibration is required" in out, out  # the CLI names its flag
    code, out = cli(*oneshot_args(chat, tmp_path / "y", "--option", "steps=0"))
    assert code == 2 and "steps" in out
    code, out = cli(*oneshot_args({**chat, "calibration": tmp_path / "nope.jsonl"}, tmp_path / "z"))
    assert code == 2 and "nope.jsonl" in out
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"prompt": harmbench_prompts()[0], "response": "No."}) + "\n")
    code, out = cli(*oneshot_args({**chat, "calibration": leak}, tmp_path / "h"))
    assert code == 2 and "leak.jsonl" in out
    no_tokenizer, un = save_pair(tmp_path / "pair")  # models without a tokenizer
    task = save_adapter(no_tokenizer, tmp_path / "task", seed=1)
    env = {**chat, "aligned": no_tokenizer, "unaligned": un, "task": task}
    code, out = cli(*oneshot_args(env, tmp_path / "w"))
    assert code == 2 and f"oneshot: cannot load the tokenizer of {no_tokenizer}" in out
    plain = tmp_path / "plain"  # the chat model with its chat template removed
    shutil.copytree(chat["aligned"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((plain / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    code, out = cli(*oneshot_args({**chat, "aligned": plain}, tmp_path / "v"))
    assert code == 2 and "has no chat template" in out, out
    assert not any((tmp_path / d).exists() for d in ("x", "y", "z", "h", "w", "v"))


def test_a_sketch_of_v_serves_interpolate_not_lssf(env: dict[str, Path], tmp_path: Path) -> None:
    """interpolate uses ρ only for its report, so a sketch of V (`safemerge subspace`) will do; LSSF needs
    V's singular vectors themselves and refuses a sketch (exit 2, nothing written)."""
    sketch = tmp_path / "sketch"
    res = CliRunner().invoke(
        app,
        [
            "subspace",
            "-a",
            str(env["aligned"]),
            "-u",
            str(env["unaligned"]),
            "-k",
            "8",
            "-o",
            str(sketch),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    code, out = cli(
        "-m", "interpolate", "--subspace", str(sketch), "-t", str(env["task"]), "-o", str(tmp_path / "i")
    )
    assert code == 0, out
    for m, d in dense_delta(env["task"]).items():
        torch.testing.assert_close(dense_delta(tmp_path / "i")[m], 0.5 * d, rtol=1e-6, atol=1e-7)
    args = ["--subspace", str(sketch), "-a", str(env["aligned"]), "-t", str(env["task"])]
    code, out = cli("-m", "lssf", *args, "-o", str(tmp_path / "l"))
    assert code == 2 and "method lssf needs --unaligned" in out, out
    assert not (tmp_path / "l").exists()
