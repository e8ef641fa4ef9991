"""Text for calibration and evaluation: data specs, sources, and token windows.

A data spec is a string ``SCHEME:ARG`` (``embedded:prose``, ``file:notes.txt``,
``hf:wikitext2``). Each scheme is a :class:`DataSource` registered by a plugin, so a
third party can add ``s3:`` or ``mydata:`` without touching the harness.
"""

from __future__ import annotations

import hashlib
import random
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .errors import MoebenchError

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``SCHEME:ARG`` data spec."""

    scheme: str
    arg: str

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        scheme, sep, arg = str(text).partition(":")
        if not sep or not scheme or not arg:
            raise MoebenchError(
                f"data spec {text!r}: expected SCHEME:ARG, e.g. 'embedded:prose', 'file:PATH', 'hf:wikitext2'"
            )
        return cls(scheme, arg)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.arg}"


class DataSource(Protocol):
    """Turns the ARG of a data spec into documents for a split."""

    scheme: ClassVar[str]

    def documents(self, arg: str, split: str) -> list[str]:
        """The split's documents, in a fixed order."""
        ...


def load_text(spec: str | DataSpec, split: str) -> str:
    """The whole split of a data spec as one string (documents separated by blank lines)."""
    from .plugins import host

    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    if split not in SPLITS:
        raise MoebenchError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    source = host().data_source(spec.scheme)
    docs = source.documents(spec.arg, split)
    if not docs:
        raise MoebenchError(f"data {spec} has no text in split {split!r}")
    return "\n\n".join(docs)


#: token streams of recent (tokenizer, text) pairs: every run of a suite evaluates the same
#: text with the same tokenizer, and tokenizing a long split costs seconds
_ENCODED: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
_ENCODED_MAX = 8
_TOKENIZER_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_key(tokenizer) -> str | None:
    """A content hash of a fast tokenizer (its full definition), or None (then nothing is cached)."""
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    key = hashlib.sha1(backend.to_str().encode()).hexdigest()
    try:
        _TOKENIZER_KEYS[tokenizer] = key
    except TypeError:
        pass
    return key


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one long 1-D tensor, without special tokens (cached per tokenizer and text)."""
    from transformers.utils import logging

    tok_key = _tokenizer_key(tokenizer)
    key = (tok_key, hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()) if tok_key else None
    if key in _ENCODED:
        _ENCODED.move_to_end(key)
        return _ENCODED[key].clone()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a long stream is expected here; windows are cut afterwards
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        logging.set_verbosity(verbosity)
    ids = torch.tensor(ids, dtype=torch.long)
    if key is not None:
        _ENCODED[key] = ids.clone()
        while len(_ENCODED) > _ENCODED_MAX:
            _ENCODED.popitem(last=False)
    return ids


def windows(ids: torch.Tensor, seqlen: int, max_samples: int | None = None) -> torch.Tensor:
    """Fixed non-overlapping windows ``[n, seqlen]`` from the start of ``ids`` (the GPTQ/WANDA protocol)."""
    n = ids.numel() // seqlen
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise MoebenchError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def random_windows(ids: torch.Tensor, seqlen: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets (calibration sampling)."""
    if ids.numel() <= seqlen:
        raise MoebenchError(f"calibration text has {ids.numel()} tokens, needs more than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seqlen) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])
