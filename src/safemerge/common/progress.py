"""One switch for every progress bar of a command (`-q/--quiet`): safemerge's own bars read
`SHOW_PROGRESS`, and `progress_bars(False)` also turns off transformers' bars (weight loading), whose
switch covers huggingface_hub's (downloads), for the block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

# False while a command runs with --quiet (or `evaluate_model(quiet=True)`): no progress bars.
SHOW_PROGRESS: ContextVar[bool] = ContextVar("safemerge_show_progress", default=True)


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Progress bars on or off for the block, safemerge's and the libraries'; restored afterwards."""
    token = SHOW_PROGRESS.set(shown)
    libraries_on = False
    if not shown:
        from transformers.utils import logging as hf_logging  # lazy: slow, and only `-q` needs it

        libraries_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        SHOW_PROGRESS.reset(token)
        if libraries_on:
            hf_logging.enable_progress_bar()
