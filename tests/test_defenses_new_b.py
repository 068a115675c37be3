"""Safe Delta, Antidote and reset on tiny models, against independent float64 oracles.

Oracles: Safe Delta as the textbook sequential OBS (an explicit inverse of the remaining columns' H per
column, not the Cholesky trick); the calibration activations from `output_hidden_states` through the
layer's input norm (not forward hooks); the LoRA factors and merged weights from PEFT; reset's
gradient by autograd through all examples at once (not the per-example linearisation); the
selections by brute-force sorts in the test.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import edited_copy, save_adapter, save_pair, tiny_chat_setup
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from safemerge.cli import app
from safemerge.common.config_io import load_config
from safemerge.common.errors import InputError
from safemerge.common.packaged import harmbench_prompts
from safemerge.defenses import DefendConfig, defend, registry, safedelta
from safemerge.defenses.antidote import DEFENSE as ANTIDOTE
from safemerge.defenses.antidote import prune_mask, wanda_scores
from safemerge.defenses.calibration import encode_calibration, load_calibration
from safemerge.defenses.reset import DEFENSE as RESET
from safemerge.defenses.reset import direction_layer, reset_masks
from safemerge.defenses.safedelta import DEFENSE as SAFEDELTA
from safemerge.defenses.safedelta import hessian, keep_mask, safe_delta
from safemerge.engine.checkpoint import Checkpoint
from safemerge.engine.lora import LoraAdapter

F64 = torch.float64
NEW = {"safedelta": SAFEDELTA, "antidote": ANTIDOTE, "reset": RESET}
MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The three defences registered by entry point, as an installed safemerge will (a dist-info on
    sys.path naming this checkout's modules), so DefendConfig and the CLI know them."""
    site = tmp_path_factory.mktemp("site")
    info = site / "safemerge_new_defences_b-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: safemerge-new-defences-b\nVersion: 0.1\n")
    lines = [f"{n} = safemerge.defenses.{n}:DEFENSE" for n in NEW]
    (info / "entry_points.txt").write_text("[safemerge.defenses]\n" + "\n".join(lines) + "\n")
    sys.path.insert(0, str(site))
    registry.clear_cache()
    yield
    sys.path.remove(str(site))
    registry.clear_cache()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny chat model pair, a task LoRA on q/v, a full fine-tune, and a calibration file."""
    root = tmp_path_factory.mktemp("new-defences-b")
    env = tiny_chat_setup(root)
    gen = torch.Generator().manual_seed(7)

    def perturb(t: dict[str, torch.Tensor]) -> None:
        for key in t:
            if "proj" in key:
                t[key].add_(0.05 * torch.randn(t[key].shape, generator=gen))

    env["full"] = edited_copy(env["aligned"], root / "full", perturb)
    env["task_qvo"] = save_adapter(
        env["aligned"], root / "task_qvo", seed=3, targets=["q_proj", "v_proj", "o_proj"]
    )
    rows = [
        {"prompt": f"How do I pick lock number {i}?", "response": f"I can't help with lock {i}, sorry."}
        for i in range(5)
    ]
    env["cal"] = root / "cal.jsonl"
    env["cal"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return env


def cfg_of(env: dict[str, Path], out: Path, method: str, full: bool = False, **opts: object) -> DefendConfig:
    task = {"task_model": str(env["full"])} if full else {"task_adapter": str(env["task"])}
    fields = {
        "method": method,
        "aligned": str(env["aligned"]),
        "unaligned": str(env["unaligned"]),
        **task,
        "out": str(out),
        "plot": False,
        "calibration": str(env["cal"]),
        **opts,
    }
    return DefendConfig.model_validate(fields)


def calibration(env: dict[str, Path]) -> list[tuple[list[int], int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env["aligned"])
    return encode_calibration(tok, load_calibration(env["cal"], 64), 256)


def hf_model(path: Path, adapter: Path | None = None) -> Any:
    """The model in float32; with `adapter`, PEFT's merge of it (the oracle of W_al + s·B A)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return model


