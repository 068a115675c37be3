"""`safemerge.evaluate_model`: `safemerge eval` on a model held in memory — a transformers causal LM, or a
`peft.PeftModel` whose adapters are named — without saving anything to disk (docs/python-api.md).

The variants are the PEFT adapters by name, plus `"base"` (the same model with its adapters disabled);
generation, judging, scoring, the reference comparison and the table are those of `evaluate`
(runner.generate_all, api.score, compare.add_reference_comparison, report.print_table). Choices of the
in-memory path:

- **No generation cache on disk.** A model in memory has no files whose content would key it, and it
  may have been changed since it was loaded (a merge, a training step); hashing every weight of an 8B
  model on each call costs about as much as the generations it would save on small runs. Generations
  are kept for the call only (variants naming the same adapter share them). Judge outputs are cached as
  `evaluate` caches them: they are keyed by the judge and the very texts it judged.
- **The model is left as it was found.** It is evaluated in eval mode (no dropout); afterwards each
  module's train/eval mode, every parameter's `requires_grad` (PEFT's `set_adapter` changes it), the
  active adapter(s) and the device (a model judge's engine moves it to the CPU while it judges) are
  restored, also when the evaluation fails. The tokenizer is copied (generation pads on the left).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from safemerge.common.config_io import validation_message
from safemerge.common.errors import InputError
from safemerge.common.outdir import atomic_output_dir, check_output_dir
from safemerge.common.progress import progress_bars
from safemerge.evaluate.api import judges_label, load_benchmarks, score, write_outputs
from safemerge.evaluate.backends import TransformersBackend, contiguous_head_input
from safemerge.evaluate.cache import default_cache_dir
from safemerge.evaluate.compare import add_reference_comparison
from safemerge.evaluate.config import DEFAULT_GUARD, EvalConfig
from safemerge.evaluate.judge_plugins import preflight_judges
from safemerge.evaluate.report import print_table
from safemerge.evaluate.runner import Variant, generate_all

__all__ = ["BASE", "LoadedModelBackend", "evaluate_model"]

BASE = "base"  # the variant of the model with its adapters disabled
IN_MEMORY = "<in-memory model>"  # the model's name where the runner asks for one (never a path)


class LoadedModelBackend(TransformersBackend):
    """The transformers backend around a model the caller loaded: nothing is loaded, and an adapter is
    named by its PEFT name (None: the model with its adapters disabled). Mixed-adapter batches read
    each adapter's settings from the model's `peft_config` instead of an adapter_config.json."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, peft: bool) -> None:
        # no super().__init__: it loads a model from a path; these are the attributes it sets
        self.device = str(next(model.parameters()).device)
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.max_new_tokens = max_new_tokens
        self.chat = True
        self.tokenizer = copy.deepcopy(tokenizer)  # the caller's keeps its padding side and pad token
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.names = {n: n for n in model.peft_config} if peft else {}
        self._released = False
        self.model = model

    def add_adapter(self, adapter: str) -> None:
        raise InputError(f"adapter {adapter}: add it to the model (PEFT's load_adapter), then evaluate it")

    def mixed_batch_blocker(self, adapters: Sequence[str | None]) -> str | None:
        """`TransformersBackend.mixed_batch_blocker`, each adapter's type and DoRA read from the model."""
        for a in dict.fromkeys(x for x in adapters if x is not None):
            if a not in self.names:
                return f"the model has no adapter {a}"
            cfg = self.model.peft_config[a]
            kind = str(getattr(cfg, "peft_type", "LORA")).upper().removeprefix("PEFTTYPE.")
            if kind != "LORA":
                return f"adapter {a} is a {kind} adapter (PEFT mixes LoRA adapters only)"
            if getattr(cfg, "use_dora", False):
                return f"adapter {a} uses DoRA (PEFT's mixed-adapter batches do not support DoRA)"
        if any(getattr(m, "merged", False) for m in self.model.modules() if hasattr(m, "merged_adapters")):
            return "an adapter is merged into the base weights (PEFT mixes unmerged adapters only)"
        return self._saved_module_blocker([a for a in dict.fromkeys(adapters) if a is not None])

    def release(self) -> None:
        """Move the model to the CPU while a model judge runs (a model placed by accelerate's
        `device_map` stays where it is); `restore` brings it back."""
        if getattr(self.model, "hf_device_map", None):
            return
        super().release()

    def restore(self) -> None:
        """The model back on its device, if `release` moved it."""
        if self._released:
            self.model.to(self.device)
            self._released = False

    def close(self) -> None:
        self.model = None  # the caller's model is the caller's: only this reference is dropped


def _is_peft(model: Any) -> bool:
    from peft import PeftModel  # lazy: peft adds ~2.4 s to an import

    return isinstance(model, PeftModel)


