"""Answer extraction and scoring for the utility benchmarks (pure functions).

GSM8K follows lm-evaluation-harness's chat task `gsm8k-cot-llama` (`lm_eval/tasks/gsm8k/`): strict =
the number of the last "The final answer is N", flexible = the last number. PubMedQA's label rule is
this project's (its authors and lm-evaluation-harness score a label, not generated text):
docs/train_eval.md, "How each benchmark is scored".
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation, localcontext

from safemerge.common.datasets import gsm8k_final

# gsm8k-cot-llama's strict-match pattern, verbatim (case-sensitive; lm-eval takes the last match).
_STRICT = re.compile(r"The final answer is ((-?[$0-9.,]{2,})|(-?[0-9]+))")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_LABEL = r"(yes|no|maybe)\b"
# An explicit answer: "Answer: x", "Final Answer: x", "the answer is x", "**Answer:** x".
_PUBMEDQA_MARKED = re.compile(r"\banswer\s*(?:is)?\s*[:\-]?\s*[*_]*\s*" + _LABEL, re.IGNORECASE)
# A label word that stands alone: followed by no further word ("Yes.", "no,", "maybe" at the end);
# "no significant difference", "maybe because" and the like are prose, not an answer.
_PUBMEDQA_ALONE = re.compile(r"\b" + _LABEL + r"(?![*_\"')\]]*[ \t]+[A-Za-z0-9])", re.IGNORECASE)
_PUBMEDQA_FIRST = re.compile(r"^[\s*_\"'(\[]*" + _LABEL, re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """'$1,234.50.' -> '1234.5'; None when it is not a number."""
    t = text.replace("\u2212", "-").replace("$", "").replace(",", "").rstrip(".")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    with localcontext() as ctx:  # every digit exact: a model that repeats digits writes 29 and more
        ctx.prec = max(ctx.prec, len(t))
        if value == value.to_integral_value():
            return str(value.quantize(Decimal(1)))
        return format(value.normalize(), "f")


def extract_strict(text: str) -> str | None:
    """The number of the last "The final answer is N" (gsm8k-cot-llama's strict match), normalised."""
    found = _STRICT.findall(text.replace("\u2212", "-"))
    return normalise_number(found[-1][0]) if found else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, normalised (lm-eval's flexible extraction)."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    for cand in reversed(found):
        n = normalise_number(cand)
        if n is not None:
            return n
    return None


def gsm8k_reference(answer: str) -> str:
    """The gold number of a GSM8K solution (`... #### 72`), normalised."""
    ref = normalise_number(gsm8k_final(answer))
    if ref is None:
        raise ValueError(f"GSM8K solution whose '####' line is not a number: {answer[-40:]!r}")
    return ref


def parse_pubmedqa(text: str) -> str | None:
    """yes / no / maybe, or None: the label of the last explicit answer ("Answer: x", "Final Answer: x",
    "the answer is x"); without one, the last label word that stands alone (no word after it in its
    line) or, failing that, a label that opens the response ("No significant difference ...")."""
    for found in (_PUBMEDQA_MARKED.findall(text), _PUBMEDQA_ALONE.findall(text)):
        if found:
            return str(found[-1]).lower()
    m = _PUBMEDQA_FIRST.match(text)
    return m.group(1).lower() if m else None
