"""Calibration sampling: small splits keep their windows; large ones are sampled by document, lazily."""

from __future__ import annotations

import json

import pytest
import torch

from moebench import corpus, data, zoo
from moebench_plugins.calibration.data_sources import FileSource, JsonLines, TextBlocks


@pytest.fixture(scope="module")
def tok():
    return zoo.tokenizer()


def test_small_splits_keep_the_whole_stream_windows(tmp_path, tok):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(corpus.documents("prose", "validation")))
    expected = data.random_windows(data.encode(tok, data.load_text(f"file:{path}", "train")), 64, 4, 3)
    assert torch.equal(data.calibration_windows(f"file:{path}", tok, 64, 4, 3), expected)


def test_large_text_file_is_read_lazily_and_sampled_by_document(tmp_path, tok, monkeypatch):
    text = "\n\n".join(corpus.documents("prose", "train")[:60])
    path = tmp_path / "big.txt"
    path.write_text(text)
    monkeypatch.setattr(FileSource, "LAZY_BYTES", 1000)
    docs = FileSource().documents(str(path), "train")
    assert isinstance(docs, TextBlocks)
    assert "\n\n".join(docs) == text  # the blocks give the file back exactly
    blocks = TextBlocks(path, block=4096)
    assert len(blocks) > 5 and "\n\n".join(blocks) == text
    a = data.calibration_windows(f"file:{path}", tok, 48, 6, 0)
    assert a.shape == (6, 48) and torch.equal(a, data.calibration_windows(f"file:{path}", tok, 48, 6, 0))
    assert not torch.equal(a, data.calibration_windows(f"file:{path}", tok, 48, 6, 1))
    for window in a:  # each window is text of the file, not a splice of unrelated pieces
        assert tok.decode(window)[4:-4] in text


def test_one_huge_document_is_cut_before_tokenizing(tok):
    doc = "\n\n".join(corpus.documents("prose", "train")) * 3
    calls = []

    class Counting:
        backend_tokenizer = None

        def __call__(self, text, add_special_tokens=False):
            calls.append(len(text))
            return tok(text, add_special_tokens=add_special_tokens)

    out = data.sample_windows([doc], Counting(), 32, 3, 0)
    assert out.shape == (3, 32)
    assert max(calls) <= 2 * 32 * 8 * 4 < len(doc) // 100  # spans of a few hundred characters, never the document


def test_large_jsonl_is_indexed_by_line(tmp_path, tok, monkeypatch):
    rows = corpus.documents("code", "train")[:40]
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(json.dumps({"text": r}) for r in rows) + "\n\n")
    monkeypatch.setattr(FileSource, "LAZY_BYTES", 1000)
    docs = FileSource().documents(str(path), "train")
    assert isinstance(docs, JsonLines) and len(docs) == 40 and docs[7] == rows[7] and list(docs)[-1] == rows[-1]
    assert data.calibration_windows(f"file:{path}", tok, 32, 4, 0).shape == (4, 32)
