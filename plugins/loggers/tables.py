"""The ``[log]`` suite table: one sub-table per tracker, parsed into its typed parameters."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Callable

from moebench.errors import did_you_mean
from moebench.params import ParamError, parse

from .mlflow_logger import MlflowLogger
from .wandb_logger import WandbLogger

#: tracker name (``[log.NAME]``) -> logger class (``Params``, ``package``, ``extra``, ``log(record)``)
LOGGERS = {"mlflow": MlflowLogger, "wandb": WandbLogger}


def parse_log_table(raw: Any, err: Callable[[str, str], Exception]) -> dict[str, Any]:
    """``{tracker: params}`` from ``[log.mlflow]`` / ``[log.wandb]``; unknown trackers, fields, bad
    values and a tracker whose package is not installed are one-line errors naming the field."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise err("log", "expected a table of trackers, e.g. [log.mlflow] tracking_uri = 'file:./mlruns'")
    out = {}
    for name, table in raw.items():
        where = f"log.{name}"
        if name not in LOGGERS:
            raise err(where, f"unknown tracker{did_you_mean(name, LOGGERS)}; expected one of {', '.join(LOGGERS)}")
        if not isinstance(table, Mapping):
            raise err(where, "expected a table of settings (an empty [log.%s] uses the defaults)" % name)
        cls = LOGGERS[name]
        try:
            params = parse(cls.Params, dict(table))
        except ParamError as exc:
            raise err(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        if importlib.util.find_spec(cls.package) is None:
            raise err(where, f"needs the {cls.package!r} package, which is not installed; pip install 'moebench[{cls.extra}]'")
        out[name] = params
    return out
