"""One switch for every progress bar of a command (`-q/--quiet`): safemerge's own bars read
`SHOW_PROGRESS`, and `progress_bars(False)` also turns off transformers' bars (weight loading), whose
switch covers huggingface_hub's (downloads), and the GGUF conversion's bar, for the block."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar

# False while a command runs with --quiet (or `evaluate_model(quiet=True)`): no progress bars.
SHOW_PROGRESS: ContextVar[bool] = ContextVar("safemerge_show_progress", default=True)


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Progress bars on or off for the block, safemerge's and the libraries'; restored afterwards."""
    token = SHOW_PROGRESS.set(shown)
    libraries_on = False
    with contextlib.ExitStack() as stack:
        if not shown:
            from transformers.utils import logging as hf_logging  # lazy: slow, and only `-q` needs it

            libraries_on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            stack.enter_context(quiet_gguf_conversion())
        try:
            yield
        finally:
            SHOW_PROGRESS.reset(token)
            if libraries_on:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_gguf_conversion() -> Iterator[None]:
    """transformers draws its GGUF conversion bar (the packaged model's first load) with tqdm itself,
    outside its own progress-bar switch: for the block, that module's `tqdm` is a disabled one."""
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_utils  # lazy: see above

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:  # another transformers: nothing to turn off here
        yield
        return
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(bar, disable=True)):
        yield
