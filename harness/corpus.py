"""The embedded corpus: text that ships with Python, so the harness runs with no download.

Two clearly different domains, each with fixed train/validation/test splits:

- ``prose``: the interactive-help topics (``pydoc_data.topics``) and the docstrings of
  standard-library modules, one document per topic and one per module.
- ``code``: the source files of the same standard-library modules without their
  docstrings (those are prose), one document per file.

A module's docstrings and its source share one split key (the module's relative path),
so a model trained on ``prose`` train never saw the docstrings of a ``code`` test file.
Documents are ordered by the sha1 of their key; walking that order, keys go to ``test``
until it holds 5% of the characters of each domain, then to ``validation``, the rest to
``train``. That is deterministic for a given Python version, and guarantees both held-out
splits enough text. The content depends on the Python version: :func:`fingerprint` names it.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import cache, lru_cache
from pathlib import Path

from .data import SPLITS
from .errors import MoebenchError, did_you_mean

DOMAINS = ("prose", "code")
HELD_OUT = 0.05  # share of each domain's characters in validation, and again in test
MIN_CHARS = 200  # shorter documents are dropped
MAX_FILE_BYTES = 100_000  # the few huge modules (_pydecimal, turtle, ...) would dominate
# Packages whose sources join the top-level modules: ordinary library code, no tests, no data.
PACKAGES = (
    "collections", "concurrent", "email", "html", "http", "importlib", "json",
    "logging", "re", "tomllib", "urllib", "wsgiref", "xmlrpc", "zoneinfo",
)
SKIP_PARTS = {"test", "tests", "idle_test", "idlelib", "site-packages", "lib2to3", "__pycache__"}


def _stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the chosen standard-library sources, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py")]
    for package in PACKAGES:
        files += (root / package).rglob("*.py")
    chosen = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if SKIP_PARTS & set(rel.split("/")) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        chosen.append((rel, path))
    return sorted(chosen)


def _clean(text: str) -> str:
    """Strip trailing spaces and runs of blank lines; keep indentation (it matters in code)."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _split_docstrings(source: str) -> tuple[str, str]:
    """(docstrings, code): the module's, classes' and functions' docstrings in source order,
    and the source without them (a body that was only a docstring becomes ``...``).

    Docstrings go to ``prose`` only, so the two domains share no text and ``code`` is code.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return "", source
    lines = source.split("\n")
    docs, drop, stub = [], set(), {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        first = node.body[0]
        docs.append((first.lineno, doc))
        start, end = first.lineno - 1, first.end_lineno - 1
        own_lines = lines[start][: first.col_offset].strip() == "" and lines[end][first.end_col_offset :].strip() == ""
        if own_lines:  # skip the odd ``def f(): "doc"`` on one line
            drop.update(range(start, end + 1))
            if len(node.body) == 1 and not isinstance(node, ast.Module):
                stub[start] = " " * first.col_offset + "..."
    code = [stub.get(i, line) for i, line in enumerate(lines) if i not in drop or i in stub]
    return "\n\n".join(doc for _, doc in sorted(docs)), "\n".join(code)


@lru_cache(maxsize=1)
def _raw() -> dict[str, dict[str, str]]:
    """domain -> {split key: document}, before splitting."""
    from pydoc_data.topics import topics

    prose = {f"topic:{name}": _clean(text) for name, text in topics.items()}
    code = {}
    for rel, path in _stdlib_files():
        docstrings, source = _split_docstrings(path.read_bytes().decode("utf-8", errors="replace"))
        code[rel] = _clean(source)
        prose[rel] = _clean(docstrings)
    return {
        domain: {key: doc for key, doc in docs.items() if len(doc) >= MIN_CHARS}
        for domain, docs in (("prose", prose), ("code", code))
    }


def _key_order(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _split_of() -> dict[str, str]:
    """split key -> split name, filling test then validation to HELD_OUT of every domain."""
    raw = _raw()
    totals = {domain: sum(map(len, docs.values())) for domain, docs in raw.items()}
    keys = sorted({key for docs in raw.values() for key in docs}, key=_key_order)
    assignment, i = {}, 0
    for split in ("test", "validation"):
        filled = dict.fromkeys(raw, 0)
        while i < len(keys) and any(filled[d] < HELD_OUT * totals[d] for d in raw):
            key = keys[i]
            assignment[key] = split
            for domain, docs in raw.items():
                filled[domain] += len(docs.get(key, ""))
            i += 1
    for key in keys[i:]:
        assignment[key] = "train"
    return assignment


def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise MoebenchError(
            f"embedded corpus has no domain {domain!r}{did_you_mean(domain, DOMAINS)}; "
            f"expected one of {', '.join(DOMAINS)}"
        )
    if split not in SPLITS:
        raise MoebenchError(
            f"embedded corpus has no split {split!r}{did_you_mean(split, SPLITS)}; "
            f"expected one of {', '.join(SPLITS)}"
        )


@cache
def _documents(domain: str, split: str) -> tuple[str, ...]:
    split_of = _split_of()
    docs = _raw()[domain]
    return tuple(docs[key] for key in sorted(docs) if split_of[key] == split)


def documents(domain: str, split: str) -> list[str]:
    """The documents of one domain and split, in a fixed order (sorted by name)."""
    _check(domain, split)
    return list(_documents(domain, split))


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """A short hash of the corpus content, for cache keys (it changes with the Python version)."""
    digest = hashlib.sha1()
    for domain in DOMAINS:
        for split in SPLITS:
            for doc in _documents(domain, split):
                digest.update(f"{domain}/{split}/{len(doc)}\0".encode())
                digest.update(doc.encode("utf-8", errors="replace"))
    return digest.hexdigest()[:12]
