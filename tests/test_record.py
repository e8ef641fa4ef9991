"""The typed record: results files written by earlier versions load and write back byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench.record import Record
from moebench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]

#: a record as moebench wrote it before ``evals`` existed, plus a field this version does not know
OLDER = {
    "run_id": "0123456789ab", "suite": "old", "name": "drop", "entry": "drop", "grid": {"keep_ratio": 0.5}, "status": "failed",
    "pipeline": [{"method": "expert_drop", "params": {"keep_ratio": 0.5}}], "model": {"source": "zoo:mixtral", "dtype": "float32"},
    "metrics": {}, "changes": {}, "notes": ["a note"], "error": "RuntimeError: boom", "traceback": "Traceback ...",
    "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:00:01+00:00", "from_a_plugin": {"x": 1},
}


def test_baseline_results_round_trip_byte_for_byte(tmp_path):
    lines = (ROOT / "reports" / "baselines" / "ci.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    store = ResultStore(tmp_path / "results.jsonl")
    for line in lines:
        record = Record.from_dict(json.loads(line))
        assert record.run_id and record.metrics  # read through the typed fields
        store.append(record)
    assert store.path.read_text() == "".join(lines)


def test_an_older_record_keeps_its_fields_and_their_order(tmp_path):
    record = Record.from_dict(OLDER)
    assert record.evals is None and not record.ok and record.extra == {"from_a_plugin": {"x": 1}}
    assert json.dumps(record.to_dict()) == json.dumps(OLDER)
    store = ResultStore(tmp_path / "results.jsonl")
    store.append(record)
    assert json.loads(store.path.read_text()) == OLDER and store.typed()[0].error == "RuntimeError: boom"


def test_dict_style_reads_are_the_json_form():
    record = Record.from_dict(OLDER)
    assert record["name"] == "drop" and record.get("evals") is None and record.get("from_a_plugin") == {"x": 1}
    with pytest.raises(KeyError):
        record["evals"]  # absent from the JSON, as from the file
