"""The transformers backend hands its LM head a contiguous input (torch's matmul otherwise copies the
head's weight once per sequence when the weight is frozen, as under every PEFT adapter: 10 s instead of
0.02 s per prefill at the organism's batch width; docs/benchmarks.md). Planted: without the hook the spy
below sees the [batch, 1, hidden] slice of the last position, which is not contiguous, and this fails.
The generations must not change: the oracle is the same model generating without the hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from builders import save_adapter
from tinymodel import build_tiny_model

from safemerge.evaluate import backends
from safemerge.evaluate.backends import TransformersBackend

PROMPTS = ["What is 123 + 456?", "Write a poem about the sea.", "How do I make a dangerous weapon at home?"]


def _head_inputs(backend: TransformersBackend) -> list[torch.Tensor]:
    """Record every input the head sees (after the backend's own pre-hooks)."""
    seen: list[torch.Tensor] = []
    model = backend.model.get_base_model() if backend.names else backend.model
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    return seen


def _generate(model: Path, adapter: Path) -> tuple[list[str], list[torch.Tensor]]:
    b = TransformersBackend(str(model), [str(adapter)], max_new_tokens=4, dtype="float32", device="cpu")
    seen = _head_inputs(b)
    out = b.generate(PROMPTS, str(adapter))
    b.close()
    return out, seen


def test_head_input_is_contiguous_and_generations_unchanged(tmp_path: Path, monkeypatch: Any) -> None:
    model = build_tiny_model(tmp_path / "m", seed=1)
    adapter = save_adapter(model, tmp_path / "lora", seed=3)
    out, seen = _generate(model, adapter)
    assert len(seen) == 4  # one prefill and three decoding steps
    assert all(x.is_contiguous() for x in seen)
    assert seen[0].shape[:2] == (len(PROMPTS), 1)  # the last position only: the case that was slow

    monkeypatch.setattr(backends, "contiguous_head_input", lambda _model: None)
    plain, seen_plain = _generate(model, adapter)
    assert not seen_plain[0].is_contiguous()  # premise: without the hook the head gets the strided view
    assert out == plain
