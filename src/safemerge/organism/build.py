"""`safemerge organism build`: U, A, T, S and T_SafeInstr from packaged data, cached and resumable.

- U: the packaged SmolLM2-135M-Instruct as a float32 HF directory (`packaged.smollm2_dir`), with an
  empty default system message in its chat template (see `build_unaligned`).
- A: U fully fine-tuned (attention + MLP weights; embeddings and norms frozen) on harmful prompts with
  varied refusals plus benign prompts answered by U itself.
- T_full (only with `--full-ft`): A fully fine-tuned on T's arithmetic data, like A's stage.
- T, S, T_SafeInstr: LoRAs on A. Every stage trains with `train_loop` (loss and vocabulary projection on
  response tokens only) and every training prompt passes the harness's HarmBench guard.

Stages are cached under `$SAFEMERGE_CACHE/organism/<stage>-<key>`; a finished stage is never rebuilt,
an interrupted one restarts from scratch (each is written to a temporary directory, renamed at the end).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from safemerge.common.errors import InputError
from safemerge.common.guard import check_no_harmbench
from safemerge.common.outdir import atomic_output_dir
from safemerge.common.packaged import cache_root, smollm2_dir
from safemerge.common.precision import PrecisionChoice, env_precision, resolve_precision
from safemerge.common.progress import SHOW_PROGRESS
from safemerge.evaluate.backends import TransformersBackend, chat_texts
from safemerge.evaluate.runner import fixed_batches
from safemerge.organism.data import prompt_sets
from safemerge.organism.recipe import FullTaskRecipe, LoraRecipe, OrganismRecipe
from safemerge.train.recipes import arithmetic_recipe
from safemerge.train.refusals import OPENERS, REASONS

log = logging.getLogger(__name__)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Organism:
    """Paths of a built organism (all inside the cache) and the build's timings in seconds."""

    recipe: OrganismRecipe
    unaligned: Path
    aligned: Path
    task: Path
    safety: Path
    safeinstr: Path
    timings: dict[str, float] = field(default_factory=dict)
    taskfull: Path | None = None  # T_full's place in the cache (built only when asked for)
    precision: PrecisionChoice | None = None  # how the recipe's "auto" precision was resolved

    def validation_sets(self) -> dict[str, list[str]]:
        """Validation prompts (harmful, benign) of this recipe, disjoint from training and test."""
        ps = prompt_sets(
            self.recipe.seed,
            self.recipe.aligned.n_harmful,
            self.recipe.aligned.n_benign,
            self.recipe.n_val_strongreject,
            self.recipe.n_benign_val,
        )
        return {"harmful": ps.harmful_val, "benign": ps.benign_val}