def _adapter_of(name: str, have: Sequence[str]) -> str | None:
    """The PEFT adapter `name` names (None: `"base"`, the model without adapters); an unknown name is an
    InputError with the model's adapters and the closest one."""
    if name in have:
        return name
    if name == BASE:
        return None
    near = difflib.get_close_matches(name, have, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise InputError(
        f"the model has no adapter {name!r}{hint}; its adapters: {', '.join(have)} ({BASE!r}: the model "
        "with its adapters disabled)"
    )


def model_variants(
    model: Any, adapters: Sequence[str] | Mapping[str, str] | None, include_base: bool
) -> list[Variant]:
    """The variants to evaluate, keyed as metrics.json keys them: `"base"` first (unless `include_base`
    is off, or `adapters` places it), then each adapter by its name, or by its key where `adapters` is a
    mapping (name the variant: PEFT adapter name). None: every adapter of a PeftModel; a model that is no
    PeftModel is the one variant `"base"`."""
    if isinstance(adapters, str):
        raise InputError(f"adapters={adapters!r}: give a list of adapter names, e.g. [{adapters!r}]")
    peft = _is_peft(model)
    if not peft and adapters:
        given = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
        raise InputError(
            f"adapters {given} name PEFT adapters, but the model is a {type(model).__name__}, not a "
            "peft.PeftModel: load them onto it (PeftModel.from_pretrained, load_adapter), or give no "
            f"adapters to evaluate the model itself (the variant {BASE!r})"
        )
    have = list(model.peft_config) if peft else []
    pairs = (
        list(adapters.items())
        if isinstance(adapters, Mapping)
        else [(a, a) for a in (have if adapters is None else adapters)]
    )
    listed = [Variant(key, _adapter_of(name, have)) for key, name in pairs]
    base = [Variant(BASE, None)] if include_base and all(v.adapter is not None for v in listed) else []
    variants = base + listed
    keys = [v.key for v in variants]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise InputError(
            f"two variants are named {', '.join(twice)}: name them with a mapping "
            f"(adapters={{'NAME': 'ADAPTER', ...}}), none {BASE!r} while the base model is evaluated"
        )
    if not variants:
        raise InputError("nothing to evaluate: no adapters given and include_base=False")
    return variants


def check_model(model: Any, tokenizer: Any, peft: bool) -> None:
    """A causal LM that can generate, on loaded weights, with no adapter merged into them (the base
    variant and the others need the weights as loaded), and a tokenizer with a chat template."""
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise InputError(
            f"model is a {type(model).__name__}: give a transformers causal LM (AutoModelForCausalLM) or "
            "a peft.PeftModel around one"
        )
    if tokenizer is None or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise InputError("give the model's tokenizer (AutoTokenizer.from_pretrained(...)) as tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            "the tokenizer has no chat template: evaluation renders every prompt as a chat "
            "(tokenizer.apply_chat_template); load the tokenizer of the instruct model, or set "
            "tokenizer.chat_template"
        )
    if not peft and getattr(model, "_hf_peft_config_loaded", False):
        raise InputError(
            "the model holds adapters loaded through transformers (model.load_adapter), which cannot be "
            "told apart from its base here: load them with peft.PeftModel.from_pretrained(base, ADAPTER, "
            "adapter_name=NAME) and evaluate that"
        )
    if any(p.device.type == "meta" for p in model.parameters()):
        raise InputError(
            "the model has weights on the meta device (not loaded, or offloaded by device_map): load them "
            "onto a CPU or GPU"
        )
    if peft:
        merged = {a for m in model.modules() for a in getattr(m, "merged_adapters", None) or []}
        if merged:
            raise InputError(
                f"adapter(s) {', '.join(sorted(merged))} are merged into the base weights "
                "(model.merge_adapter()): call model.unmerge_adapter() first, so that every variant "
                "runs on the weights as loaded"
            )


@contextlib.contextmanager
def kept_state(model: Any, peft: bool) -> Iterator[None]:
    """Run with `model` in eval mode; afterwards, also on an error, each module's train/eval mode,
    every parameter's `requires_grad` and the active adapter(s) are as they were."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    active = list(model.active_adapters) if peft else None
    model.eval()
    try:
        yield
    finally:
        if active is not None:
            if len(active) == 1:
                model.set_adapter(active[0])
            else:
                model.base_model.set_adapter(list(active))
        for p, g in grads:
            p.requires_grad_(g)
        for m, training in modes:
            m.training = training


def evaluate_model(
    model: Any,
    tokenizer: Any,
    adapters: Sequence[str] | Mapping[str, str] | None = None,
    *,
    benchmarks: Sequence[str],
    include_base: bool = True,
    reference: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    judge: str | list[str] = "keyword",
    judge_model: str = DEFAULT_GUARD,
    cache_dir: str | Path | None = None,
    no_cache: bool = False,
    warn_truncated: bool = True,
    out: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a model held in memory on `benchmarks`, as `safemerge eval` evaluates files; returns the
    metrics (metrics.json's content: per variant and benchmark the rate with its counts and 95% interval,
    and `vs_reference` with a `reference`) and prints the summary table (not with `quiet`, which also
    hides progress bars).

    `model` is a `peft.PeftModel` (variants: `"base"` with its adapters disabled, then `adapters` by PEFT
    name, default all; a mapping names them, `{"task": "default"}`) or a transformers causal LM (the one
    variant `"base"`). `tokenizer` renders the prompts with its chat template. `out` (optional) receives
    generations.jsonl, metrics.json and summary.md, as `eval --out` does. The other options are
    `EvalConfig`'s; generation uses the transformers backend on the model's device and dtype, greedy.
    Generations are not cached on disk (module docstring); the model is left as it was found.
    """
    peft = _is_peft(model)
    check_model(model, tokenizer, peft)
    variants = model_variants(model, adapters, include_base)
    keys = [v.key for v in variants]
    if reference is not None and reference not in keys:
        near = difflib.get_close_matches(reference, keys, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InputError(
            f"reference {reference!r} is none of the evaluated variants{hint}: {', '.join(keys)}"
        )
    if batch_size <= 0 or max_new_tokens <= 0 or (limit is not None and limit <= 0):
        raise InputError("batch_size, max_new_tokens and limit must be positive")
    cfg = eval_config(benchmarks, out, judge, judge_model, limit, max_new_tokens, batch_size, warn_truncated)
    loaded = load_benchmarks(cfg.benchmarks, limit)
    if any(b.kind == "harm" for b in loaded):
        preflight_judges(cfg.judge, cfg.judge_model, False)
    judge_cache = None if no_cache else Path(cache_dir) if cache_dir else default_cache_dir()
    inputs = {"benchmark file": [b for b in cfg.benchmarks if Path(b).is_file()], "judge cache": judge_cache}
    if out is not None:
        check_output_dir(out, force, inputs)
    with progress_bars(not quiet):
        records, metrics = _run(model, tokenizer, peft, cfg, variants, loaded, judge_cache)
    add_reference_comparison(reference, records, metrics)
    label = judges_label(cfg.judge, cfg.judge_model)
    if out is not None:
        with atomic_output_dir(out, force, inputs, "eval") as tmp:
            write_outputs(tmp, records, metrics, cfg, label, config=False)
    if not quiet:
        print_table(metrics, label)
    return metrics


def eval_config(
    benchmarks: Sequence[str],
    out: str | Path | None,
    judge: str | list[str],
    judge_model: str,
    limit: int | None,
    max_new_tokens: int,
    batch_size: int,
    warn_truncated: bool,
) -> EvalConfig:
    """The `EvalConfig` the shared judging and scoring read (judges, batch size, token budget); its
    model and adapters stay empty: the variants are the model's."""
    if isinstance(benchmarks, str):
        raise InputError(f"benchmarks={benchmarks!r}: give a list of names, e.g. [{benchmarks!r}]")
    try:
        return EvalConfig(
            model=IN_MEMORY, benchmarks=list(benchmarks), out=Path(out or "."), judge=judge,
            judge_model=judge_model, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
            warn_truncated=warn_truncated,
        )  # fmt: skip
    except ValidationError as exc:
        raise InputError(f"invalid options: {validation_message(exc, EvalConfig)}") from None


def _run(
    model: Any,
    tokenizer: Any,
    peft: bool,
    cfg: EvalConfig,
    variants: list[Variant],
    benchmarks: list[Any],
    judge_cache: Path | None,
) -> tuple[list[Any], dict[str, Any]]:
    """Generate (no disk cache: keyed by adapter name for this call only) and judge, the model in eval
    mode and restored afterwards (also on an error)."""
    backend = LoadedModelBackend(model, tokenizer, cfg.max_new_tokens, peft)
    hook = contiguous_head_input(model)
    try:
        with kept_state(model, peft):
            responses = generate_all(
                backend, IN_MEMORY, variants, benchmarks, None, cfg.batch_size, cfg.max_new_tokens,
                model_fingerprint=IN_MEMORY, adapter_fingerprint=lambda a: f"adapter:{a}",
            )  # fmt: skip
            return score(cfg, variants, benchmarks, responses, judge_cache, backend.release)
    finally:
        backend.restore()
        if hook is not None:
            hook.remove()
