"""The runner and result store: records, failures, resume after a kill, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from moebench.runner import RunOptions, run_suite
from moebench.store import ResultStore, read_records
from moebench.suite import load_suite
from conftest import suite_file


def test_records_and_failed_run_does_not_stop_the_suite(tmp_path, checkpoint, isolated_cache):
    path = suite_file(tmp_path, checkpoint("mixtral"), """
        [[methods]]
        name = "too-many"
        # a pipeline: its first step passes the up-front shape checks, the second fails at run time
        pipeline = [{ method = "expert_drop", keep_ratio = 0.5 }, { method = "layer_drop", n = 10 }]
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = 0.5 }
    """)
    out = tmp_path / "out"
    logged: list[str] = []
    result = run_suite(load_suite(path), RunOptions(out=out, log=logged.append))
    records = list(read_records(out / "results.jsonl"))
    assert [r["name"] for r in records] == ["baseline", "too-many", "drop"]
    assert [m.split(" (")[0] for m in logged if m.startswith("run ")] == ["run 1/3: baseline", "run 2/3: too-many", "run 3/3: drop"]
    base, bad, drop = records
    assert base["status"] == "ok" and base["pipeline"] == [] and base["metrics"]["perplexity"]["value"] > 1
    assert bad["status"] == "failed" and "n=10 would remove all" in bad["error"]
    assert drop["status"] == "ok"
    assert drop["changes"]["expert_drop"]["experts_after"] == drop["changes"]["expert_drop"]["experts_before"] // 2
    assert drop["metrics"]["params"]["total"] < base["metrics"]["params"]["total"]
    assert drop["metrics"]["compress_seconds"] >= 0
    for key in ("torch", "transformers", "moebench", "device", "git_commit", "python"):
        assert key in drop["env"]
    assert drop["calibration"]["samples"] == 4
    assert result.calibration["passes"] == 1
    # the fields in the order runs have always written them (the runner builds a Record; the file is unchanged)
    head = ["run_id", "suite", "name", "entry", "grid", "status", "pipeline", "model", "evals", "metrics", "changes", "notes", "error"]
    assert list(base) == head + ["started", "finished", "env"]
    assert list(bad) == head + ["traceback", "calibration", "started", "finished", "env"]
    assert list(drop) == head + ["calibration", "started", "finished", "env"]
    assert [(r.name, r.status) for r in result.records] == [(r["name"], r["status"]) for r in records]


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "moebench.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


SLOW_METHODS = """
    [[methods]]
    name = "drop"
    method = "expert_drop"
    params = { keep_ratio = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2] }
"""


def _wait_for_records(path, n, proc, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no records appeared")


@pytest.mark.slow  # two CLI processes and nine runs each (25-80 s); CI runs both signals
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_without_redoing_finished_runs(tmp_path, checkpoint, sig):
    path = suite_file(tmp_path, checkpoint("qwen3_moe"), SLOW_METHODS)
    out = tmp_path / "out"
    results = out / "results.jsonl"
    proc = _cli("run", path, "--out", str(out))
    _wait_for_records(results, 2, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "--resume" in proc.stderr.read()
    first = list(read_records(results))
    assert 2 <= len(first) < 9, "interrupted mid-suite"
    # a writer killed mid-line leaves a partial line: the store must cope
    with open(results, "a") as fh:
        fh.write('{"run_id": "partial", "stat')
    resumed = _cli("run", path, "--out", str(out), "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resume: {len(first)} finished run(s) skipped" in err.replace("\n", " ")
    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    assert [r["run_id"] for r in records[: len(first)]] == [r["run_id"] for r in first], "finished records kept as they were"
    ids = [r["run_id"] for r in records]
    assert len(ids) == len(set(ids)) == 9, "each run recorded exactly once"


def test_store_skips_partial_tail_and_keeps_failed_for_retry(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    store.append({"run_id": "a", "status": "ok"})
    store.append({"run_id": "b", "status": "failed"})
    with open(store.path, "a") as fh:
        fh.write('{"run_id": "c"')
    assert [r["run_id"] for r in store.records()] == ["a", "b"]
    assert store.finished_ids() == {"a"}
    store.append({"run_id": "d", "status": "ok"})
    assert [json.loads(x)["run_id"] for x in store.path.read_text().splitlines()] == ["a", "b", "d"]


def test_cli_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nsource = "zoo:mixtrel"\n')
    proc = _cli("validate", str(bad))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.source" in lines[0] and "did you mean 'mixtral'" in lines[0]


def test_suite_loads_the_model_once_and_restores_clean_copies(tmp_path, checkpoint, monkeypatch):
    from moebench import models, runner

    loads = []
    real = runner.load
    monkeypatch.setattr(runner, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    path = suite_file(tmp_path, checkpoint("qwen3_moe"), """
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = [0.5, 0.75] }
    """)
    records = run_suite(load_suite(path), RunOptions(out=tmp_path / "kept", log=lambda m: None)).records
    assert len(loads) == 1 and not runner._PRISTINE  # one read of the checkpoint; the snapshot ends with the suite
    monkeypatch.setattr(models, "SNAPSHOT_SHARE", 0.0)  # no room for a snapshot: reload every run, as before
    again = run_suite(load_suite(path), RunOptions(out=tmp_path / "reloaded", log=lambda m: None)).records
    assert len(loads) == 1 + 4  # the pre-calibration pass and each of the three runs
    for a, b in zip(records, again):  # every run started from the same clean model
        assert a.metrics["perplexity"]["value"] == b.metrics["perplexity"]["value"]
        assert a.changes == b.changes
