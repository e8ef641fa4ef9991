"""Experiment-tracker loggers: every run's record sent to MLflow and/or Weights & Biases.

A suite turns them on with its ``[log]`` table, which this plugin owns
(``register_suite_tables``)::

    [log.mlflow]
    tracking_uri = "sqlite:///mlflow.db"   # default: MLflow's own (MLFLOW_TRACKING_URI, else ./mlruns)
    experiment = "sweeps"                  # default: the suite name

    [log.wandb]
    project = "moebench"                   # default: the suite name
    mode = "offline"                       # online | offline | disabled (default: W&B's own, WANDB_MODE)

Each run of the suite becomes one tracker run, sent from the ``on_record`` hook the
moment its record is written to ``results.jsonl``: the record's numeric metrics under
their report column names, the pipeline's and evaluation's parameters as run
parameters, and run name, run id, suite and status as tags. The tracker is reached
once before the first run (``on_run_start``), so a wrong address or a missing login is
a one-line error before any work; a tracker that fails later prints a warning and the
suite goes on (the record is already safe in ``results.jsonl``).
"""

from __future__ import annotations

import weakref
from typing import Any

from moebench.console import err as console_err
from moebench.errors import MoebenchError
from moebench.hookspecs import hookimpl
from moebench.record import Record
from moebench.suite import SuiteTable

from .tables import LOGGERS, parse_log_table

#: per suite object (by id, with a weak reference so a later suite reusing the id starts afresh):
#: the loggers already opened (reached once before the first run). Kept here, not on the
#: suite, because the suite travels to Ray workers and tracker clients need not pickle.
_OPENED: dict[int, tuple[weakref.ref, dict[str, Any]]] = {}


def _loggers(suite) -> dict[str, Any]:
    return (getattr(suite, "tables", None) or {}).get("log") or {}


def _opened(suite) -> dict[str, Any]:
    """Each configured logger of ``suite``, opened on first use (a MoebenchError when a tracker cannot be reached)."""
    ref, opened = _OPENED.get(id(suite), (None, None))
    if ref is None or ref() is not suite:
        for key in [k for k, (r, _) in _OPENED.items() if r() is None]:
            del _OPENED[key]
        opened = {}
        _OPENED[id(suite)] = (weakref.ref(suite), opened)
    for name, params in _loggers(suite).items():
        if name not in opened:
            opened[name] = LOGGERS[name](params, suite)
    return opened


@hookimpl
def register_suite_tables():
    return [SuiteTable("log", parse_log_table, run_id=False, help="[log.mlflow] / [log.wandb]: send every run's record to an experiment tracker")]


@hookimpl
def on_run_start(suite, spec):
    _opened(suite)


def send(loggers: dict[str, Any], rec: Record) -> list[str]:
    """Send one record to every opened logger; returns a warning line per tracker that failed."""
    failed = []
    for name, logger in loggers.items():
        try:
            logger.log(rec)
        except Exception as exc:  # the record is written already: a tracker hiccup must not stop the suite
            failed.append(f"warning: log.{name}: run {rec.name!r} was not logged ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); its record is in results.jsonl")
    return failed


@hookimpl
def on_record(suite, record):
    if not _loggers(suite):
        return
    rec = Record.from_dict(record)
    try:
        loggers = _opened(suite)
    except MoebenchError as exc:  # a resumed suite may reach on_record first
        console_err.print(f"warning: {exc}; run {rec.name!r} was not logged (its record is in results.jsonl)", markup=False)
        return
    for line in send(loggers, rec):
        console_err.print(line, markup=False)


@hookimpl
def register_commands(cli):
    from .cli import log_cmd

    cli.command("log")(log_cmd)
