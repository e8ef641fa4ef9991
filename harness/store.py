"""The result store: one JSON line per run, appended and flushed the moment a run ends.

Each record is written with a single ``write`` of one line followed by ``fsync``, so a
killed process leaves at worst a partial last line; readers skip it and the next append
truncates it first. Finished records are never rewritten. A disk that refuses the line
(full, over quota, over a file-size limit, read-only) gets the file cut back to its last
whole line and a one-line :class:`DiskFull` error, so ``--resume`` continues from there.
Readers skip lines that are not records and say how many (``skipped``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from .record import Record
from .errors import MoebenchError


class DiskFull(MoebenchError):
    """The disk refused a record: the results file is left whole, up to the last finished run."""


#: fields every record has (what reports index by)
RECORD_FIELDS = {"run_id": str, "status": str}


def record_problem(obj: Any) -> str | None:
    """Why a parsed JSON line is not a run record, or None when it is one."""
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__ if obj is not None else 'null'}, not a record"
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(obj.get(key), kind):
            return f"a record without a {key} string"
    if not isinstance(obj.get("name", ""), str):
        return "a record whose name is not a string"
    if not isinstance(obj.get("metrics", {}), dict):
        return "a record whose metrics is not a table"
    if not isinstance(obj.get("pipeline", []), list):
        return "a record whose pipeline is not a list"
    return None


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
        line = (json.dumps(record, sort_keys=False, default=_jsonable) + "\n").encode("utf-8")
        try:
            self._drop_partial_tail()
            size = self.path.stat().st_size if self.path.exists() else 0
        except OSError as exc:
            raise DiskFull(f"{self.path}: cannot write the results file ({exc.strerror or exc})") from None
        try:
            with open(self.path, "ab") as fh:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            self._cut_back(size)
            raise DiskFull(
                f"{self.path}: the disk refused the record of run {record.get('name', '?')!r} "
                f"({exc.strerror or exc}); runs finished before it are kept; free space, then continue with --resume"
            ) from None

    def _cut_back(self, size: int) -> None:
        """Drop whatever part of a refused line reached the file (shrinking needs no space)."""
        try:
            if self.path.exists() and self.path.stat().st_size > size:
                os.truncate(self.path, size)
        except OSError:
            pass  # readers skip a partial last line, and the next append cuts it

    def _drop_partial_tail(self) -> None:
        """Cut a line a killed writer left half-written, so the file stays valid JSON lines."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if data.endswith(b"\n"):
                return
            fh.truncate(data.rfind(b"\n") + 1)


def read_records(path: str | os.PathLike, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Complete records of a results file; lines that are not records are skipped.

    ``skipped``, when given, receives ``"FILE:LINE: why"`` for each skipped line (a
    partial last line, invalid JSON, JSON that is not a record).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.exists():
        raise MoebenchError(f"{path}: results file not found")
    if not path.is_file():
        raise MoebenchError(f"{path}: not a results file")
    note = skipped.append if skipped is not None else (lambda _: None)
    try:
        with open(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    note(f"{path}:{number}: partial last line (a run was cut off while writing)")
                    break
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    note(f"{path}:{number}: not UTF-8 text")
                    continue
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    note(f"{path}:{number}: not valid JSON")
                    continue
                problem = record_problem(obj)
                if problem:
                    note(f"{path}:{number}: {problem}")
                    continue
                yield obj
    except OSError as exc:
        raise MoebenchError(f"{path}: cannot read the results file ({exc.strerror or exc})") from None


def skipped_summary(skipped: list[str], shown: int = 3) -> str:
    """One line: how many lines were skipped, and why (the first few named)."""
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"skipped {len(skipped)} line(s) that are not records: " + "; ".join(skipped[:shown]) + more


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
