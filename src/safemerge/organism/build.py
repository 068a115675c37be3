"""`safemerge organism build`: U, A, T, S and T_SafeInstr from packaged data, cached and resumable.

- U: the packaged SmolLM2-135M-Instruct as a float32 HF directory (`packaged.smollm2_dir`).
- A: U fully fine-tuned (attention + MLP weights; embeddings and norms frozen) on harmful prompts with
  varied refusals plus benign prompts of the same phrasings answered by U itself (own training loop:
  the harness trains LoRAs only).
- T, S, T_SafeInstr: LoRAs on A trained by the harness (`safemerge.train.train`), whose guard keeps
  HarmBench prompts out of every training file.

Stages are cached under `$SAFEMERGE_CACHE/organism/<stage>-<key>`; a finished stage is never rebuilt,
an interrupted one restarts from scratch (each is written to a temporary directory, renamed at the end).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safemerge.organism.data import arithmetic_val, prompt_sets
from safemerge.organism.recipe import LoraRecipe, OrganismRecipe
from safemerge.outdir import atomic_output_dir
from safemerge.packaged import cache_root, smollm2_dir
from safemerge.train.guard import check_no_harmbench
from safemerge.train.recipes import arithmetic_recipe
from safemerge.train.refusals import OPENERS, REASONS

log = logging.getLogger(__name__)
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
    """Torch CPU threads: `$SAFEMERGE_THREADS`, else 2 (the target machine has two cores), else 1 when
    the machine is already busy: on an oversubscribed CPU, OpenMP's spinning threads made a forward
    pass 3-6x slower with 2 threads than with 1 (measured on this machine, see docs/organism.md)."""
    env = os.environ.get("SAFEMERGE_THREADS")
    if env:
        return max(1, int(env))
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] >= cores - 0.5 if hasattr(os, "getloadavg") else False
    return 1 if busy else min(2, cores)


def set_threads() -> int:
    """Apply `cpu_threads()` (CPU only); returns the thread count."""
    import torch

    n = cpu_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(n)
    return n


def short_refusal(rng: random.Random) -> str:
    """A varied refusal: the harness's opener plus an optional reason (no offer: shorter sequences)."""
    return " ".join(p for p in (rng.choice(OPENERS), rng.choice(REASONS)) if p)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --- A: full fine-tune ------------------------------------------------------------------------------


