"""Offline lm-eval tasks built from the embedded corpus, so lm-eval runs with no download.

Both tasks are four-way multiple choice over the *held-out* prose of the embedded
corpus (:mod:`moebench.corpus`: interactive-help topics and standard-library
docstrings): items are evaluated from its ``test`` split and few-shot examples come
from its ``validation`` split; the zoo models never trained on either.

- ``pydoc_mc``: passage continuation. The context is ~48 words of a document; the
  choices are its true next 8 words and three copies of them with one pair of
  adjacent words swapped. Every choice holds the same words, so how common they are
  cancels out and only the model's sense of what reads on from the context decides
  (spans from other documents, tried first, left a toy model near chance).
- ``pydoc_cloze``: next-word cloze. The context is ~48 words; the choices are the true
  next word and three other words of the same document (so topic alone does not
  give the answer away).

- ``pydoc_gen``: next-word generation (``generate_until``, GSM8K's shape: generate,
  extract the answer with a regex filter, exact match). The context is ~48 words; the
  model generates greedily until a line break (at most 8 tokens), the filter keeps the
  first word of what it wrote, and that must equal the true next word as written
  (punctuation included). Generation settings and a chat template come from the suite
  (``gen_kwargs``, ``apply_chat_template``), as with any lm-eval generation task.

Chance is 25% on the two multiple-choice tasks. Items are built deterministically (seeded per task and split)
and shuffled once, so lm-eval's ``limit`` takes a spread of documents. The YAML
configs and their ``custom_dataset`` loader live in ``moebench_plugins/metrics/tasks`` (:data:`TASKS_DIR`).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from pathlib import Path

from moebench import corpus

TASKS_DIR = Path(__file__).parent / "tasks"
TASKS = ("pydoc_mc", "pydoc_cloze")
#: generation tasks (slow next to log-likelihood ones, so not in the default task list)
GENERATION_TASKS = ("pydoc_gen",)
DOMAIN = "prose"
SPLITS = {"test": "test", "validation": "validation"}  # lm-eval split -> corpus split

CHOICES = 4
CONTEXT_WORDS = 48
MC_CHOICE_WORDS = 8
MC_STRIDE = 16  # words between consecutive continuation items of one document
CLOZE_STRIDE = 12
MAX_ITEMS = 600  # per split, after shuffling
_WORD = re.compile(r"\S+")
_CLOZE_WORD = re.compile(r"[A-Za-z]{4,}")


def _spans(doc: str) -> list[tuple[int, int]]:
    return [m.span() for m in _WORD.finditer(doc)]


def _documents(split: str):
    """``(index, document, word spans, words)`` of each document of a split, in corpus order."""
    for d, doc in enumerate(corpus.documents(DOMAIN, SPLITS[split])):
        spans = _spans(doc)
        yield d, doc, spans, [doc[a:b] for a, b in spans]


def _context(doc: str, spans: list[tuple[int, int]], i: int) -> str:
    """The ``CONTEXT_WORDS`` words before word ``i``, as written (line breaks kept)."""
    return doc[spans[max(0, i - CONTEXT_WORDS)][0] : spans[i - 1][1]]


def _finish(items: list[dict], rng: random.Random) -> list[dict]:
    rng.shuffle(items)
    items = items[:MAX_ITEMS]
    for n, item in enumerate(items):
        item["id"] = n
    return items


@lru_cache(maxsize=None)
def mc_items(split: str, seed: int = 0) -> tuple[dict, ...]:
    """Continuation items: ``{context, choices, label, doc}``, the label indexing the true continuation."""
    rng = random.Random(f"pydoc_mc/{split}/{seed}")
    k = MC_CHOICE_WORDS
    items = []
    for d, doc, words, _ in _documents(split):
        for i in range(CONTEXT_WORDS, len(words) - k, MC_STRIDE):
            span = [doc[a:b] for a, b in words[i : i + k]]
            choices = [" ".join(span)]
            for j in rng.sample(range(k - 1), k - 1):  # swap one adjacent pair per distractor
                swapped = span[:j] + [span[j + 1], span[j]] + span[j + 2 :]
                if " ".join(swapped) not in choices:
                    choices.append(" ".join(swapped))
                if len(choices) == CHOICES:
                    break
            if len(choices) < CHOICES:
                continue
            true = choices[0]
            rng.shuffle(choices)
            items.append({"context": _context(doc, words, i), "choices": choices, "label": choices.index(true), "doc": d})
    return tuple(_finish(items, rng))


@lru_cache(maxsize=None)
def cloze_items(split: str, seed: int = 0) -> tuple[dict, ...]:
    """Next-word items: ``{context, choices, label, doc}``; distractors are other words of the same document."""
    rng = random.Random(f"pydoc_cloze/{split}/{seed}")
    items = []
    for d, doc, words, texts in _documents(split):
        eligible = [i for i, t in enumerate(texts) if _CLOZE_WORD.fullmatch(t)]
        vocabulary = sorted({texts[i] for i in eligible})
        if len(vocabulary) < CHOICES:
            continue
        next_at = CONTEXT_WORDS
        for i in eligible:
            if i < next_at:
                continue
            target = texts[i]
            distractors = rng.sample([w for w in vocabulary if w != target], CHOICES - 1)
            choices = [target, *distractors]
            rng.shuffle(choices)
            items.append({"context": _context(doc, words, i), "choices": choices, "label": choices.index(target), "doc": d})
            next_at = i + CLOZE_STRIDE
    return tuple(_finish(items, rng))


@lru_cache(maxsize=None)
def gen_items(split: str, seed: int = 0) -> tuple[dict, ...]:
    """Next-word generation items: ``{context, target, doc}``, the target being the next word as written."""
    rng = random.Random(f"pydoc_gen/{split}/{seed}")
    items = []
    for d, doc, words, texts in _documents(split):
        for i in range(CONTEXT_WORDS, len(words), CLOZE_STRIDE):
            if _CLOZE_WORD.fullmatch(texts[i]):  # a real word, not a symbol or a number
                items.append({"context": _context(doc, words, i), "target": texts[i], "doc": d})
    return tuple(_finish(items, rng))


BUILDERS = {"pydoc_mc": mc_items, "pydoc_cloze": cloze_items, "pydoc_gen": gen_items}


def dataset(task: str, seed: int = 0):
    """The task as a ``datasets.DatasetDict`` with ``test`` and ``validation`` splits (what lm-eval loads)."""
    import datasets

    build = BUILDERS[task]
    return datasets.DatasetDict({split: datasets.Dataset.from_list([dict(x) for x in build(split, seed)]) for split in SPLITS})