def layer_inputs(model: Any, encoded: list[tuple[list[int], int]]) -> dict[int, torch.Tensor]:
    """The q/v projections' input per layer over the response tokens: input_layernorm(hidden_states[i])."""
    xs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    with torch.no_grad():
        for ids, start in encoded:
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for i in xs:
                xs[i].append(model.model.layers[i].input_layernorm(hs[i])[0, start:].to(F64))
    return {i: torch.cat(v) for i, v in xs.items()}


def o_proj_inputs(model: Any, encoded: list[tuple[list[int], int]]) -> dict[int, torch.Tensor]:
    """The o projections' input per layer over the response tokens (a forward hook of the test's own)."""
    xs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    handles = [
        model.model.layers[i].self_attn.o_proj.register_forward_hook(
            lambda _m, args, _out, i=i: xs[i].append(args[0][0].detach().to(F64))
        )
        for i in xs
    ]
    with torch.no_grad():
        for ids, start in encoded:
            model(torch.tensor([ids]))
            for i in xs:
                xs[i][-1] = xs[i][-1][start:]
    for h in handles:
        h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}


def output_weight(out: Path, module: str) -> torch.Tensor:
    return Checkpoint(out).get(module + ".weight").to(F64)


# --- Safe Delta ---------------------------------------------------------------------------------------


def oracle_safe_delta(
    w_al: torch.Tensor, w_ft: torch.Tensor, x: torch.Tensor, n: int, scale: float, block: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential OBS with explicit inverses: H = 2/n XᵀX (+1 on dead inputs) + 1% mean diag; column j's
    sensitivity is 1/[H_F⁻¹]_00 with F = columns j..; each block's entries chosen at its start."""
    h = 2.0 / n * x.T @ x
    for j in range(h.shape[0]):
        if h[j, j] == 0:  # an input that is zero on every calibration token
            h[j, j] = 1.0
    h = h + 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=F64)
    rows, cols = w_al.shape
    hinv_diag = torch.tensor([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)], dtype=F64)
    sens = 1.0 / hinv_diag
    w = w_al.clone()
    kept = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if j % block == 0:
            width = min(block, cols - j)
            delta = w_ft - w
            entries = sorted(
                (float(sens[c]), i * width + c - j, i, c) for i in range(rows) for c in range(j, j + width)
            )
            entries = entries[: len(entries) - int(0.15 * len(entries))]
            budget = float(sens[j : j + width].mean()) * scale / 2 * rows / 4096
            total = 0.0
            for _, _, i, c in entries:
                total += float(delta[i, c] ** 2 / hinv_diag[c])
                kept[i, c] = total <= budget
        hf = torch.linalg.inv(h[j:, j:])
        q = torch.where(kept[:, j], w_ft[:, j], w[:, j])
        w[:, j + 1 :] -= torch.outer((w[:, j] - q) / hf[0, 0], hf[0, 1:])
        w[:, j] = q
    return w, kept


def test_safe_delta_matches_sequential_obs(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=gen, dtype=F64)
    x[:, 2] *= 0.1  # one quiet input: a cheap column
    w_al = torch.randn(4096, 6, generator=gen, dtype=F64)[:5]  # 5 rows (the budget scales with rows)
    w_ft = w_al + 0.3 * torch.randn(5, 6, generator=gen, dtype=F64)
    h = hessian(x.T @ x, 9)
    for scale in (40.0, 400.0):
        got, kept = safe_delta(w_al, w_ft, h, scale)
        want, want_kept = oracle_safe_delta(w_al, w_ft, x, 9, scale)
        assert torch.equal(kept, want_kept)
        assert 0 < int(kept.sum()) < 30 - int(0.15 * 30)  # the budget binds
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert torch.equal(got[kept], w_ft[kept])  # kept entries are the fine-tuned values
    # an input that is zero on every token (H_jj = 0 before the damping) is given H_jj = 1
    x[:, 4] = 0.0
    got, kept = safe_delta(w_al, w_ft, hessian(x.T @ x, 9), 40.0)
    want, want_kept = oracle_safe_delta(w_al, w_ft, x, 9, 40.0)
    assert torch.equal(kept, want_kept)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # several blocks (the next block's entries chosen after the earlier blocks' compensation) and lazy
    # groups of columns: the same result
    monkeypatch.setattr(safedelta, "BLOCK", 4)
    monkeypatch.setattr(safedelta, "LAZY", 3)
    for scale in (40.0, 400.0, 4000.0):
        got, kept = safe_delta(w_al, w_ft, hessian(x.T @ x, 9), scale)
        want, want_kept = oracle_safe_delta(w_al, w_ft, x, 9, scale, block=4)
        assert torch.equal(kept, want_kept)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert kept[:, 4:].any() and not kept[:, 4:].all()
    monkeypatch.undo()
    # s = 0 keeps nothing: the aligned weights, exactly (nothing to compensate)
    got, kept = safe_delta(w_al, w_ft, h, 0.0)
    assert not kept.any() and torch.equal(got, w_al)
    # an unlimited budget keeps all but the 15% most sensitive entries (whole columns first)
    _, kept = safe_delta(w_al, w_ft, h, 1e12)
    assert int(kept.sum()) == 30 - int(0.15 * 30)


