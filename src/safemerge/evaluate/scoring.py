"""Answer extraction and scoring for the utility benchmarks (pure functions)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# lm-evaluation-harness gsm8k: strict-match "#### (\-?[0-9\.\,]+)"; flexible-extract takes the last number.
_STRICT = re.compile(r"####\s*(-?\$?[0-9][0-9.,]*)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_PUBMEDQA_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:\-]?\s*\**\s*(yes|no|maybe)\b", re.IGNORECASE)
_PUBMEDQA_WORD = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def normalise_number(text: str) -> str | None:
    """'$1,234.50.' -> '1234.5'; None when it is not a number."""
    t = text.replace("\u2212", "-").replace("$", "").replace(",", "").rstrip(".")
    try:
        value = Decimal(t)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(value.quantize(Decimal(1)))
    return format(value.normalize(), "f")


def extract_strict(text: str) -> str | None:
    """The number after the first `#### ` (GSM8K answer format), normalised."""
    m = _STRICT.search(text.replace("\u2212", "-"))
    return normalise_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number in the text, normalised (lm-eval's flexible extraction)."""
    found = _NUMBER.findall(text.replace("\u2212", "-"))
    for cand in reversed(found):
        n = normalise_number(cand)
        if n is not None:
            return n
    return None


def gsm8k_reference(answer: str) -> str:
    """The gold number of a GSM8K answer (`... #### 72`)."""
    ref = extract_strict(answer)
    if ref is None:
        raise ValueError(f"GSM8K reference without '####': {answer[-40:]!r}")
    return ref


def parse_pubmedqa(text: str) -> str | None:
    """yes / no / maybe: an explicit 'Answer: x' wins, else the first of the three words; None if absent."""
    m = _PUBMEDQA_ANSWER.search(text) or _PUBMEDQA_WORD.search(text)
    return m.group(1).lower() if m else None
