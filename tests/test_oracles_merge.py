"""Merge operators against independent oracles (docs/method.md §4.2–4.3).

Bugs this file catches (each was planted by hand and seen to fail here, see docs/testing.md):

- TIES that ignores its weights (weights of 1, or the weights left out of the disjoint mean);
- a different TIES sign election: the sign of the *weighted* sum, or a majority count of signs
  ("frequency") instead of the sign of the unweighted trimmed mass (PEFT's `"total"` rule);
- DARE-TIES silently running as DARE-linear (no sign election, no disjoint mean);
- peft-linear dropping the sign of a negative weight (√|w s| on both factors).

The oracles are written here and share no code with safemerge: a hand-derived TIES example, a dense
float64 TIES / DARE written from the method's text and PEFT's `merge_utils` rule (read, not called), DARE
masks re-derived from the seeding rule of method.md §4.3 (sha256 of "<seed>:<module>", computed here with
hashlib), the peft-linear formula of method.md §4.2, and PEFT's own `add_weighted_adapter("linear")`.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from safemerge.engine import MergeConfig, merge, merge_modules
from safemerge.engine.lora import LoraFactors
from safemerge.engine.merging import merge_dense

F64 = torch.float64
GOLDEN_LLAMA = Path(__file__).resolve().parent / "fixtures" / "golden" / "inputs" / "llama"


# --- oracles -----------------------------------------------------------------------------------------
def trim_oracle(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density · n) largest-magnitude entries of x (PEFT's `magnitude_based_pruning` rule)."""
    k = int(density * x.numel())
    flat = x.reshape(-1).to(F64)
    order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))
    keep = torch.zeros_like(flat)
    for i in order[:k]:
        keep[i] = 1.0
    return (flat * keep).reshape(x.shape)


