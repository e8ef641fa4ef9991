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
    if os.path.isdir(path):
        raise MoebenchError(f"{path}: is a folder; expected a suite TOML file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read the suite file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SuiteError(path, "toml", f"not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); expected a UTF-8 TOML file") from None
    if not text.strip():
        raise SuiteError(path, "toml", "empty file; expected a suite with at least a [model] table")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(path, "toml", f"not valid TOML ({exc})") from None
    if not raw:
        raise SuiteError(path, "toml", "empty file (only comments or blank lines); expected a suite with at least a [model] table")
    return raw
