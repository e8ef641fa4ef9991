"""The consoles every ``moebench`` command prints to (results on stdout, messages on stderr)."""

from __future__ import annotations

import sys

from rich.console import Console

# piped output gets a wide table instead of rich's 80-column default
out = Console(width=None if sys.stdout.isatty() else 220)
err = Console(stderr=True)
