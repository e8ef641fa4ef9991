"""``[log.mlflow]``: one MLflow run per moebench run, through ``MlflowClient`` (no global active run).

Any tracking URI MLflow takes works: ``file:./mlruns`` (a local file store; MLflow 3
asks for ``MLFLOW_ALLOW_FILE_STORE=true`` to use one), ``sqlite:///mlflow.db`` (needs
the full ``mlflow`` package), or a server's ``http://`` address. The experiment
(default: the suite name) is found or created before the first run.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from moebench.errors import MoebenchError
from moebench.params import param
from moebench.record import Record

from . import fields

#: characters MLflow accepts in metric and parameter names; anything else becomes "_"
_UNSAFE = re.compile(r"[^\w./\- :]")
#: MLflow's own limits: values of one parameter, and entries of one log_batch call
MAX_PARAM_CHARS = 6000
BATCH = 100


@dataclass
class MlflowParams:
    tracking_uri: str | None = param(None, help="MLflow tracking URI: file:./mlruns, sqlite:///mlflow.db, http://host:5000 (default: MLflow's own, MLFLOW_TRACKING_URI)")
    experiment: str | None = param(None, help="experiment name (default: the suite name)")
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "extra tags on every run"})

    def check(self):
        if self.experiment is not None and not self.experiment.strip():
            raise ValueError("experiment must be a non-empty name")
        bad = [k for k, v in self.tags.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"tags values must be strings; {bad[0]!r} is {self.tags[bad[0]]!r}")


def safe_name(name: str) -> str:
    return _UNSAFE.sub("_", name)


class MlflowLogger:
    Params = MlflowParams
    package = "mlflow"
    extra = "mlflow"

    def __init__(self, params: MlflowParams, suite):
        from mlflow.tracking import MlflowClient

        self.params = params
        name = params.experiment or suite.name
        where = f"log.mlflow.tracking_uri {params.tracking_uri!r}" if params.tracking_uri else "log.mlflow (MLflow's default tracking URI)"
        try:
            self.client = MlflowClient(tracking_uri=params.tracking_uri)
            found = self.client.get_experiment_by_name(name)
            self.experiment_id = found.experiment_id if found is not None else self.client.create_experiment(name)
        except Exception as exc:
            message = str(exc).strip().split("\n")[0]
            if "MLFLOW_ALLOW_FILE_STORE" in message:
                message = "MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true is set; set it, or use sqlite:///mlflow.db (full mlflow package) or a server"
            raise MoebenchError(f"{where}: cannot open experiment {name!r}: {message}") from None
        self.tracking_uri = self.client.tracking_uri

    def log(self, record: Record) -> str:
        """Create, fill and close one MLflow run for ``record``; returns the MLflow run id."""
        from mlflow.entities import Metric, Param, RunTag

        tags = {**fields.tags(record), **self.params.tags}
        run = self.client.create_run(self.experiment_id, run_name=record.name, tags=tags)
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(safe_name(k), v, now, 0) for k, v in fields.metrics(record).items()]
        params = [Param(safe_name(k), _text(v)) for k, v in fields.params(record).items()]
        for i in range(0, max(len(metrics), len(params)), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH], params=params[i : i + BATCH])
        self.client.set_terminated(run_id, status="FINISHED" if record.ok else "FAILED")
        return run_id


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
