"""Errors a user can act on: one line naming what was wrong and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoebenchError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits 2."""


class SuiteError(MoebenchError):
    """A suite file that does not match the schema: names the file, the field and what was expected."""

    def __init__(self, file: str, field: str, message: str):
        self.file, self.field = file, field
        super().__init__(f"{file}: {field}: {message}")


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when ``word`` is close to one of ``choices``, else ``''``."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
