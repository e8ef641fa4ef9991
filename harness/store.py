"""The result store: one JSON line per run, appended and flushed the moment a run ends.

Each record is written with a single ``write`` of one line followed by ``fsync``, so a
killed process leaves at worst a partial last line; readers skip it and the next append
truncates it first. Finished records are never rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .record import Record


class ResultStore:
    """``results.jsonl`` in a run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        return list(read_records(self.path))

    def typed(self) -> list[Record]:
        """The records as :class:`moebench.record.Record` s."""
        return [Record.from_dict(r) for r in read_records(self.path)]

    def finished_ids(self) -> set[str]:
        """Run ids with an ``ok`` record (failed runs are retried on resume)."""
        return {r.run_id for r in self.typed() if r.ok}

    def append(self, record: dict[str, Any] | Record) -> None:
        if isinstance(record, Record):
            record = record.to_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=False, default=_jsonable) + "\n"
        self._drop_partial_tail()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def _drop_partial_tail(self) -> None:
        """Cut a line a killed writer left half-written, so the file stays valid JSON lines."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            fh.truncate(data.rfind(b"\n") + 1)


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Complete records of a results file (a partial last line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        from .errors import MoebenchError

        raise MoebenchError(f"{path}: results file not found")
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
