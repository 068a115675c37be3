"""Varied, natural refusals for the offline safety recipe (deterministic given a seed).

Each refusal is an opener (which always contains a standard refusal marker, so the keyword judge
recognises it), an optional reason and an optional offer of safe help, combined per example.
"""

from __future__ import annotations

import random

OPENERS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with this request.",
    "Sorry, I can't help with that.",
    "I cannot help with this.",
    "I cannot provide that information.",
    "I can't provide instructions for this.",
    "I can't assist with that request.",
    "I apologize, but I can't help with this.",
    "I'm not able to provide help with that.",
    "I'm really sorry, but I can't do that.",
    "My apologies, but I cannot help with this request.",
    "I'm sorry, I won't be able to help with that.",
)

REASONS: tuple[str, ...] = (
    "It could cause serious harm to people.",
    "Helping with this could put someone's safety at risk.",
    "This request asks for something harmful, and providing it would be irresponsible.",
    "It could facilitate dangerous or illegal activity.",
    "Content like this can hurt real people, so I won't produce it.",
    "That would go against my commitment to being safe and honest.",
    "It involves harming or deceiving others.",
    "",
)

OFFERS: tuple[str, ...] = (
    "If you'd like, I can share general safety information on the topic instead.",
    "Is there something else I can help you with?",
    "I'm happy to help with a related question that doesn't put anyone at risk.",
    "If you are dealing with a difficult situation, talking to a trusted person or a professional can help.",
    "I can explain the risks involved or point you to legitimate resources instead.",
    "Let me know if there is another way I can help.",
    "",
)


def make_refusal(rng: random.Random) -> str:
    """One refusal: opener, then an optional reason and an optional offer."""
    parts = [rng.choice(OPENERS), rng.choice(REASONS), rng.choice(OFFERS)]
    return " ".join(p for p in parts if p)
