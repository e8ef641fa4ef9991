"""Sharding: K/N covers a suite exactly once; merged shards equal an unsharded run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moebench.errors import MoebenchError
from moebench.record import model_metrics
from moebench.runner import RunOptions, run_suite
from moebench.shard import Shard, merge, parse_shard
from moebench.store import read_records
from moebench.suite import load_suite, parse_suite
from conftest import suite_file

#: per-run fields that measure time or bookkeeping of one process, not the run's result
TIMING = {"started", "finished", "env", "calibration"}


def grid_suite(n_points: int):
    raw = {
        "model": {"source": "zoo:deepseek_v2"},
        "calibration": {"samples": 4, "seqlen": 32},
        "methods": [
            {"name": "drop", "method": "expert_drop", "params": {"keep_ratio": [round(0.9 - 0.1 * i, 2) for i in range(n_points)]}},
            {"name": "layer", "method": "layer_drop", "params": {"n": 1}},
        ],
    }
    return parse_suite(raw, "grid.toml")


@pytest.mark.parametrize("n_points", [0, 1, 4, 7])
@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_cover_every_run_exactly_once(n_points, count):
    suite = grid_suite(n_points) if n_points else parse_suite({"model": {"source": "zoo:deepseek_v2"}}, "base.toml")
    runs = suite.runs()
    picked = [r.run_id for k in range(1, count + 1) for r in Shard(k, count).pick(runs)]
    methods = [r.run_id for r in runs if not r.is_baseline] or [runs[0].run_id]  # a baseline-only suite: shard 1 runs it
    assert sorted(picked) == sorted(methods)
    # deterministic: the same suite parsed again gives the same split
    again = grid_suite(n_points).runs() if n_points else runs
    assert [r.run_id for r in Shard(1, count).pick(again)] == [r.run_id for r in Shard(1, count).pick(runs)]
    sizes = [len(Shard(k, count).pick(runs)) for k in range(1, count + 1)]
    assert max(sizes) - min(sizes) <= 1  # balanced


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_is_one_line_error(text):
    with pytest.raises(MoebenchError, match="--shard"):
        parse_shard(text)


def test_merge_prefers_ok_and_drops_duplicates():
    a = [{"suite": "s", "run_id": "b", "name": "baseline", "status": "ok"}, {"suite": "s", "run_id": "x", "name": "x", "status": "failed"}]
    b = [{"suite": "s", "run_id": "b", "name": "baseline", "status": "ok", "copy": 2}, {"suite": "s", "run_id": "x", "name": "x", "status": "ok"}]
    merged = merge([a, b], order=["b", "x", "y"])
    assert [(r["run_id"], r["status"]) for r in merged.records] == [("b", "ok"), ("x", "ok")]
    assert "copy" not in merged.records[0]  # the first copy of an ok run is kept
    assert merged.duplicates == ["s/baseline", "s/x"] and merged.missing == ["y"]


def comparable(record: dict) -> dict:
    """A record without its timings and process memory (what sharding may change)."""
    out = {k: v for k, v in record.items() if k not in TIMING}
    out["metrics"] = model_metrics(record["metrics"])
    out["calibration_key"] = {k: record.get("calibration", {}).get(k) for k in ("data", "samples", "seqlen", "seed")}
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moebench.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # four processes (three suite runs)
def test_two_shards_merge_to_the_unsharded_run(tmp_path, checkpoint, isolated_cache):
    path = suite_file(tmp_path, checkpoint("qwen3_moe"), max_samples=4, methods="""
        [[methods]]
        name = "drop"
        method = "expert_drop"
        params = { keep_ratio = [0.75, 0.5] }
        [[methods]]
        name = "layer"
        method = "layer_drop"
        params = { n = 1 }
    """)
    suite = load_suite(path)
    run_suite(suite, RunOptions(out=tmp_path / "full", log=lambda m: None))
    full = list(read_records(tmp_path / "full" / "results.jsonl"))

    for k in (1, 2):
        done = _cli("run", str(path), "--shard", f"{k}/2", "--out", str(tmp_path / f"shard{k}"))
        assert done.returncode == 0, done.stderr[-2000:]
    shards = [list(read_records(tmp_path / f"shard{k}" / "results.jsonl")) for k in (1, 2)]
    # each shard ran the baseline (for deltas and speedups) plus its own runs, none twice
    assert [r["name"] for r in shards[0]] == ["baseline", "drop[keep_ratio=0.75]", "layer"]
    assert [r["name"] for r in shards[1]] == ["baseline", "drop[keep_ratio=0.5]"]

    merged_path = tmp_path / "merged.jsonl"
    done = _cli("merge", str(tmp_path / "shard2"), str(tmp_path / "shard1"), "--out", str(merged_path), "--suite", str(path))
    assert done.returncode == 0, done.stderr
    assert "1 duplicate(s) dropped" in done.stderr
    merged = list(read_records(merged_path))
    assert [r["run_id"] for r in merged] == [r["run_id"] for r in full]  # the suite's order
    assert [comparable(r) for r in merged] == [comparable(r) for r in full]

    # a shard alone is incomplete: merge says what is missing and fails
    partial = _cli("merge", str(tmp_path / "shard2"), "--out", str(tmp_path / "partial.jsonl"), "--suite", str(path))
    assert partial.returncode == 1 and "missing from every input: drop[keep_ratio=0.75], layer" in partial.stderr
    assert _cli("run", str(path), "--shard", "3/2").returncode == 2


def slurm_env(task: int, count: int, first: int, step: int | None = None) -> dict[str, str]:
    env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_ARRAY_TASK_MIN": str(first),
           "SLURM_ARRAY_TASK_MAX": str(first + (count - 1) * (step or 1))}
    if step is not None:
        env["SLURM_ARRAY_TASK_STEP"] = str(step)
    return env


@pytest.mark.parametrize("first, step", [(0, None), (1, None), (5, None), (0, 2), (3, 3)])
def test_slurm_array_tasks_map_to_every_shard_once(first, step):
    from moebench.shard import resolve_shard

    count = 4
    ids = [first + i * (step or 1) for i in range(count)]
    shards = [resolve_shard("slurm", slurm_env(task, count, first, step)) for task in ids]
    assert shards == [Shard(k, count) for k in range(1, count + 1)], "array ids at any offset and step map to 1..N in order"


@pytest.mark.parametrize("env, message", [
    ({}, "SLURM_ARRAY_TASK_ID is not set"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    (slurm_env(4, 3, 0, 2) | {"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_ID=3 is not one of the array's ids 0-4:2"),
    (slurm_env(1, 3, 1) | {"SLURM_ARRAY_TASK_MAX": "9"}, "do not form 3 evenly spaced tasks"),  # --array=1,4,9
    (slurm_env(1, 3, 1) | {"SLURM_ARRAY_TASK_ID": "x"}, "SLURM_ARRAY_TASK_ID='x'"),
])
def test_slurm_misconfiguration_is_one_line_error(env, message):
    from moebench.shard import resolve_shard

    with pytest.raises(MoebenchError, match="--shard slurm") as info:
        resolve_shard("slurm", env)
    assert message in str(info.value)
    assert resolve_shard(None, env) is None and resolve_shard("2/3", env) == Shard(2, 3)