def elect_and_disjoint_mean(trimmed: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES after trimming/dropping: elect per entry the sign of the UNWEIGHTED sum (0 counts as +),
    then average the weighted entries whose sign agrees with it (entries equal to 0 never agree)."""
    total = torch.stack([t.to(F64) for t in trimmed]).sum(dim=0)
    elected = torch.where(total >= 0, 1.0, -1.0).to(F64)
    num = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for t, w in zip(trimmed, weights, strict=True):
        agree = (torch.sign(t.to(F64)) == elected).to(F64)
        num += w * t.to(F64) * agree
        count += agree
    return num / torch.clamp(count, min=1.0)


def ties_oracle(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    return elect_and_disjoint_mean([trim_oracle(d, density) for d in deltas], weights)


def module_seed_oracle(seed: int, module: str) -> int:
    """method.md §4.3: the first 8 bytes (little-endian, 63 bits) of sha256("<seed>:<module>")."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (1 << 63)


def dare_masks_oracle(
    deltas: list[torch.Tensor], density: float, seed: int, module: str
) -> list[torch.Tensor]:
    """The DARE keep-masks of one module: torch seeded with the module seed, then one Bernoulli(density)
    draw per update, task first (PEFT's `random_pruning` under one `torch.manual_seed`, as merging.py's
    `dare_in_order` documents)."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(module_seed_oracle(seed, module))
        return [torch.bernoulli(torch.full_like(d, density)) for d in deltas]
    finally:
        torch.set_rng_state(state)


def delta64(f: LoraFactors) -> torch.Tensor:
    return f.scaling * (f.B.to(F64) @ f.A.to(F64))


def random_factors(d_out: int, d_in: int, r: int, scaling: float, seed: int) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), scaling)


# --- TIES ----------------------------------------------------------------------------------------------
def test_ties_hand_derived_example_with_unequal_weights() -> None:
    # density 0.5 of 6 entries keeps 3 per tensor:
    #   t1 = [3, -2, 0.5, 0.25, 2.5, 0.1] -> [3, -2, 0, 0, 2.5, 0]
    #   t2 = [-4, -1, 2, 0.5, 3, 0.2]      -> [-4, 0, 2, 0, 3, 0]
    # unweighted sum [-1, -2, 2, 0, 5.5, 0] elects [-, -, +, +, +, +] (0 elects +).
    # weighted (0.8, 0.2): t1 -> [2.4, -1.6, 0, 0, 2.0, 0], t2 -> [-0.8, 0, 0.4, 0, 0.6, 0]
    # disjoint mean of the agreeing entries: [-0.8, -1.6, 0.4, 0, (2.0 + 0.6) / 2, 0]
    # (the weighted sum [1.6, -1.6, 0.4, 0, 2.6, 0] or a count of signs would elect + at entry 0 -> 2.4;
    # ignoring the weights gives -4 there.)
    t1 = torch.tensor([[3.0, -2.0, 0.5, 0.25, 2.5, 0.1]], dtype=F64)
    t2 = torch.tensor([[-4.0, -1.0, 2.0, 0.5, 3.0, 0.2]], dtype=F64)
    want = torch.tensor([[-0.8, -1.6, 0.4, 0.0, 1.3, 0.0]], dtype=F64)
    got = merge_dense([t1, t2], [0.8, 0.2], "ties", 0.5, seed=0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(ties_oracle([t1, t2], [0.8, 0.2], 0.5), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("weights", "density", "seed"),
    [((0.8, 0.2), 0.5, 0), ((0.3, 0.9), 0.3, 1), ((1.5, -0.4), 0.7, 2), ((0.9, 0.1), 0.2, 3)],
)
def test_ties_matches_dense_float64_oracle(weights: tuple[float, float], density: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # the safety update is larger where it disagrees: the unweighted and weighted elections differ
    d1 = torch.randn(12, 10, generator=g, dtype=F64)
    d2 = 2.5 * torch.randn(12, 10, generator=g, dtype=F64)
    want = ties_oracle([d1, d2], list(weights), density)
    got = merge_dense([d1, d2], list(weights), "ties", density, seed=0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the case discriminates: electing on the weighted sum would change some entries
    weighted_election = elect_and_disjoint_mean(
        [w * trim_oracle(d, density) for d, w in zip((d1, d2), weights, strict=True)], [1.0, 1.0]
    )
    assert not torch.allclose(weighted_election, want)


def test_merge_modules_ties_matches_oracle_on_selected_modules_only() -> None:
    task = {
        "layers.0.q": random_factors(14, 10, 3, 2.0, 0),
        "layers.0.v": random_factors(8, 10, 3, 2.0, 1),
        "layers.1.q": random_factors(14, 10, 3, 2.0, 2),
    }
    safety = {
        "layers.0.q": random_factors(14, 10, 2, 0.5, 10),
        "layers.0.v": random_factors(8, 10, 2, 0.5, 11),
        "layers.1.q": random_factors(14, 10, 2, 0.5, 12),
    }
    selected = {"layers.0.q", "layers.0.v"}
    # rank 10 = min(d_out, d_in) of every module: the SVD re-factorisation is exact, so the stored
    # product must be the TIES result itself
    out = merge_modules(task, safety, selected, weights=(0.7, 0.3), method="ties", density=0.4, rank=10)
    assert out.merged == selected and out.rank == 10
    for name, (a, b) in out.factors.items():
        got = out.scaling * (b.to(F64) @ a.to(F64))
        if name in selected:
            want = ties_oracle([delta64(task[name]), delta64(safety[name])], [0.7, 0.3], 0.4)
            assert out.svd_rel_errors[name] < 1e-10
        else:
            want = delta64(task[name])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- DARE -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_methods_match_seeded_oracle(method: str) -> None:
    name, seed, density, weights = "model.layers.3.self_attn.q_proj", 11, 0.6, (0.8, 0.2)
    tf, sf = random_factors(12, 9, 3, 2.0, 4), random_factors(12, 9, 3, 0.5, 5)
    out = merge_modules({name: tf}, {name: sf}, {name}, weights=weights, method=method,
                        density=density, seed=seed, rank=9)  # fmt: skip
    a, b = out.factors[name]
    got = out.scaling * (b.to(F64) @ a.to(F64))
    # the engine draws masks over the float32 updates (LoraFactors.delta), so the oracle does too
    deltas32 = [tf.delta(torch.float32), sf.delta(torch.float32)]
    masks = dare_masks_oracle(deltas32, density, seed, name)
    pruned = [delta64(f) * m.to(F64) / density for f, m in zip((tf, sf), masks, strict=True)]
    linear = weights[0] * pruned[0] + weights[1] * pruned[1]
    ties_like = elect_and_disjoint_mean(pruned, list(weights))
    assert (ties_like - linear).abs().max() > 0.1  # the case tells the two operators apart
    want = ties_like if method == "dare_ties" else linear
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # about `density` of the entries survive in each mask (a sanity check of the oracle itself)
    assert all(0.35 < float(m.mean()) < 0.85 for m in masks)


# --- peft-linear with negative weights ----------------------------------------------------------------
@pytest.mark.parametrize("weights", [(0.8, -0.2), (-0.5, 0.3), (-0.6, -0.4)])
def test_peft_linear_negative_weight_matches_the_documented_formula(weights: tuple[float, float]) -> None:
    name = "layers.0.q"
    tf, sf = random_factors(7, 6, 3, 2.0, 20), random_factors(7, 6, 3, 0.5, 21)
    out = merge_modules({name: tf}, {name: sf}, {name}, weights=weights, mode="peft-linear")
    a, b = out.factors[name]
    got = out.scaling * (b.to(F64) @ a.to(F64))
    # method.md §4.2: c = w s; A' = sign(c_f)√|c_f| A_f + sign(c_s)√|c_s| A_s; B' = √|c_f| B_f + √|c_s| B_s
    cf, cs = weights[0] * tf.scaling, weights[1] * sf.scaling
    af, bf, as_, bs = (x.to(F64) for x in (tf.A, tf.B, sf.A, sf.B))
    root = math.sqrt(abs(cf * cs))
    want = (
        cf * bf @ af + cs * bs @ as_ + math.copysign(root, cs) * bf @ as_ + math.copysign(root, cf) * bs @ af
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def peft_linear_deltas(base: Path, task: Path, safety: Path, weights: list[float]) -> dict[str, torch.Tensor]:
    """ΔW per module of PEFT's own add_weighted_adapter(combination_type="linear") (nn.Linear layout)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, task, adapter_name="task")
    peft_model.load_adapter(safety, adapter_name="safety")
    peft_model.add_weighted_adapter(["task", "safety"], weights, "combined", combination_type="linear")
    prefix = "base_model.model."
    return {
        n[len(prefix) :]: m.get_delta_weight("combined").detach().to(F64)
        for n, m in peft_model.named_modules()
        if isinstance(m, LoraLayer)
    }


def test_peft_linear_negative_weight_matches_peft_add_weighted_adapter(tmp_path: Path) -> None:
    for part in ("aligned", "unaligned", "task", "safety"):
        shutil.copytree(GOLDEN_LLAMA / part, tmp_path / part)
    out = tmp_path / "out"
    cfg = MergeConfig.from_flat(
        aligned=str(tmp_path / "aligned"), unaligned=str(tmp_path / "unaligned"),
        task_adapter=str(tmp_path / "task"), safety_adapter=str(tmp_path / "safety"), out=str(out),
        threshold=1.0, weights=(0.8, -0.2), allow_any_weights=True, mode="peft-linear", plot=False,
    )  # fmt: skip
    merge(cfg)
    ref = peft_linear_deltas(tmp_path / "aligned", tmp_path / "task", tmp_path / "safety", [0.8, -0.2])
    ours = load_file(out / "adapter_model.safetensors")
    conf = json.loads((out / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    assert len(ref) == 4
    for module, want in ref.items():
        a = ours[f"base_model.model.{module}.lora_A.weight"].to(F64)
        b = ours[f"base_model.model.{module}.lora_B.weight"].to(F64)
        torch.testing.assert_close(scale * (b @ a), want, rtol=1e-5, atol=1e-6)
