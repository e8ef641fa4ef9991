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
from typing import ClassVar, Protocol, Sequence

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

    def documents(self, arg: str, split: str) -> Sequence[str]:
        """The split's documents, in a fixed order.

        A list, or for large data any lazy sequence (``len`` and indexing) that reads a
        document when it is indexed, so calibration can sample a few documents of a
        large split without holding it (:func:`calibration_windows`).
        """
        ...


def documents(spec: str | DataSpec, split: str) -> Sequence[str]:
    """The split's documents from the spec's data source (possibly a lazy sequence)."""
    from .plugins import host

    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    if split not in SPLITS:
        raise MoebenchError(f"data split {split!r}: expected one of {', '.join(SPLITS)}")
    docs = host().data_source(spec.scheme).documents(spec.arg, split)
    if not len(docs):
        raise MoebenchError(f"data {spec} has no text in split {split!r}")
    return docs


def load_text(spec: str | DataSpec, split: str) -> str:
    """The whole split of a data spec as one string (documents separated by blank lines)."""
    return "\n\n".join(documents(spec, split))


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


#: splits up to this many characters are tokenized whole and windows cut from the stream
#: (every embedded split; the windows existing results were measured on). Larger ones,
#: and lazy sequences, are sampled document by document (:func:`sample_windows`).
WHOLE_SPLIT_CHARS = 8_000_000


def calibration_windows(spec: str | DataSpec, tokenizer, seqlen: int, samples: int, seed: int) -> torch.Tensor:
    """``samples`` calibration windows of ``seqlen`` tokens from the spec's train split.

    Small splits: tokenized whole, windows at seeded random offsets (:func:`random_windows`).
    Large splits (C4, WikiText-2, big local files): documents are sampled first and only
    those are tokenized, so time and peak memory do not grow with the dataset.
    """
    docs = documents(spec, "train")
    if isinstance(docs, list) and sum(map(len, docs)) <= WHOLE_SPLIT_CHARS:
        return random_windows(encode(tokenizer, "\n\n".join(docs)), seqlen, samples, seed)
    return sample_windows(docs, tokenizer, seqlen, samples, seed)


def sample_windows(docs: Sequence[str], tokenizer, seqlen: int, samples: int, seed: int) -> torch.Tensor:
    """GPTQ-style calibration sampling: a random document, then a random ``seqlen`` window in it.

    As in the GPTQ reference (``get_c4``: uniform document, uniform offset), except that
    a document shorter than a window is continued with the documents after it (joined by
    a blank line, as :func:`load_text` joins them) instead of being redrawn, so short-
    document sources (WikiText-2's paragraphs) work too; and a document much longer than
    a window is cut to a random character span first (its first, possibly partial, token
    dropped), so a single multi-gigabyte document costs no more than a short one.
    """
    rng = random.Random(seed)
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def ids_of(text: str) -> list[int]:
        if backend is not None:
            return backend.encode(text, add_special_tokens=False).ids
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    n = len(docs)
    out = []
    for _ in range(samples):
        i = rng.randrange(n)
        need = seqlen * 8  # characters: about twice a window at 4 characters per token
        while True:
            text, j = docs[i], i + 1
            while len(text) < need and j < i + n:
                text += "\n\n" + docs[j % n]
                j += 1
            cut = 0
            if len(text) > 2 * need:
                cut = rng.randrange(len(text) - need)
                text = text[cut : cut + need]
            ids = ids_of(text)[1 if cut else 0 :]
            if len(ids) > seqlen or need > 64 * seqlen * 8 or j >= i + n:
                break
            need *= 4
        if len(ids) <= seqlen:
            raise MoebenchError(f"calibration text has {len(ids)} tokens from document {i} onwards, needs more than seqlen={seqlen}")
        start = rng.randrange(0, len(ids) - seqlen)
        out.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
    return torch.stack(out)