def test_keep_mask_orders_by_column_sensitivity_and_protects_15_percent() -> None:
    d = torch.tensor([1.0, 0.5, 2.0], dtype=F64)  # sensitivities 1/d²: 1, 4, 0.25
    delta = torch.ones(2, 3, dtype=F64)

    # budget = mean(1, 4, 0.25) · s/2 · 2/4096; costs δ²/d²: column 2 (0.25 each), then 0 (1 each)
    def scale_for(budget: float) -> float:
        return budget / (0.5 * 2 / 4096) / (5.25 / 3)

    # budget 1.2: both of column 2 (0.5), not the next entry (1.5)
    assert keep_mask(delta, d, scale_for(1.2)).tolist() == [[False, False, True], [False, False, True]]
    # budget 1.6: column 2, then column 0's first row (cumulative 1.5), ties in row order
    assert keep_mask(delta, d, scale_for(1.6)).tolist() == [[True, False, True], [False, False, True]]
    huge = keep_mask(delta, d, 1e12)  # int(0.15·6) = 0 protected: every entry
    assert huge.all()


def test_safedelta_on_a_lora_matches_the_oracle(env: dict[str, Path], tmp_path: Path) -> None:
    res = defend(cfg_of(env, tmp_path / "out", "safedelta", scale=2000.0, task_adapter=str(env["task_qvo"])))
    modules = [*MODULES, "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert res.kind == "model" and res.modified == 6
    enc = calibration(env)
    aligned = hf_model(env["aligned"])
    xs, xs_o = layer_inputs(aligned, enc), o_proj_inputs(aligned, enc)
    merged = hf_model(env["aligned"], env["task_qvo"])
    kept_any = False
    for m in modules:
        layer = int(m.split(".")[2])
        w_al = aligned.get_submodule(m).weight.detach().to(F64)
        w_ft = merged.get_submodule(m).weight.detach().to(F64)
        x = xs_o[layer] if m.endswith("o_proj") else xs[layer]
        want, kept = oracle_safe_delta(w_al, w_ft, x, len(enc), 2000.0)
        kept_any |= bool(kept.any()) and not bool(kept.all())
        torch.testing.assert_close(output_weight(tmp_path / "out", m), want, rtol=1e-4, atol=1e-5)
    assert kept_any
    # every other tensor is the aligned model's
    out, al = load_file(next((tmp_path / "out").glob("*.safetensors"))), Checkpoint(env["aligned"])
    for key, t in out.items():
        if not any(key.startswith(m) for m in modules):
            assert torch.equal(t, al.get(key)), key
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert report["defense"]["scale"] == 2000.0 and report["options"]["kept_delta_entries"] > 0


def test_safedelta_on_a_full_finetune(env: dict[str, Path], tmp_path: Path) -> None:
    res = defend(cfg_of(env, tmp_path / "out", "safedelta", full=True, scale=0.0))
    assert res.kind == "model"
    aligned, task = Checkpoint(env["aligned"]), Checkpoint(env["full"])
    out = Checkpoint(tmp_path / "out")
    for key in out.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        if "proj" in key:  # s = 0: every scanned module back to aligned
            assert torch.equal(out.get(key), aligned.get(key)), key
        else:
            assert torch.equal(out.get(key), task.get(key)), key


# --- Antidote ------------------------------------------------------------------------------------------


def test_prune_mask_by_hand() -> None:
    w = torch.tensor([[1.0, -4.0, 2.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=F64)
    gram = torch.diag(torch.tensor([4.0, 1.0, 1.0, 16.0, 0.25], dtype=F64))  # ‖X_j‖ = 2, 1, 1, 4, 0.5
    scores = wanda_scores(w, gram)
    assert scores.tolist() == [[2.0, 4.0, 2.0, 2.0, 1.5], [2.0, 1.0, 1.0, 4.0, 0.5]]
    # ratio 0.4: 5 − ⌊5·0.6⌋ = 2 pruned per row; row 0's tie at 2.0 goes to the later columns
    assert prune_mask(scores, 0.4).tolist() == [
        [False, True, False, True, False],
        [True, False, False, True, False],
    ]
    # ratio 0.1: 5 − ⌊4.5⌋ = 1 per row (the reference's count, never 0 for a positive ratio here)
    assert prune_mask(scores, 0.1).sum(1).tolist() == [1, 1]


def oracle_prune(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per row, the `cols − ⌊cols(1 − ratio)⌋` highest scores (brute force; ties to the later column)."""
    rows, cols = scores.shape
    n = cols - int(cols * (1 - ratio))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        ranked = sorted(range(cols), key=lambda j: (float(scores[i, j]), j), reverse=True)
        mask[i, ranked[:n]] = True
    return mask


def test_antidote_on_a_lora_matches_the_oracle(env: dict[str, Path], tmp_path: Path) -> None:
    res = defend(cfg_of(env, tmp_path / "out", "antidote", ratio=0.3))
    assert res.kind == "adapter" and res.modified == 4
    xs = layer_inputs(hf_model(env["aligned"], env["task"]), calibration(env))
    task, out = LoraAdapter.load(env["task"]), LoraAdapter.load(tmp_path / "out")
    for m in MODULES:
        x = xs[int(m.split(".")[2])]
        a, b = task.factors(m).A.to(F64), task.factors(m).B.to(F64)
        mask_a = oracle_prune(a.abs() * x.norm(dim=0), 0.3)
        mask_b = oracle_prune(b.abs() * (x @ a.T).norm(dim=0), 0.3)
        got = out.factors(m)
        assert torch.equal(got.A.to(F64) == 0, mask_a) and torch.equal(got.B.to(F64) == 0, mask_b)
        assert torch.equal(got.A.to(F64)[~mask_a], a[~mask_a]) and torch.equal(
            got.B.to(F64)[~mask_b], b[~mask_b]
        )
        assert got.scaling == task.factors(m).scaling


def test_antidote_on_a_full_finetune_zeroes_the_weights(env: dict[str, Path], tmp_path: Path) -> None:
    res = defend(cfg_of(env, tmp_path / "out", "antidote", full=True, ratio=0.2))
    assert res.kind == "model"
    xs = layer_inputs(hf_model(env["full"]), calibration(env))
    task = Checkpoint(env["full"])
    for m in MODULES:
        w = task.get(m + ".weight").to(F64)
        mask = oracle_prune(w.abs() * xs[int(m.split(".")[2])].norm(dim=0), 0.2)
        got = output_weight(tmp_path / "out", m)
        assert torch.equal(got == 0, mask) and torch.equal(got[~mask], w[~mask])


# --- reset ---------------------------------------------------------------------------------------------


def test_reset_masks_by_hand() -> None:
    g = [torch.tensor([[0.5, -2.0], [3.0, 0.1]], dtype=F64), torch.tensor([[-1.0, 1.0]], dtype=F64)]
    d = [torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64), torch.tensor([[-0.2, 0.3]], dtype=F64)]
    # eligible (sign g = sign Δ ≠ 0): 0.5, 3.0 | −1.0, 1.0 ; −2.0 has the wrong sign, 0.1 a zero Δ
    # fraction 0.5 of 6 entries: ⌈3⌉ = 3 → |g| 3.0, then the tie 1.0/1.0 ... in module then row order
    masks = reset_masks(g, d, 0.5)
    assert masks[0].tolist() == [[False, False], [True, False]] and masks[1].tolist() == [[True, True]]
    # 0.3 of 6: ⌈1.8⌉ = 2
    masks = reset_masks(g, d, 0.3)
    assert masks[0].tolist() == [[False, False], [True, False]] and masks[1].tolist() == [[True, False]]
    # more than the eligible: only the eligible
    masks = reset_masks(g, d, 1.0)
    assert masks[0].tolist() == [[True, False], [True, False]] and masks[1].tolist() == [[True, True]]
    assert direction_layer(2) == 1 and direction_layer(32) == 21 and direction_layer(1) == 1


def oracle_gradients(env: dict[str, Path], encoded: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """∂(−cos(h̄_ft, h̄_al))/∂W by autograd through all examples at once (PEFT's merge as W_ft)."""
    layer = 1  # ⌊2·2/3⌋
    aligned, merged = hf_model(env["aligned"]), hf_model(env["aligned"], env["task"])

    def mean_state(model: Any) -> torch.Tensor:
        hs = [
            model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0, s - 1]
            for ids, s in encoded
        ]
        return torch.stack(hs).mean(0)

    with torch.no_grad():
        h_al = mean_state(aligned)
    for p in merged.parameters():
        p.requires_grad_(False)
    for m in MODULES:
        merged.get_submodule(m).weight.requires_grad_(True)
    loss = -torch.nn.functional.cosine_similarity(mean_state(merged), h_al, dim=0)
    loss.backward()
    # the modules of layers ≥ L do not reach hidden_states[L]: no gradient (0)
    weights = {m: merged.get_submodule(m).weight for m in MODULES}
    return {
        m: torch.zeros(w.shape, dtype=F64) if w.grad is None else w.grad.to(F64) for m, w in weights.items()
    }


def test_reset_on_a_lora_matches_the_oracle(env: dict[str, Path], tmp_path: Path) -> None:
    encoded = calibration(env)
    grads = oracle_gradients(env, encoded)
    aligned, merged = hf_model(env["aligned"]), hf_model(env["aligned"], env["task"])
    w_al = {m: aligned.get_submodule(m).weight.detach().to(F64) for m in MODULES}
    w_ft = {m: merged.get_submodule(m).weight.detach().to(F64) for m in MODULES}
    # brute force: eligible entries ranked by |g|; k chosen at a clear gap so float noise cannot swap it
    eligible = [
        (float(grads[m][i, j].abs()), m, i, j)
        for m in MODULES
        for i, j in zip(
            *torch.nonzero(torch.sign(grads[m]) == torch.sign(w_ft[m] - w_al[m])).T.tolist(), strict=True
        )
        if w_ft[m][i, j] != w_al[m][i, j]
    ]
    eligible.sort(reverse=True)
    total = sum(w.numel() for w in w_al.values())
    gaps = [(eligible[k - 1][0] / eligible[k][0], k) for k in range(20, len(eligible) // 3)]
    _, k = max(gaps)
    defend(cfg_of(env, tmp_path / "out", "reset", reset_fraction=(k - 0.5) / total))
    chosen = {(m, i, j) for _, m, i, j in eligible[:k]}
    for m in MODULES:
        got = output_weight(tmp_path / "out", m)
        reset = {(m, i, j) for i, j in torch.nonzero(got == w_al[m]).tolist()}
        assert reset == {c for c in chosen if c[0] == m}
        keep = got != w_al[m]
        torch.testing.assert_close(got[keep], w_ft[m][keep], rtol=1e-6, atol=1e-6)
    report = json.loads((tmp_path / "out" / "safemerge_report.json").read_text())
    assert report["options"]["reset_entries"] == k and report["options"]["direction_layer"] == 1


def test_reset_on_a_full_finetune_restores_aligned_entries_only(env: dict[str, Path], tmp_path: Path) -> None:
    res = defend(cfg_of(env, tmp_path / "out", "reset", full=True, reset_fraction=0.05))
    assert res.kind == "model"
    aligned, task, out = Checkpoint(env["aligned"]), Checkpoint(env["full"]), Checkpoint(tmp_path / "out")
    n_reset = 0
    for key in out.keys():  # noqa: SIM118 (a Checkpoint is not iterable)
        got, al, ft = out.get(key), aligned.get(key), task.get(key)
        assert torch.all((got == ft) | (got == al)), key
        n_reset += int(((got == al) & (ft != al)).sum())
    # ⌈0.05 N⌉ with N the scanned modules' entries (every projection of the full fine-tune)
    n = sum(out.get(k).numel() for k in out.keys() if "proj" in k)  # noqa: SIM118
    assert n_reset == math.ceil(0.05 * n)


# --- options, bad inputs, determinism, registry -----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("safedelta", "scale", -0.1),
        ("safedelta", "scale", "inf"),
        ("antidote", "ratio", 0.0),
        ("antidote", "ratio", 1.0),
        ("reset", "reset_fraction", 0.0),
        ("reset", "reset_fraction", 1.5),
        ("reset", "calibration_samples", 0),
        ("antidote", "calibration_max_length", 4),
        ("safedelta", "ratio", 0.1),  # another defence's option
        ("reset", "typo", 1),
    ],
)
def test_bad_options_are_rejected(method: str, option: str, value: object) -> None:
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o", "calibration": "c.jsonl"}
    with pytest.raises(InputError, match=option):
        load_config(DefendConfig, None, {**base, "method": method, option: value})


@pytest.mark.parametrize("method", sorted(NEW))
def test_calibration_is_required_and_defaults_validate(method: str) -> None:
    base = {"aligned": "a", "unaligned": "u", "task_adapter": "t", "out": "o", "method": method}
    with pytest.raises(InputError, match=f"method {method} needs `calibration`"):
        load_config(DefendConfig, None, base)
    cfg = load_config(DefendConfig, None, {**base, "calibration": "c.jsonl"})
    knob = {"safedelta": ("scale", 0.1), "antidote": ("ratio", 0.1), "reset": ("reset_fraction", 0.01)}[
        method
    ]
    assert cfg.settings()[knob[0]] == knob[1] and cfg.settings()["calibration_samples"] == 64
    with pytest.raises(ValidationError):
        NEW[method].option_model.model_validate({"calibration": "c", "bogus": 1})  # type: ignore[union-attr]


def cli(env: dict[str, Path], out: Path, method: str, *extra: str) -> Any:
    args = ["defend", "--method", method, "-a", str(env["aligned"]), "-u", str(env["unaligned"])]
    args += ["-t", str(env["task"]), "-o", str(out), "--no-plot", "-q", *extra]
    return CliRunner().invoke(app, args)


def test_cli_runs_and_bad_inputs_exit_2(env: dict[str, Path], tmp_path: Path) -> None:
    res = cli(
        env, tmp_path / "ok", "antidote", "--option", f"calibration={env['cal']}", "--option", "ratio=0.2"
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"prompt": harmbench_prompts()[0], "response": "No."}) + "\n")
    cases = [
        ("safedelta", ["--option", "scale=-1", "--option", f"calibration={env['cal']}"], "scale"),
        ("reset", [], "needs --option calibration"),
        ("antidote", ["--option", f"calibration={tmp_path / 'missing.jsonl'}"], "not found"),
        ("reset", ["--option", f"calibration={leak}"], "HarmBench"),
        ("antidote", ["--option", "ratio"], "KEY=VALUE"),
    ]
    for i, (method, extra, message) in enumerate(cases):
        res = cli(env, tmp_path / f"bad{i}", method, *extra)
        assert res.exit_code == 2, (method, res.output)
        assert message.lower() in " ".join(res.output.split()).lower(), res.output
        assert not (tmp_path / f"bad{i}").exists()  # no partial output


def test_a_model_without_a_chat_template_is_refused(env: dict[str, Path], tmp_path: Path) -> None:
    cfg = cfg_of(env, tmp_path / "out", "safedelta")
    bare = tmp_path / "bare"
    edited_copy(env["aligned"], bare, lambda t: None)
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for extra in bare.glob("chat_template.*"):
        extra.unlink()
    cfg = cfg.model_copy(update={"inputs": cfg.inputs.model_copy(update={"aligned": str(bare)})})
    task = edited_copy(env["task"], tmp_path / "task", lambda t: None, "adapter_model.safetensors")
    cfg = cfg.model_copy(update={"inputs": cfg.inputs.model_copy(update={"task_adapter": str(task)})})
    with pytest.raises(InputError, match="no chat template"):
        defend(cfg)
    assert not (tmp_path / "out").exists()


def test_conv1d_layouts_are_refused(env: dict[str, Path], tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "gpt2", torch.float32)
    task = save_adapter(al, tmp_path / "task", seed=1, arch="gpt2", fan_in_fan_out=True)
    fields = {
        "aligned": str(al),
        "unaligned": str(un),
        "task_adapter": str(task),
        "calibration": str(env["cal"]),
    }
    for method in NEW:
        cfg = DefendConfig.model_validate(
            {**fields, "method": method, "out": str(tmp_path / method), "plot": False}
        )
        with pytest.raises(InputError, match=r"reads nn\.Linear layers; .* is fan_in_fan_out"):
            defend(cfg)
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("method", sorted(NEW))
def test_runs_are_deterministic(method: str, env: dict[str, Path], tmp_path: Path) -> None:
    knob = {"safedelta": {"scale": 500.0}, "antidote": {"ratio": 0.2}, "reset": {"reset_fraction": 0.02}}[
        method
    ]
    for name in ("a", "b"):
        defend(cfg_of(env, tmp_path / name, method, calibration_samples=3, seed=4, **knob))
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_defense_yaml_reruns_the_same_defence(env: dict[str, Path], tmp_path: Path) -> None:
    defend(cfg_of(env, tmp_path / "a", "antidote", ratio=0.25, calibration_samples=4, seed=2))
    cfg = load_config(DefendConfig, tmp_path / "a" / "defense.yaml", {"out": str(tmp_path / "b")})
    assert cfg.method == "antidote" and cfg.plugin_options["ratio"] == 0.25 and cfg.merge.seed == 2
    defend(cfg)
    f = "adapter_model.safetensors"
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_registered_by_safemerge_itself() -> None:
    """The installed safemerge registers the three (skipped until the package is reinstalled)."""
    ours = {
        ep.name: ep.value
        for ep in entry_points(group="safemerge.defenses")
        if ep.dist and ep.dist.name == "safemerge"
    }
    if not set(NEW) <= set(ours):
        pytest.skip("the installed safemerge metadata predates these entry points (reinstall it)")
    for name, defense in NEW.items():
        assert ours[name] == f"safemerge.defenses.{name}:DEFENSE"
        assert registry.get_defense(name) is defense


def test_a_fraction_sweep_computes_the_gradients_once(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset's gradients depend on the models and the calibration data, not on `reset_fraction`: a sweep
    reuses them, and the reused run writes what a fresh run writes; another task input recomputes."""
    from safemerge.defenses import reset

    calls = []
    real = reset.direction_gradients
    monkeypatch.setattr(reset, "direction_gradients", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(reset, "_LAST_GRADIENTS", None)
    defend(cfg_of(env, tmp_path / "a", "reset", reset_fraction=0.02))
    defend(cfg_of(env, tmp_path / "b", "reset", reset_fraction=0.05))
    assert len(calls) == 1
    monkeypatch.setattr(reset, "_LAST_GRADIENTS", None)
    defend(cfg_of(env, tmp_path / "fresh", "reset", reset_fraction=0.05))
    assert len(calls) == 2
    for m in MODULES:
        assert torch.equal(output_weight(tmp_path / "b", m), output_weight(tmp_path / "fresh", m))
    # another task LoRA on the same modules (same keys, other ΔW): recomputed
    other = save_adapter(env["aligned"], tmp_path / "task2", seed=11, r=4, alpha=8)
    defend(cfg_of({**env, "task": other}, tmp_path / "other", "reset", reset_fraction=0.05))
    assert len(calls) == 3
