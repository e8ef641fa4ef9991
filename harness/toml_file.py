"""Reading a TOML file (a suite) with one-line errors naming the file.

Kept apart from :mod:`moebench.suite` so that modules the suite parser uses (the
``[compare]`` table's parser) can read a suite file without importing the parser back.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from .errors import MoebenchError, SuiteError


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A suite file's raw tables; a missing file or bad TOML is a one-line error naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise MoebenchError(f"{path}: suite file not found")
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(path, "toml", f"not valid TOML ({exc})") from None
