"""The consoles every ``moebench`` command prints to (results on stdout, messages on stderr)."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console

# piped output gets a wide table instead of rich's 80-column default
out = Console(width=None if sys.stdout.isatty() else 220)
err = Console(stderr=True)


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' own progress bars off for a block (loading or saving a checkpoint
    moebench already announced), restored after; scripts and the CLI print the same."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
