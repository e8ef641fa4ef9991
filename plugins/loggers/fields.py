"""What a tracker receives from a record: flat metric names, flat parameters, identifying tags."""

from __future__ import annotations

import json
from typing import Any

from moebench.record import Record


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    else:  # lists and the like: one readable value
        out[prefix] = json.dumps(value, default=str)


def params(record: Record) -> dict[str, Any]:
    """Run parameters: model, entry, grid point, every pipeline step's parameters (``method.param``,
    ``method#2.param`` on repeats, as in ``changes``) and every eval table (``eval.NAME.param``)."""
    out: dict[str, Any] = {"model.source": record.source, "model.dtype": record.dtype, "entry": record.entry or "baseline"}
    seen: dict[str, int] = {}
    for step in record.pipeline:
        method = str(step.get("method"))
        seen[method] = seen.get(method, 0) + 1
        key = method if seen[method] == 1 else f"{method}#{seen[method]}"
        _flatten(step.get("params") or {}, key, out)
    _flatten({"eval": record.evals or {}}, "", out)
    return out


def metrics(record: Record) -> dict[str, float]:
    """Every numeric metric under its report column name (``perplexity``, ``lm_eval.pydoc_mc.acc``, ...)."""
    return record.flat_metrics()


def tags(record: Record) -> dict[str, str]:
    """What identifies the run: ``moebench.run_id``, ``moebench.name``, ``moebench.suite``, ``moebench.status`` (and the error)."""
    out = {"moebench.run_id": record.run_id, "moebench.name": record.name, "moebench.suite": record.suite, "moebench.status": record.status}
    if record.error:
        out["moebench.error"] = record.error
    return {k: str(v) for k, v in out.items() if v is not None}
