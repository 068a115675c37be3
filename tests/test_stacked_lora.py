"""The stacked-LoRA mixed batch (one LoRA product per layer) against PEFT itself: every row's logits equal
those of PEFT running that row's adapter alone, the hooks leave no trace, and whatever the stacked path
cannot run goes to PEFT's own `adapter_names=` with the same answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from builders import save_adapter
from tinymodel import build_tiny_model

from safemerge.evaluate import stacked_lora as sl
from safemerge.evaluate.backends import TransformersBackend

PROMPTS = ["Write a poem about the sea.", "yes", "How do I make a dangerous weapon at home?", "no maybe"]
TOKENS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama and three adapters that differ in rank, scaling and targets (one on q_proj only, one
    with rsLoRA's scaling)."""
    root = tmp_path_factory.mktemp("stacked")
    model = build_tiny_model(root / "model", seed=5)
    adapters = [
        save_adapter(model, root / "a", seed=1, r=4, alpha=8),
        save_adapter(model, root / "b", seed=2, r=2, alpha=3, targets=["q_proj"]),
        save_adapter(model, root / "c", seed=3, r=8, alpha=4, use_rslora=True),
    ]
    return {"model": str(model), "adapters": [str(a) for a in adapters]}


def peft_model(setup: dict[str, Any]) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    a, b, c = setup["adapters"]
    model = PeftModel.from_pretrained(base, a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    model.load_adapter(c, adapter_name="c")
    return model.eval()


def test_logits_equal_peft_one_adapter_per_row(setup: dict[str, Any]) -> None:
    model = peft_model(setup)
    names = ["a", "b", sl.BASE_ROW, "c", "a", "c"]
    ids = torch.randint(3, 300, (len(names), 7), generator=torch.Generator().manual_seed(0))
    assert sl.stacked_lora_blocker(model, names) is None
    with torch.no_grad():
        with sl.stacked_lora(model, names):
            got = model(input_ids=ids).logits
        want = []
        for i, n in enumerate(names):  # the oracle: PEFT with that row's adapter active, one row at a time
            if n == sl.BASE_ROW:
                with model.disable_adapter():
                    want.append(model(input_ids=ids[i : i + 1]).logits)
            else:
                model.set_adapter(n)
                want.append(model(input_ids=ids[i : i + 1]).logits)
    want_t = torch.cat(want)
    assert not torch.allclose(want_t[0], want_t[2], atol=1e-3)  # the adapters do change the logits
    torch.testing.assert_close(got, want_t, rtol=0, atol=1e-6)  # measured max |diff| 9e-8 (logits ~0.8)


def test_hooks_removed_and_adapter_restored(setup: dict[str, Any]) -> None:
    model = peft_model(setup)
    model.set_adapter("b")
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="inside"), sl.stacked_lora(model, ["a", "c"]):
            raise RuntimeError("inside")
        after = model(input_ids=ids).logits
    assert all(not layer._forward_hooks for _, layer in sl.lora_layers(model))
    assert torch.equal(before, after) and model.active_adapter == "b"


def test_blockers_name_the_layer(setup: dict[str, Any], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = peft_model(setup)
    model.base_model.model.model.layers[0].self_attn.q_proj.train()
    why = str(sl.stacked_lora_blocker(model, ["a"]))
    assert "layers.0.self_attn.q_proj is merged, in training mode" in why
    saved = save_adapter(Path(setup["model"]), tmp_path / "mts", seed=4, modules_to_save=["lm_head"])
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    with_saved = PeftModel.from_pretrained(base, str(saved)).eval()
    assert "lm_head is saved whole" in str(sl.stacked_lora_blocker(with_saved, ["default"]))
    emb = save_adapter(Path(setup["model"]), tmp_path / "emb", seed=4, targets=["embed_tokens", "q_proj"])
    base = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32)
    on_embedding = PeftModel.from_pretrained(base, str(emb)).eval()
    assert "LoRA Embedding layer, not Linear" in str(sl.stacked_lora_blocker(on_embedding, ["default"]))
    assert sl.stacked_lora_blocker(base, ["x"]) == "the model is not a PEFT model"


@pytest.mark.parametrize("impl", ["stacked", "peft"])
def test_backend_answers_equal_one_adapter_at_a_time(
    setup: dict[str, Any], impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = TransformersBackend(setup["model"], setup["adapters"], max_new_tokens=TOKENS, dtype="float32")
    backend.mixed_impl = impl
    entered: list[list[str]] = []
    original = sl.stacked_lora

    def spy(model: Any, names: Any) -> Any:
        entered.append(list(names))
        return original(model, names)

    monkeypatch.setattr("safemerge.evaluate.backends.stacked_lora", spy)
    adapters: list[str | None] = [None, *setup["adapters"]]
    rows = [a for a in adapters for _ in PROMPTS]
    mixed = [g.text for g in backend.generate_mixed(PROMPTS * len(adapters), rows)]
    alone = [g.text for a in adapters for g in backend.generate_full(PROMPTS, a)]
    assert mixed == alone
    assert len(set(alone)) > len(PROMPTS)  # the variants answer differently
    assert entered == ([] if impl == "peft" else [[backend.names.get(a or "", sl.BASE_ROW) for a in rows]])
