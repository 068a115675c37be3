"""A task adapter's modules_to_save (e.g. a trained LM head) in the full models safemerge writes: the
full model is the task model, whose copy of those tensors is the adapter's (as PEFT's merge makes it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from builders import save_adapter, save_pair
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from safemerge.common.errors import InputError
from safemerge.defenses import DefendConfig, defend
from safemerge.engine.config import MergeConfig
from safemerge.engine.pipeline import merge

HEAD = "lm_head.weight"


def _shifted_head_adapter(al: Path, out: Path) -> Path:
    """An adapter with modules_to_save = lm_head whose saved head is the aligned one + 1."""
    task = save_adapter(al, out, seed=1, modules_to_save=["lm_head"])
    f = task / "adapter_model.safetensors"
    tensors = load_file(f)
    (key,) = [k for k in tensors if "lm_head" in k]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(f))
    return task


def _full_head(model_dir: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).lm_head.weight.detach()


def _peft_head(al: Path, task: Path) -> torch.Tensor:
    """The task model's LM head by PEFT's own merge (the independent oracle)."""
    base = AutoModelForCausalLM.from_pretrained(al, dtype=torch.float32)
    return PeftModel.from_pretrained(base, task).merge_and_unload().lm_head.weight.detach()


def test_merge_into_base_takes_the_adapters_head(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "llama", torch.float32)
    task = _shifted_head_adapter(al, tmp_path / "task")
    safety = save_adapter(al, tmp_path / "safety", seed=2)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader warns that extra tensors are carried through
        merge(
            MergeConfig.from_flat(
                aligned=str(al), unaligned=str(un), task_adapter=str(task), safety_adapter=str(safety),
                out=str(out), merge_into_base=True, plot=False,
            )
        )  # fmt: skip
    head = _full_head(out / "full_model")
    assert torch.equal(head, _peft_head(al, task))
    assert not torch.allclose(head, _full_head(al))  # the bug: the aligned model's head


def test_resta_starts_from_the_task_models_head(tmp_path: Path) -> None:
    al, un = save_pair(tmp_path, "llama", torch.float32)
    task = _shifted_head_adapter(al, tmp_path / "task")
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defend(
            DefendConfig.from_flat(
                method="resta", aligned=str(al), unaligned=str(un), task_adapter=str(task), out=str(out),
                beta=0.5, plot=False,
            )
        )  # fmt: skip
    head, task_head = _full_head(out), _peft_head(al, task)
    v = load_file(al / "model.safetensors")[HEAD] - load_file(un / "model.safetensors")[HEAD]
    # RESTA's scope decides whether the head gets β·V too; either way it starts from the task's head
    assert torch.allclose(head, task_head, atol=1e-6) or torch.allclose(head, task_head + 0.5 * v, atol=1e-6)
    assert not torch.allclose(head, _full_head(al), atol=0.1)


def test_a_saved_tensor_the_base_lacks_is_an_input_error(tmp_path: Path) -> None:
    from safemerge.engine.lora import LoraAdapter

    al, _ = save_pair(tmp_path, "llama", torch.float32)
    task = _shifted_head_adapter(al, tmp_path / "task")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = LoraAdapter.load(str(task))
    with pytest.raises(InputError, match="lm_head"):
        adapter.extra_for_base(["model.embed_tokens.weight"])


@pytest.mark.parametrize("method", ["resta", "merge-into-base"])
def test_a_float32_saved_head_keeps_the_aligned_models_dtype(tmp_path: Path, method: str) -> None:
    """Every tensor of the full model keeps the aligned model's dtype, as PEFT's merge into a bfloat16 model
    does: an adapter whose saved head is float32 gives a bfloat16 head with its values rounded once."""
    al, un = save_pair(tmp_path, "llama", torch.bfloat16)
    task = save_adapter(al, tmp_path / "task", seed=1, modules_to_save=["lm_head"])
    f = task / "adapter_model.safetensors"
    tensors = load_file(f)
    (key,) = [k for k in tensors if "lm_head" in k]
    head32 = tensors[key].to(torch.float32) + 0.001  # not representable in bfloat16 everywhere
    tensors[key] = head32
    save_file(tensors, str(f))
    out = tmp_path / "out"
    common = {"aligned": str(al), "unaligned": str(un), "task_adapter": str(task), "plot": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader warns that extra tensors are carried through
        if method == "resta":  # targeted scope: the head is not a LoRA target, so it is copied as is
            defend(DefendConfig.from_flat(method="resta", out=str(out), beta=0.5, scope="targeted", **common))
            model = out
        else:
            safety = save_adapter(al, tmp_path / "safety", seed=2)
            merge(
                MergeConfig.from_flat(
                    out=str(out), safety_adapter=str(safety), merge_into_base=True, **common
                )
            )
            model = out / "full_model"
    got = load_file(model / "model.safetensors")[HEAD]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, head32.to(torch.bfloat16))
    assert not torch.equal(got.float(), head32)  # premise: the float32 head is not exact in bfloat16
