"""``moebench log``: send finished results to the trackers of a suite's ``[log]`` table, after the fact."""

from __future__ import annotations

from pathlib import Path

import typer

from moebench.console import err, out
from moebench.errors import MoebenchError


def log_cmd(
    results: list[Path] = typer.Argument(..., help="results.jsonl files or run folders"),
    suite: Path = typer.Option(..., "--suite", help="suite TOML file whose log.mlflow / log.wandb tables say where to send them"),
):
    """Send every record of finished results to MLflow / W&B, as `moebench run` does for a suite with a log table."""
    from moebench.cli_reports import read_all
    from moebench.record import Record
    from moebench.suite import load_suite

    from . import _opened, send

    s = load_suite(suite)
    if not s.tables.get("log"):
        raise MoebenchError(f"{suite}: log: no [log.mlflow] or [log.wandb] table; expected one to say where the results go")
    records = [Record.from_dict(r) for r in read_all(results)]
    loggers = _opened(s)
    failures = 0
    for rec in records:
        lines = send(loggers, rec)
        failures += bool(lines)
        for line in lines:
            err.print(line, markup=False)
    out.print(f"sent {len(records) - failures} of {len(records)} run(s) to {', '.join(loggers)}", markup=False)
    if failures:
        raise MoebenchError(f"{failures} of {len(records)} run(s) were not logged (see the warnings above)")
