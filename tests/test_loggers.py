"""The MLflow and W&B loggers (``[log.mlflow]``, ``[log.wandb]``): real packages, a local MLflow
file store and W&B in offline mode, read back through MLflow's client and W&B's own run file."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from moebench.errors import MoebenchError, SuiteError
from moebench.record import Record
from moebench.runner import RunOptions, run_suite
from moebench.suite import load_suite
from tests.conftest import suite_file

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

METHODS = """
[[methods]]
name = "drop"
method = "expert_drop"
params = { keep_ratio = 0.5 }
"""


def read_wandb_run(path: Path) -> dict:
    """config, logged history and exit code of an offline W&B run, from its ``run-*.wandb`` file.

    The file is W&B's header (``:W&B``, magic, version: 7 bytes) followed by LevelDB log
    records (32 KiB blocks; each record: crc32, length, type FULL/FIRST/MIDDLE/LAST)
    holding ``wandb_internal_pb2.Record`` protobufs.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out = {"config": {}, "history": {}, "exit_code": None}
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            chunks = body
        elif kind in (3, 4):
            chunks += body
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(chunks)
        which = record.WhichOneof("record_type")
        if which == "run":
            out["name"] = record.run.display_name
            out["group"] = record.run.run_group
            out["tags"] = list(record.run.tags)
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif which == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif which == "history":
            out["history"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif which == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def finished_wandb_run(path: Path, timeout: float = 60) -> dict:
    """``read_wandb_run`` once W&B's service has flushed the run's exit record (it writes the
    file in its own process, after ``finish`` returns)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        run = read_wandb_run(path)
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


@pytest.fixture
def file_store(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a file store
    return f"file:{tmp_path / 'mlruns'}"


@pytest.mark.slow
def test_every_run_reaches_mlflow_and_wandb_with_its_metrics_params_and_tags(checkpoint, tmp_path, file_store):
    path = suite_file(tmp_path, checkpoint("mixtral"), METHODS + textwrap.dedent(f"""
        [log.mlflow]
        tracking_uri = "{file_store}"
        tags = {{ team = "compression" }}
        [log.wandb]
        mode = "offline"
        dir = "{tmp_path / 'wb'}"
        tags = ["nightly"]
    """), max_samples=2)
    result = run_suite(load_suite(path), RunOptions(out=tmp_path / "out", log=lambda m: None))
    records = {r.name: r for r in result.records}
    assert set(records) == {"baseline", "drop"} and all(r.ok for r in records.values())

    client = mlflow.tracking.MlflowClient(file_store)
    experiment = client.get_experiment_by_name("t")  # the suite's name
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"baseline", "drop"}
    for name, run in runs.items():
        record = records[name]
        assert run.info.status == "FINISHED"
        assert run.data.metrics == pytest.approx(record.flat_metrics())
        assert run.data.metrics["perplexity"] > 1 and "params.total" in run.data.metrics
        assert run.data.tags["moebench.run_id"] == record.run_id and run.data.tags["moebench.suite"] == "t"
        assert run.data.tags["team"] == "compression"
        assert run.data.params["eval.perplexity.seqlen"] == "32" and run.data.params["model.source"] == str(checkpoint("mixtral"))
    assert runs["drop"].data.params["expert_drop.keep_ratio"] == "0.5"
    assert runs["drop"].data.metrics["experts"] < runs["baseline"].data.metrics["experts"]

    files = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    logged = {run["name"]: run for run in map(finished_wandb_run, files)}
    assert set(logged) == {"baseline", "drop"}
    for name, run in logged.items():
        record = records[name]
        assert run["group"] == "t" and run["exit_code"] == 0
        assert f"run_id:{record.run_id}" in run["tags"] and "nightly" in run["tags"]
        assert run["history"]["perplexity"] == pytest.approx(record.flat_metrics()["perplexity"])
        assert run["config"]["moebench.run_id"] == record.run_id
    assert logged["drop"]["config"]["expert_drop.keep_ratio"] == 0.5


def record(name: str, status: str = "ok", **metrics) -> Record:
    return Record(
        run_id=f"id-{name}", suite="s", name=name, status=status, entry=name,
        pipeline=[{"method": "expert_drop", "params": {"keep_ratio": 0.5, "targets": ["experts"]}}, {"method": "expert_drop", "params": {"keep_ratio": 0.25}}],
        model={"source": "zoo:mixtral", "dtype": "float32"}, evals={"lm_eval": {"tasks": ["pydoc_mc"], "limit": 4}},
        metrics={"perplexity": {"value": 12.5, "seqlen": 32}, "lm_eval": {"pydoc_mc": {"acc": 0.5, "acc/strict": None}}, "compress_seconds_by_step": {"expert_drop#2": 1.0}, **metrics},
        error=None if status == "ok" else "RuntimeError: boom",
    )


class _Suite:
    name = "s"


def test_loggers_send_a_record_to_a_file_store_and_an_offline_run(tmp_path, file_store):
    """Straight from a record (no model): names MLflow refuses become "_", repeated steps get #2, failed runs are marked."""
    from moebench_plugins.loggers.mlflow_logger import MlflowLogger, MlflowParams
    from moebench_plugins.loggers.wandb_logger import WandbLogger, WandbParams

    logger = MlflowLogger(MlflowParams(tracking_uri=file_store, experiment="exp"), _Suite())
    ok, failed = logger.log(record("a")), logger.log(record("b", status="failed"))
    client = mlflow.tracking.MlflowClient(file_store)
    run = client.get_run(ok)
    assert run.data.metrics == {"perplexity": 12.5, "lm_eval.pydoc_mc.acc": 0.5, "compress_seconds_by_step.expert_drop_2": 1.0}
    assert run.data.params["expert_drop.keep_ratio"] == "0.5" and run.data.params["expert_drop_2.keep_ratio"] == "0.25"
    assert run.data.params["expert_drop.targets"] == '["experts"]' and run.data.params["eval.lm_eval.limit"] == "4"
    assert run.data.tags["moebench.run_id"] == "id-a" and run.info.run_name == "a" and run.info.status == "FINISHED"
    bad = client.get_run(failed)
    assert bad.info.status == "FAILED" and bad.data.tags["moebench.error"] == "RuntimeError: boom"

    wb = WandbLogger(WandbParams(mode="offline", dir=str(tmp_path / "wb"), project="p"), _Suite())
    wb.log(record("a"))
    (path,) = (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")
    run = finished_wandb_run(path)
    assert run["name"] == "a" and run["group"] == "s" and run["exit_code"] == 0 and "run_id:id-a" in run["tags"]
    assert run["history"]["perplexity"] == 12.5 and run["history"]["lm_eval.pydoc_mc.acc"] == 0.5
    assert run["config"]["expert_drop#2.keep_ratio"] == 0.25 and run["config"]["moebench.status"] == "ok"


def test_a_tracker_that_cannot_be_reached_is_a_one_line_error_when_opened(tmp_path, monkeypatch):
    from moebench_plugins.loggers import _opened

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    path = tmp_path / "t.toml"
    path.write_text('[suite]\nname = "t"\n[model]\nsource = "zoo:mixtral"\n[log.mlflow]\ntracking_uri = "http://127.0.0.1:9"\n')
    with pytest.raises(MoebenchError, match=r"^log.mlflow.tracking_uri 'http://127.0.0.1:9': cannot open experiment 't': [^\n]+$"):
        _opened(load_suite(path))


@pytest.mark.slow
def test_a_tracker_that_cannot_be_reached_stops_the_suite_before_any_run(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    path = suite_file(tmp_path, checkpoint("mixtral"), '[log.mlflow]\ntracking_uri = "http://127.0.0.1:9"\n', max_samples=1)
    with pytest.raises(MoebenchError, match=r"log.mlflow.tracking_uri 'http://127.0.0.1:9': cannot open experiment 't'"):
        run_suite(load_suite(path), RunOptions(out=tmp_path / "out", log=lambda m: None))
    assert not (tmp_path / "out" / "results.jsonl").exists() or not (tmp_path / "out" / "results.jsonl").read_text().strip()


@pytest.mark.parametrize(
    "table, field, message",
    [
        ("[log.neptune]\n", "log.neptune", "unknown tracker; expected one of mlflow, wandb"),
        ("[log.mlfow]\n", "log.mlfow", "did you mean 'mlflow'"),
        ("[log.wandb]\nmode = 'offlin'\n", "log.wandb.mode", "expected 'online' | 'offline' | 'disabled' | none, got 'offlin'"),
        ("[log.wandb]\nproject = 3\n", "log.wandb.project", "expected"),
        ("[log.mlflow]\ntracking = 'file:x'\n", "log.mlflow.tracking", "did you mean 'tracking_uri'"),
        ("[log.mlflow]\ntags = { a = 1 }\n", "log.mlflow.tags", "must be strings"),
        ("[log]\nmlflow = 3\n", "log.mlflow", "expected a table of settings"),
    ],
)
def test_bad_log_tables_are_one_line_errors_naming_the_field(tmp_path, table, field, message):
    path = tmp_path / "s.toml"
    path.write_text('[model]\nsource = "zoo:mixtral"\n' + table)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.field == field and message in str(info.value) and "\n" not in str(info.value)


def test_moebench_log_sends_finished_results_after_the_fact(tmp_path, file_store):
    from moebench_plugins.loggers.cli import log_cmd

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.jsonl").write_text("".join(json.dumps(record(n).to_dict()) + "\n" for n in ("a", "b")))
    suite = tmp_path / "s.toml"
    suite.write_text(f'[suite]\nname = "later"\n[model]\nsource = "zoo:mixtral"\n[log.mlflow]\ntracking_uri = "{file_store}"\n')
    log_cmd([tmp_path / "r"], suite)
    client = mlflow.tracking.MlflowClient(file_store)
    runs = client.search_runs([client.get_experiment_by_name("later").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"] and {r.data.metrics["perplexity"] for r in runs} == {12.5}
    suite.write_text('[model]\nsource = "zoo:mixtral"\n')
    with pytest.raises(MoebenchError, match="no \\[log.mlflow\\] or \\[log.wandb\\] table"):
        log_cmd([tmp_path / "r"], suite)
