"""The embedded corpus and the built-in data sources (embedded:, file:)."""

from __future__ import annotations

import json
import re

import pytest

from moebench import corpus
from moebench.data import SPLITS
from moebench.errors import MoebenchError
from moebench_plugins.calibration.data_sources import EmbeddedSource, FileSource, register_data_sources


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_every_split_has_enough_text(domain):
    sizes = {split: sum(map(len, corpus.documents(domain, split))) for split in SPLITS}
    assert sizes["validation"] >= 50_000 and sizes["test"] >= 50_000, sizes
    assert sizes["train"] > 8 * (sizes["validation"] + sizes["test"]) / 2, sizes
    assert all(doc == doc.strip("\n") and len(doc) >= corpus.MIN_CHARS for s in SPLITS for doc in corpus.documents(domain, s))


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_splits_are_disjoint(domain):
    seen = [set(corpus.documents(domain, split)) for split in SPLITS]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_module_docstrings_and_source_share_a_split():
    # A module's docstrings (prose) must not be trained on while its source (code) is held out.
    raw, split_of = corpus._raw(), corpus._split_of()
    shared = set(raw["prose"]) & set(raw["code"])
    assert len(shared) > 100
    for key in sorted(shared)[::10]:
        split = split_of[key]
        assert raw["prose"][key] in corpus.documents("prose", split)
        assert raw["code"][key] in corpus.documents("code", split)


def test_deterministic_and_copied():
    a = corpus.documents("code", "validation")
    a.append("mutating the returned list must not change the corpus")
    assert corpus.documents("code", "validation") == a[:-1]
    assert re.fullmatch(r"[0-9a-f]{12}", corpus.fingerprint())


def test_domains_differ():
    def share_of_def_lines(domain):
        lines = "\n".join(corpus.documents(domain, "validation")).splitlines()
        return sum(bool(re.match(r"\s*def ", line)) for line in lines) / len(lines)

    assert share_of_def_lines("code") > 0.03
    assert share_of_def_lines("prose") < 0.005


def test_bad_domain_and_split():
    with pytest.raises(MoebenchError, match=r"'prse'.*did you mean 'prose'.*prose, code"):
        corpus.documents("prse", "train")
    with pytest.raises(MoebenchError, match=r"'valid'.*did you mean 'validation'"):
        corpus.documents("code", "valid")


def test_embedded_source_is_registered():
    sources = {cls.scheme: cls for cls in register_data_sources()}
    assert set(sources) >= {"embedded", "file", "hf"}
    assert EmbeddedSource().documents("prose", "test") == corpus.documents("prose", "test")


def test_file_source_folder_single_file_and_jsonl(tmp_path):
    (tmp_path / "train.txt").write_text("train text")
    (tmp_path / "valid.txt").write_text("validation text")
    (tmp_path / "test.txt").write_text("test text")
    source = FileSource()
    assert source.documents(str(tmp_path), "train") == ["train text"]
    assert source.documents(str(tmp_path), "validation") == ["validation text"]
    assert source.documents(str(tmp_path), "test") == ["test text"]

    single = tmp_path / "notes.txt"
    single.write_text("the same text for every split")
    assert {tuple(source.documents(str(single), s)) for s in SPLITS} == {("the same text for every split",)}

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n\n")
    assert source.documents(str(rows), "test") == ["one", "two"]
    rows.write_text('{"body": "no text field"}\n')
    with pytest.raises(MoebenchError, match=r"line 1: expected a JSON object with a 'text' field"):
        source.documents(str(rows), "test")


def test_file_source_errors_name_the_path(tmp_path):
    with pytest.raises(MoebenchError, match=r"no such file or folder.*missing\.txt"):
        FileSource().documents(str(tmp_path / "missing.txt"), "test")
    (tmp_path / "test.txt").write_text("only a test split")
    with pytest.raises(MoebenchError, match=r"no file for split 'train'.*train\.txt"):
        FileSource().documents(str(tmp_path), "train")
