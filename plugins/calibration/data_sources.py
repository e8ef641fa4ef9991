"""Built-in data sources: ``embedded:`` (ships with Python), ``file:`` (local text), ``hf:`` (Hugging Face datasets).

Each is a class with a ``scheme``, ``documents(arg, split)`` and optionally ``check(arg, split)``
(run before a suite starts, offline); the harness joins a
split's documents with blank lines (:func:`moebench.data.load_text`).
"""

from __future__ import annotations

import json
import mmap
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from moebench import corpus
from moebench.errors import MoebenchError, did_you_mean
from moebench.hookspecs import hookimpl


class EmbeddedSource:
    """``embedded:prose`` or ``embedded:code``: the embedded corpus (:mod:`moebench.corpus`), no download."""

    scheme: ClassVar[str] = "embedded"

    def documents(self, arg: str, split: str) -> list[str]:
        return corpus.documents(arg, split)

    def check(self, arg: str, split: str | None) -> None:
        """The domain exists (every domain has every split)."""
        if arg not in corpus.DOMAINS:
            raise MoebenchError(f"data embedded:{arg}: no such domain{did_you_mean(arg, corpus.DOMAINS)}; expected one of {', '.join(corpus.DOMAINS)}")


# File names tried, in order, for each split when ``file:`` points at a folder
# (plain names, WikiText's raw release names, JSON lines).
SPLIT_FILES = {
    "train": ("train.txt", "wiki.train.raw", "train.jsonl"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.raw", "valid.jsonl", "validation.jsonl"),
    "test": ("test.txt", "wiki.test.raw", "test.jsonl"),
}


class FileSource:
    """``file:PATH``: local text.

    - a folder: one file per split, e.g. ``train.txt`` / ``valid.txt`` (or ``validation.txt``)
      / ``test.txt``, as WikiText-2 raw is laid out; a split with no file is an error.
    - a single file: the whole file is used for *every* split (so calibrating and evaluating on
      it see the same text; point at a folder to keep them apart).

    ``.jsonl`` files give one document per line, from its ``text`` field; any other file
    is one document. A file over ``LAZY_BYTES`` is not read whole: it is memory-mapped and
    read a document (a JSON line, or a stretch of text between blank lines) at a time, so
    calibration samples from a file of any size in bounded memory.
    """

    LAZY_BYTES: ClassVar[int] = 64 * 2**20

    scheme: ClassVar[str] = "file"

    def documents(self, arg: str, split: str) -> Sequence[str]:
        path = Path(arg).expanduser()
        if path.is_dir():
            for name in SPLIT_FILES.get(split, ()):
                if (path / name).is_file():
                    return self._read(path / name)
            raise MoebenchError(
                f"data file:{arg}: no file for split {split!r} in that folder "
                f"(looked for {', '.join(SPLIT_FILES.get(split, ()))})"
            )
        if not path.is_file():
            raise MoebenchError(f"data file:{arg}: no such file or folder: {path}")
        return self._read(path)

    def check(self, arg: str, split: str | None) -> None:
        """The file or folder exists, and a folder has a file for ``split`` (checked before a run starts)."""
        path = Path(arg).expanduser()
        if path.is_dir():
            if split is not None and not any((path / name).is_file() for name in SPLIT_FILES.get(split, ())):
                raise MoebenchError(
                    f"data file:{arg}: no file for split {split!r} in that folder (looked for {', '.join(SPLIT_FILES.get(split, ()))})"
                )
        elif not path.is_file():
            raise MoebenchError(f"data file:{arg}: no such file or folder: {path}")

    @classmethod
    def _read(cls, path: Path) -> Sequence[str]:
        try:
            if path.stat().st_size > cls.LAZY_BYTES:
                return JsonLines(path) if path.suffix == ".jsonl" else TextBlocks(path)
        except OSError as exc:
            raise MoebenchError(f"data file:{path}: cannot read it ({exc})") from None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MoebenchError(f"data file:{path}: cannot read it as UTF-8 text ({exc})") from None
        if path.suffix != ".jsonl":
            return [text]
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                docs.append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise MoebenchError(f"data file:{path}: line {number}: expected a JSON object with a 'text' field") from None
        return docs


class _Mapped(Sequence):
    """Documents of a memory-mapped file, located by byte offsets: ``[start, end)`` pairs."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            self.map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.starts, self.ends = array("q"), array("q")

    def __len__(self) -> int:
        return len(self.starts)

    def _bytes(self, i: int) -> bytes:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.map[self.starts[i] : self.ends[i]]

    def _text(self, i: int) -> str:
        try:
            return self._bytes(i).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MoebenchError(f"data file:{self.path}: cannot read it as UTF-8 text ({exc})") from None


class TextBlocks(_Mapped):
    """A large text file as stretches of about ``block`` bytes that start and end at blank lines.

    Stretch ``i`` runs from the first blank line at or after byte ``i * block`` to the first
    at or after ``(i + 1) * block``, found when it is read: nothing scans the file up front,
    so opening a file of any size costs nothing. Where every stretch holds a blank line,
    joining them with one (as :func:`moebench.data.load_text` does) gives the text back.
    """

    def __init__(self, path: Path, block: int = 2**20):
        super().__init__(path)
        self.block = block
        self.size = len(self.map)

    def __len__(self) -> int:
        return max(1, -(-self.size // self.block))

    def _boundary(self, pos: int) -> int:
        """Offset of the first blank line at or after ``pos`` (the file's end if none)."""
        if pos <= 0:
            return 0
        if pos >= self.size:
            return self.size
        cut = self.map.find(b"\n\n", pos)
        return self.size if cut < 0 else cut

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        start = self._boundary(i * self.block)
        start = start + 2 if i > 0 and start < self.size else start
        end = self._boundary((i + 1) * self.block)
        try:
            return self.map[start : max(start, end)].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MoebenchError(f"data file:{self.path}: cannot read it as UTF-8 text ({exc})") from None


class JsonLines(_Mapped):
    """A large ``.jsonl`` file: one document per non-blank line, from its ``text`` field."""

    def __init__(self, path: Path):
        super().__init__(path)
        pos, size = 0, len(self.map)
        while pos < size:
            end = self.map.find(b"\n", pos)
            end = size if end < 0 else end
            if self.map[pos:end].strip():
                self.starts.append(pos)
                self.ends.append(end)
            pos = end + 1

    def __getitem__(self, i):
        line = self._text(i)
        try:
            return json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MoebenchError(f"data file:{self.path}: document {i}: expected a JSON object with a 'text' field") from None


class Column(Sequence):
    """A Hugging Face dataset's ``text`` column, read row by row from its memory-mapped Arrow files."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.rows[i]["text"]


class HFSource:
    """``hf:NAME``: a Hugging Face dataset's ``text`` column (needs the network, or the datasets cache).

    Names researchers use are mapped as in the GPTQ/WANDA code:

    - ``hf:wikitext2``: ``wikitext`` / ``wikitext-2-raw-v1``, one document per row (the
      blank-line join then reproduces the usual ``"\\n\\n".join(rows)``).
    - ``hf:c4``: ``allenai/c4``, first English shard: train split from
      ``c4-train.00000-of-01024``, validation *and* test from ``c4-validation.00000-of-00008``
      (C4 has no test split).

    Anything else is ``hf:NAME`` or ``hf:NAME:CONFIG``, where NAME may be a hub id with an
    owner (``hf:Salesforce/wikitext:wikitext-103-raw-v1``); a colon separates the config because
    a slash already belongs to hub ids.
    """

    scheme: ClassVar[str] = "hf"

    C4_FILES: ClassVar[dict[str, str]] = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
        "test": "en/c4-validation.00000-of-00008.json.gz",
    }

    def documents(self, arg: str, split: str) -> Sequence[str]:
        try:
            import datasets
        except ImportError:
            raise MoebenchError(
                f"data hf:{arg} needs the 'datasets' package (pip install datasets); "
                "or use file:PATH or embedded:prose"
            ) from None
        try:
            if arg == "wikitext2":
                rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            elif arg == "c4":
                file = self.C4_FILES[split]
                rows = datasets.load_dataset("allenai/c4", data_files={"data": file}, split="data")
            else:
                name, _, config = arg.partition(":")
                rows = datasets.load_dataset(name, config or None, split=split)
        except Exception as exc:  # offline, unknown name, missing split: all end the same way for the user
            raise MoebenchError(
                f"data hf:{arg} split {split!r} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "without network, use file:PATH (a local copy) or embedded:prose / embedded:code"
            ) from None
        if "text" not in rows.column_names:
            raise MoebenchError(f"data hf:{arg} has no 'text' column (columns: {', '.join(rows.column_names)})")
        return Column(rows)  # lazy: calibration samples rows; load_text reads them all


@hookimpl
def register_data_sources():
    return [EmbeddedSource, FileSource, HFSource]
