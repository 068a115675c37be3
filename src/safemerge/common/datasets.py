"""Data sources that training and evaluation share: rows of hub datasets and local files, the offline
3-digit arithmetic task (train and eval problems disjoint), and the GSM8K and PubMedQA prompt formats.

Here, below both `train` and `evaluate`, so that neither imports the other and the prompt a model is
trained on is the prompt it is evaluated with.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from safemerge.common.errors import InputError

Row = dict[str, Any]
# A prompt-completion chat example, the form TRL trains on and calibration data are read in:
# {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}
Example = dict[str, list[dict[str, str]]]
PUBMEDQA_INSTRUCTION = "Answer the question with yes, no or maybe, after a short explanation."
# lm-evaluation-harness's chat prompt for GSM8K (`gsm8k-cot-llama.yaml`, doc_to_text), word for word but
# for its trailing newline (chat templates such as Llama 3's trim the message anyway).
GSM8K_PROMPT = (
    "Given the following problem, reason and give a final answer to the problem.\nProblem: {question}\n"
    'Your response should end with "The final answer is [answer]" where [answer] is the response to the '
    "problem."
)
_GSM8K_FINAL = re.compile(r"####\s*(-?\$?[0-9][0-9.,]*)")  # a GSM8K solution's last line: `#### 72`
_GSM8K_CALCULATOR = re.compile(r"<<[^<>]*>>")  # its calculator annotations, e.g. <<48/2=24>>


def load_hub_rows(name: str, config: str | None, split: str) -> list[Row]:
    """Rows of a hub dataset, with a clear InputError when it cannot be reached or is gated."""
    import datasets  # lazy: adds ~0.7 s to start-up; only hub datasets need it

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the hub raises many types: offline, gated, missing
        msg = str(exc)
        hint = ""
        if any(k in msg.lower() for k in ("gated", "401", "403", "authenticated", "access")):
            hint = (
                f" The dataset is gated: accept its terms on https://huggingface.co/datasets/{name} and log "
                "in with `hf auth login` (or set HF_TOKEN)."
            )
        raise InputError(
            f"cannot load hub dataset {name!r} ({config or 'default'}, {split}): {msg}.{hint}"
        ) from None
    return [dict(r) for r in ds]


def _is_eval_problem(a: int, op: str, b: int) -> bool:
    """Disjoint train/eval split by hash: one problem in ten is reserved for evaluation."""
    return int(hashlib.sha256(f"{a}{op}{b}".encode()).hexdigest(), 16) % 10 == 0


def arithmetic_problems(n: int, seed: int, split: str = "train") -> list[tuple[str, str, int]]:
    """n three-digit addition/subtraction problems as (question, worked answer, result); train and
    eval problems never overlap."""
    rng = random.Random(f"arithmetic-{split}-{seed}")
    out: list[tuple[str, str, int]] = []
    seen: set[tuple[int, str, int]] = set()
    while len(out) < n:
        a, b, op = rng.randint(100, 999), rng.randint(100, 999), rng.choice("+-")
        if (a, op, b) in seen or _is_eval_problem(a, op, b) != (split == "eval"):
            continue
        seen.add((a, op, b))
        c = a + b if op == "+" else a - b
        out.append((f"What is {a} {op} {b}?", f"{a} {op} {b} = {c}. The answer is {c}.", c))
    return out


def gsm8k_prompt(question: str) -> str:
    """The GSM8K prompt used for training and evaluation alike: the question inside lm-eval's instruction."""
    return GSM8K_PROMPT.format(question=question)


def gsm8k_final(solution: str) -> str:
    """The number of a GSM8K solution's `#### N` line, as written; ValueError when it has none."""
    m = _GSM8K_FINAL.search(solution.replace("\u2212", "-"))
    if m is None:
        raise ValueError(f"GSM8K solution without '####': {solution[-40:]!r}")
    return m.group(1).rstrip(".")


def gsm8k_completion(solution: str) -> str:
    """A GSM8K solution in the form the `gsm8k` benchmark scores (lm-eval's gsm8k-cot-llama): its
    reasoning without the calculator annotations, then "The final answer is N." for the `#### N` line."""
    reasoning = _GSM8K_CALCULATOR.sub("", solution.split("####")[0]).strip()
    return f"{reasoning}\nThe final answer is {gsm8k_final(solution)}."