def benign_answers(
    model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """U's own greedy answers (truncated to max_new_tokens), so A keeps U's benign behaviour."""
    from tqdm.auto import tqdm

    from safemerge.evaluate.backends import TransformersBackend, chat_texts

    backend = TransformersBackend(str(model_dir), max_new_tokens=max_new_tokens, dtype="float32")
    texts = chat_texts(backend.tokenizer, prompts)
    out: list[str] = []
    for k in tqdm(range(0, len(texts), batch_size), desc="U answers benign prompts", unit="batch"):
        out += backend.generate_texts(texts[k : k + batch_size])
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


def train_full(
    model_dir: Path,
    examples: list[tuple[str, str, bool]],
    recipe: Any,
    out: Path,
    progress: bool = True,
) -> list[float]:
    """Full fine-tune of attention + MLP weights on (prompt, response, complete) triples; loss on the
    response only, computed on the response positions only (saves the vocabulary projection elsewhere)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = model.to(device)
    model.train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".{t}." in name for t in TRAINED))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, recipe.warmup_steps)))
    encoded = [encode_example(tok, p, r, c, recipe.max_length) for p, r, c in examples]
    rng = random.Random(recipe.seed)
    order: list[int] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc="A: full fine-tune", unit="step", disable=not progress)
    for _ in bar:
        if len(order) < recipe.batch_size:
            more = list(range(len(encoded)))
            rng.shuffle(more)
            order += more
        batch = [encoded[i] for i in order[: recipe.batch_size]]
        del order[: recipe.batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for j, (seq, start) in enumerate(batch):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
            labels[j, start : len(seq)] = torch.tensor(seq[start:])
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return losses


def build_aligned(recipe: OrganismRecipe, unaligned: Path, out: Path, progress: bool) -> None:
    """Data (refusals + U's benign answers), guard, full fine-tune; writes A and its data to `out`."""
    ar = recipe.aligned
    ps = prompt_sets(recipe.seed, ar.n_harmful, ar.n_benign, recipe.n_val_strongreject, recipe.n_benign_val)
    check_no_harmbench(ps.harmful_train + ps.benign_train, source="organism aligned-model data")
    rng = random.Random(f"organism-refusals-{recipe.seed}")
    harmful = [(p, short_refusal(rng), True) for p in ps.harmful_train]
    answers = benign_answers(unaligned, ps.benign_train, ar.benign_max_new_tokens)
    benign = [(p, a, False) for p, a in zip(ps.benign_train, answers, strict=True) if a.strip()]
    examples = harmful + benign
    with atomic_output_dir(out, force=True) as tmp:
        losses = train_full(unaligned, examples, ar, tmp, progress)
        write_jsonl(
            tmp / "train_data.jsonl", [{"prompt": p, "response": r, "complete": c} for p, r, c in examples]
        )
        (tmp / "train_log.json").write_text(
            json.dumps({"losses": losses, "recipe": ar.model_dump()}), encoding="utf-8"
        )


# --- LoRAs via the harness ---------------------------------------------------------------------------


def safety_examples(recipe: OrganismRecipe, n: int, salt: str) -> list[dict[str, str]]:
    """n harmful training prompts (never validation or HarmBench) with varied refusals."""
    ps = prompt_sets(recipe.seed, 10**6, 0, recipe.n_val_strongreject, 0)
    rng = random.Random(f"organism-{salt}-{recipe.seed}")
    prompts = list(ps.harmful_train)
    rng.shuffle(prompts)
    return [{"prompt": p, "response": short_refusal(rng)} for p in prompts[:n]]


def train_lora(aligned: Path, recipe_name: str, lr: LoraRecipe, out: Path, data: Path | None) -> None:
    """One LoRA through `safemerge.train` (r, alpha, steps, lr from the recipe; q_proj/v_proj)."""
    from safemerge.train import TrainConfig, train

    cfg = TrainConfig(
        model=str(aligned),
        recipe=str(data) if data is not None else recipe_name,
        out=out,
        samples=lr.samples if data is None else None,
        lora_r=lr.lora_r,
        lora_alpha=lr.lora_alpha,
        learning_rate=lr.learning_rate,
        max_steps=lr.steps,
        batch_size=lr.batch_size,
        max_length=lr.max_length,
        seed=lr.seed,
        logging_steps=max(1, lr.steps // 20),
        force=True,
    )
    train(cfg)


def _stage(path: Path, name: str, fn: Callable[[Path], None], timings: dict[str, float]) -> None:
    """Run a stage unless its cached output exists (the cache is keyed by content)."""
    if path.exists():
        log.info("%s: cached at %s", name, path)
        timings[name] = 0.0
        return
    t0 = time.perf_counter()
    fn(path)
    timings[name] = time.perf_counter() - t0


def build_organism(
    recipe: OrganismRecipe | None = None,
    cache: Path | None = None,
    progress: bool = True,
    stages: tuple[str, ...] = ("aligned", "task", "safety", "safeinstr"),
) -> Organism:
    """Build (or reuse) every stage of the organism; returns the paths."""
    recipe = recipe or OrganismRecipe()
    set_threads()
    root = organism_root(cache)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    unaligned = smollm2_dir()
    timings["unaligned"] = time.perf_counter() - t0
    ka = recipe.stage_key("aligned")
    aligned = root / f"aligned-{ka}"
    paths = {s: root / f"{s}-{recipe.stage_key(s, ka)}" for s in ("task", "safety", "safeinstr")}

    def data_file(name: str, rows: list[dict[str, str]]) -> Path:
        folder = root / "data"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.jsonl"
        write_jsonl(path, rows)
        return path

    def build_safety(out: Path) -> None:
        rows = safety_examples(recipe, recipe.safety.samples, "safety")
        train_lora(aligned, "safety", recipe.safety, out, data_file(f"safety-{paths['safety'].name}", rows))

    def build_safeinstr(out: Path) -> None:
        rows = [
            {"prompt": e["prompt"][0]["content"], "response": e["completion"][0]["content"]}
            for e in arithmetic_recipe(recipe.task.samples, recipe.task.seed)
        ]
        rows += safety_examples(recipe, recipe.safeinstr_mix, "safeinstr")
        random.Random(recipe.seed).shuffle(rows)
        train_lora(
            aligned, "arithmetic", recipe.task, out, data_file(f"safeinstr-{paths['safeinstr'].name}", rows)
        )

    if "aligned" in stages or any(s in stages for s in paths):
        _stage(aligned, "aligned", lambda out: build_aligned(recipe, unaligned, out, progress), timings)
    if "task" in stages:
        _stage(
            paths["task"],
            "task",
            lambda out: train_lora(aligned, "arithmetic", recipe.task, out, None),
            timings,
        )
    if "safety" in stages:
        _stage(paths["safety"], "safety", build_safety, timings)
    if "safeinstr" in stages:
        _stage(paths["safeinstr"], "safeinstr", build_safeinstr, timings)
    return Organism(recipe, unaligned, aligned, paths["task"], paths["safety"], paths["safeinstr"], timings)


def validation_task(n: int) -> list[tuple[str, str]]:
    """Arithmetic validation problems (disjoint from training and from the test benchmark)."""
    return arithmetic_val(n)