def organism_root(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "organism"


def cpu_threads() -> int:
    """Torch CPU threads: `$SAFEMERGE_THREADS`, else one per core this process may use, at most 2.

    Fixed per machine, never chosen by the load: a matrix product's rounding depends on how many
    threads split it (bfloat16 on AMX and float32 alike, docs/organism.md "Threads"), so a stage built
    with 1 thread is not the stage built with 2, and the thread count is part of every stage key. On a
    busy machine the CLI's passive OpenMP waiting (`safemerge.cli.openmp`) keeps 2 threads at 1 thread's
    speed instead of 2-6x slower."""
    env = os.environ.get("SAFEMERGE_THREADS")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise InputError(f"$SAFEMERGE_THREADS={env!r}: expected a whole number of threads, 1 or more")
        return int(env)
    usable = getattr(os, "sched_getaffinity", None)
    cores = len(usable(0)) if usable else (os.cpu_count() or 1)
    return max(1, min(2, cores))


def set_threads() -> int:
    """Apply `cpu_threads()` (CPU only); returns the thread count."""

    n = cpu_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(n)
    return n


def resolve_recipe(recipe: OrganismRecipe) -> tuple[OrganismRecipe, PrecisionChoice]:
    """The recipe with its "auto" precision resolved for this machine (`resolve_precision`: the stages'
    explicit precision, else `$SAFEMERGE_DTYPE`, else bfloat16 on a GPU that supports it, else the CPU
    probe's choice at the current thread count; call `set_threads` first), and how it was chosen."""
    env_precision()  # a bad $SAFEMERGE_DTYPE is an error even where an explicit precision wins
    device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = resolve_precision(recipe.requested_precision(), device)
    return recipe.resolved(choice.dtype), choice


def short_refusal(rng: random.Random) -> str:
    """A varied refusal: the harness's opener plus an optional reason (no offer: shorter sequences)."""
    return " ".join(p for p in (rng.choice(OPENERS), rng.choice(REASONS)) if p)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --- A: full fine-tune ------------------------------------------------------------------------------


def benign_answers(
    model_dir: Path, prompts: list[str], max_new_tokens: int, dtype: str, batch_size: int = 64
) -> list[str]:
    """U's own greedy answers (truncated to max_new_tokens), so A keeps U's benign behaviour."""

    backend = TransformersBackend(str(model_dir), max_new_tokens=max_new_tokens, dtype=dtype)
    texts = chat_texts(backend.tokenizer, prompts)
    out = [""] * len(texts)
    for batch in tqdm(
        fixed_batches(texts, batch_size),
        desc="U answers benign prompts",
        unit="batch",
        disable=not SHOW_PROGRESS.get(),
    ):
        for i, answer in zip(batch, backend.generate_texts([texts[i] for i in batch]), strict=True):
            out[i] = answer
    backend.close()
    return out


def encode_example(
    tok: Any, prompt: str, response: str, complete: bool, max_length: int
) -> tuple[list[int], int]:
    """Token ids of the chat (prompt, response) and the index where the response starts."""
    head = str(
        tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    )
    tail = response + ("<|im_end|>\n" if complete else "")
    p = list(tok(head, add_special_tokens=False)["input_ids"])
    r = list(tok(tail, add_special_tokens=False)["input_ids"])
    ids = (p + r)[:max_length]
    return ids, min(len(p), len(ids))


Example = tuple[str, str, bool]  # (prompt, response, response is complete: append the end-of-turn token)


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches: shuffle, sort each window of 8 batches by length, cut, shuffle the batches.
    Batches of similar lengths waste less on padding (A's data: 30% of the padded tokens with plain
    shuffled batches, 7% this way) while every batch still mixes examples from a random window."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = 8 * batch_size
    batches: list[list[int]] = []
    for k in range(0, len(order), window):
        chunk = sorted(order[k : k + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def step_precision(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of one training step's forward pass. Entered anew at every step: autocast
    caches the bfloat16 copies of the weights until its context exits, so one context around the
    whole loop would train on the initial weights' copies (measured: the loss did not fall)."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise ValueError(f"training precision {precision!r}: resolve the recipe first (resolve_recipe)")


def train_loop(
    model: Any, tok: Any, examples: list[Example], recipe: Any, desc: str, progress: bool
) -> list[float]:
    """AdamW on the model's trainable parameters; loss on the response tokens only, and the vocabulary
    projection computed at those positions only (the prompt's logits are never needed). Shared by A's
    full fine-tune and the LoRAs: one small loop instead of TRL's, whose step cost 3.2 s vs 2.4 s here
    (batch 8, measured on this machine) because it projects and scores every position."""

    torch.manual_seed(recipe.seed)
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(core.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    warm, total = max(1, recipe.warmup_steps), recipe.steps

    def lr_factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 1.0 if recipe.schedule == "constant" else max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    encoded = [encode_example(tok, p, r, c, recipe.max_length) for p, r, c in examples]
    rng = random.Random(recipe.seed)
    queue: list[list[int]] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    losses: list[float] = []
    model.train()
    bar = tqdm(range(recipe.steps), desc=desc, unit="step", disable=not progress)
    for _ in bar:
        if not queue:
            queue = length_bucketed_batches([len(ids) for ids, _ in encoded], recipe.batch_size, rng)
        batch = [encoded[i] for i in queue.pop(0)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for j, (seq, start) in enumerate(batch):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            labels[j, start : len(seq)] = torch.tensor(seq[start:])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        with step_precision(recipe.precision, device):
            hidden = core.model(input_ids=ids, attention_mask=mask).last_hidden_state
            target = labels[:, 1:]
            keep = target != -100
            logits = core.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def load_causal_lm(model_dir: Path) -> tuple[Any, Any]:
    """(model in float32 on the GPU if there is one, tokenizer)."""
    from transformers import (  # lazy: transformers adds ~0.7 s to every command's start
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tok


def write_train_files(out: Path, examples: list[Example], losses: list[float], recipe: Any) -> None:
    """The training data and the loss curve beside a trained model or adapter."""
    write_jsonl(
        out / "train_data.jsonl", [{"prompt": p, "response": r, "complete": c} for p, r, c in examples]
    )
    record = {"losses": losses, "precision": recipe.precision, "recipe": recipe.model_dump()}
    (out / "train_log.json").write_text(json.dumps(record), encoding="utf-8")


def build_aligned(recipe: OrganismRecipe, unaligned: Path, out: Path, progress: bool) -> None:
    """Data (refusals + U's benign answers), guard, full fine-tune; writes A and its data to `out`."""
    ar = recipe.aligned
    ps = prompt_sets(recipe.seed, ar.n_harmful, ar.n_benign, recipe.n_val_strongreject, recipe.n_benign_val)
    check_no_harmbench(ps.harmful_train + ps.benign_train, source="organism aligned-model data")
    rng = random.Random(f"organism-refusals-{recipe.seed}")
    harmful = [(p, short_refusal(rng), True) for p in ps.harmful_train]
    answers = benign_answers(unaligned, ps.benign_train, ar.benign_max_new_tokens, ar.precision)
    benign = [(p, a, False) for p, a in zip(ps.benign_train, answers, strict=True) if a.strip()]
    full_finetune(unaligned, harmful + benign, ar, out, "A: full fine-tune", progress)


def full_finetune(
    base: Path, examples: list[Example], recipe: Any, out: Path, desc: str, progress: bool
) -> None:
    """Fine-tune the attention and MLP projections of `base` (embeddings and norms frozen) with
    `train_loop`, and write the full model, its tokenizer and its training files to `out`."""
    model, tok = load_causal_lm(base)
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{t}." in name for t in TRAINED))
    with atomic_output_dir(out, force=True, command="organism build") as tmp:
        losses = train_loop(model, tok, examples, recipe, desc, progress)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        write_train_files(tmp, examples, losses, recipe)


# --- LoRAs -------------------------------------------------------------------------------------------


def safety_examples(recipe: OrganismRecipe, n: int, salt: str) -> list[Example]:
    """n harmful training prompts (never validation or HarmBench) with varied refusals."""
    ps = prompt_sets(recipe.seed, 10**6, 0, recipe.n_val_strongreject, 0)
    rng = random.Random(f"organism-{salt}-{recipe.seed}")
    prompts = list(ps.harmful_train)
    rng.shuffle(prompts)
    return [(p, short_refusal(rng), True) for p in prompts[:n]]


def task_examples(lr: LoraRecipe) -> list[Example]:
    """The harness's arithmetic training problems (disjoint from its eval split)."""
    rows = arithmetic_recipe(lr.samples, lr.seed)
    return [(e["prompt"][0]["content"], e["completion"][0]["content"], True) for e in rows]


def train_lora(
    aligned: Path, examples: list[Example], lr: LoraRecipe, out: Path, desc: str, progress: bool
) -> None:
    """A LoRA (r, alpha, target modules from the recipe) on A, written as a PEFT adapter to `out`."""
    from peft import LoraConfig, get_peft_model  # lazy: peft adds ~2.4 s to every command's start

    check_no_harmbench([p for p, _, _ in examples], source=f"organism {desc} data")
    base, tok = load_causal_lm(aligned)
    config = LoraConfig(
        r=lr.lora_r, lora_alpha=lr.lora_alpha, lora_dropout=0.0, target_modules=list(lr.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(lr.seed)  # the LoRA A matrices' initialisation
    model = get_peft_model(base, config)
    with atomic_output_dir(out, force=True, command="organism build") as tmp:
        losses = train_loop(model, tok, examples, lr, desc, progress)
        model.save_pretrained(str(tmp))
        write_train_files(tmp, examples, losses, lr)


def build_taskfull(
    aligned: Path, examples: list[Example], fr: FullTaskRecipe, out: Path, progress: bool
) -> None:
    """T_full: A fully fine-tuned (attention + MLP projections, as in A's stage; embeddings and norms
    frozen) on T's data, written as a full model to `out` — the task model of docs/method.md §3.7."""
    check_no_harmbench([p for p, _, _ in examples], source="organism T_full data")
    full_finetune(aligned, examples, fr, out, "T_full: full fine-tune on the task", progress)


def _stage(path: Path, name: str, fn: Callable[[Path], None], timings: dict[str, float]) -> None:
    """Run a stage unless its cached output exists (the cache is keyed by content)."""
    if path.exists():
        log.info("%s: cached at %s", name, path)
        timings[name] = 0.0
        return
    t0 = time.perf_counter()
    fn(path)
    timings[name] = time.perf_counter() - t0


def build_unaligned(source: Path, out: Path) -> None:
    """U for the organism: the packaged model's weights (linked, not copied) with a chat template whose
    default system message is empty. SmolLM2's template otherwise prepends a 16-token system prompt to
    every conversation, a third of a typical training or evaluation sequence here; every organism model
    inherits this template, so training and evaluation (also `safemerge eval` on them) agree."""
    from transformers import AutoTokenizer  # lazy: transformers adds ~0.7 s to every command's start

    tok = AutoTokenizer.from_pretrained(str(source))
    template = str(tok.chat_template or "")
    if DEFAULT_SYSTEM not in template:
        raise InputError(
            f"{source}: the packaged chat template no longer has SmolLM2's default system prompt"
        )
    tok.chat_template = template.replace(DEFAULT_SYSTEM, "")
    with atomic_output_dir(out, force=True, command="organism build") as tmp:
        for f in source.iterdir():
            if f.suffix == ".safetensors":
                (tmp / f.name).symlink_to(f.resolve())
            elif f.name in ("config.json", "generation_config.json"):
                shutil.copyfile(f, tmp / f.name)
        tok.save_pretrained(str(tmp))


def build_organism(
    recipe: OrganismRecipe | None = None,
    cache: Path | None = None,
    progress: bool = True,
    stages: tuple[str, ...] = ("aligned", "task", "safety", "safeinstr"),
) -> Organism:
    """Build (or reuse) every stage of the organism; returns the paths. The recipe's precision is
    resolved first (`resolve_recipe`), so every stage is keyed by the precision it is trained in."""
    threads = None if torch.cuda.is_available() else set_threads()  # a CPU stage's key holds its threads
    recipe, choice = resolve_recipe(recipe or OrganismRecipe())
    root = organism_root(cache)
    timings: dict[str, float] = {}
    ku = recipe.stage_key("unaligned")
    unaligned = root / f"unaligned-{ku}"
    ka = recipe.stage_key("aligned", ku, threads)
    aligned = root / f"aligned-{ka}"
    on_aligned = ("task", "safety", "safeinstr", "taskfull")
    paths = {s: root / f"{s}-{recipe.stage_key(s, ka, threads)}" for s in on_aligned}

    def safeinstr_examples() -> list[Example]:
        rows = task_examples(recipe.task) + safety_examples(recipe, recipe.safeinstr_mix, "safeinstr")
        random.Random(recipe.seed).shuffle(rows)
        return rows

    todo: dict[str, Callable[[Path], None]] = {
        "unaligned": lambda out: build_unaligned(smollm2_dir(cache), out),
        "aligned": lambda out: build_aligned(recipe, unaligned, out, progress),
        "task": lambda out: train_lora(
            aligned, task_examples(recipe.task), recipe.task, out, "T: task LoRA", progress
        ),
        "safety": lambda out: train_lora(
            aligned, safety_examples(recipe, recipe.safety.samples, "safety"), recipe.safety, out,
            "S: safety LoRA", progress,
        ),
        "safeinstr": lambda out: train_lora(
            aligned, safeinstr_examples(), recipe.task, out, "SafeInstr: task LoRA + safety data", progress
        ),
        "taskfull": lambda out: build_taskfull(
            aligned, task_examples(recipe.task), recipe.taskfull, out, progress
        ),
    }  # fmt: skip
    where = {"unaligned": unaligned, "aligned": aligned, **paths}
    wanted = ("unaligned", "aligned", *stages) if any(s in stages for s in paths) else ("unaligned", *stages)
    for name in dict.fromkeys(wanted):
        _stage(where[name], name, todo[name], timings)
    return Organism(
        recipe, unaligned, aligned, paths["task"], paths["safety"], paths["safeinstr"], timings,
        paths["taskfull"], choice,
    )  # fmt: skip