def pubmedqa_prompt(question: str, contexts: list[str]) -> str:
    """The PubMedQA prompt used for training and evaluation alike."""
    return f"Context: {' '.join(contexts)}\nQuestion: {question}\n{PUBMEDQA_INSTRUCTION}"


def read_rows(path: Path) -> list[Row]:
    """Rows of a JSONL or CSV file (InputError naming the file and line when it is malformed)."""
    if not path.is_file():
        raise InputError(f"dataset file {path} not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise InputError(f"dataset file {path}: expected a .jsonl or .csv file")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"dataset file {path}, line {i}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"dataset file {path}, line {i}: expected a JSON object")
        rows.append(row)
    return rows


def chat_example(prompt: str, response: str) -> Example:
    """A one-turn prompt-completion example."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": response}],
    }


def _is_turns(value: Any) -> bool:
    """A list of chat turns: each a {role, content} mapping of strings."""
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def _messages_example(path: Path, i: int, messages: Any) -> Example:
    """TRL's conversational language-modelling row: the last (assistant) turn is the completion."""
    if not _is_turns(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise InputError(
            f"dataset file {path}, row {i}: `messages` must be a list of {{role, content}} ending with an "
            "assistant turn"
        )
    return {"prompt": [dict(m) for m in messages[:-1]], "completion": [dict(messages[-1])]}


def _conversational_example(path: Path, i: int, prompt: Any, completion: Any) -> Example:
    """TRL's conversational prompt-completion row: two lists of {role, content} turns, the completion
    starting with the assistant's."""
    if not (_is_turns(prompt) and prompt and _is_turns(completion) and completion):
        raise InputError(
            f"dataset file {path}, row {i}: `prompt` and `completion` must both be strings or both be "
            "non-empty lists of {role, content}"
        )
    if completion[0]["role"] != "assistant":
        raise InputError(
            f"dataset file {path}, row {i}: `completion` must start with an assistant turn "
            f"(found role {completion[0]['role']!r})"
        )
    return {"prompt": [dict(m) for m in prompt], "completion": [dict(m) for m in completion]}


def _text_example(path: Path, i: int, prompt: Any, answer: Any, column: str) -> Example:
    """A one-turn row of two non-empty strings (`prompt` with `response` or `completion`)."""
    if not all(isinstance(v, str | int | float) for v in (prompt, answer)):
        raise InputError(
            f"dataset file {path}, row {i}: `prompt` and `{column}` must be strings (or, for `completion`, "
            "both lists of {role, content})"
        )
    if not str(prompt).strip() or not str(answer).strip():
        raise InputError(f"dataset file {path}, row {i}: empty `prompt` or `{column}`")
    return chat_example(str(prompt), str(answer))


def _row_example(path: Path, i: int, r: Row) -> Example:
    """One row in any of the accepted formats (see `chat_rows`)."""
    if "messages" in r:
        return _messages_example(path, i, r["messages"])
    if "prompt" in r and "completion" in r:
        p, c = r["prompt"], r["completion"]
        if isinstance(p, list) or isinstance(c, list):
            return _conversational_example(path, i, p, c)
        return _text_example(path, i, p, c, "completion")
    if "prompt" in r and "response" in r:
        return _text_example(path, i, r["prompt"], r["response"], "response")
    raise InputError(
        f"dataset file {path}, row {i}: needs columns `prompt` and `response`, `prompt` and `completion`, "
        f"or `messages` (found: {sorted(r)})"
    )


def chat_rows(path: Path) -> list[Example]:
    """The examples of a local JSONL/CSV, in file order; InputError naming the file and row.

    Accepted rows: `prompt` and `response` strings; TRL's prompt-completion (`prompt` and `completion`
    strings), conversational prompt-completion (both lists of {role, content}, the completion starting
    with the assistant turn) and conversational language modelling (`messages`, ending with the
    assistant turn, which becomes the completion)."""
    rows = read_rows(path)
    if not rows:
        raise InputError(f"dataset file {path} has no rows")
    return [_row_example(path, i, r) for i, r in enumerate(rows)]
