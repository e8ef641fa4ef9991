"""Saved models named and described: the folder name and the README model card of a run's saved model.

``run --save-models DIR`` writes each compressed model to ``DIR/<run name>-<run id>``
(the name made safe for a path) with a ``README.md`` stating the method, its
parameters, the run's metrics and how to load the folder, so a folder found later
says what it is without the results file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .models import LOADER  # noqa: F401  (re-exported: what a card names)
from .record import Record

TRANSFORMERS = "transformers"


def folder_name(name: str, run_id: str) -> str:
    """``<run name>-<run id>`` with anything but letters, digits, ``.``, ``_``, ``-`` and ``=`` replaced by ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("._") or "run"
    return f"{safe[:80]}-{run_id}"


def how_to_load(folder: str | Path, loader: str) -> str:
    """The Python lines that load ``folder`` (transformers alone, or moebench's loader)."""
    if loader == TRANSFORMERS:
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})"
        )
    module, _, func = LOADER.rpartition(".")
    return f"from {module} import {func}, load\nmodel = {func}({str(folder)!r})  # or load(...) for the model with its tokenizer and MoE view"


def write(folder: str | Path, record: Record | dict[str, Any]) -> Path:
    """Write ``folder/README.md`` for the run ``record`` (its ``saved_model``, pipeline, metrics, notes)."""
    folder = Path(folder)
    rec = Record.from_dict(record)
    saved = rec.saved_model or {}
    loader = saved["loader"]
    base = rec.model
    methods = [step.get("method", "?") for step in rec.pipeline]
    lines = [
        "---",
        f"library_name: {'transformers' if loader == TRANSFORMERS else 'moebench'}",
        f"base_model: {json.dumps(str(base.get('source', '')))}",
        "tags: [moebench, mixture-of-experts, " + ", ".join(methods) + "]",
        "---",
        "",
        f"# {rec.name} ({rec.suite})",
        "",
        f"Compressed by moebench from `{rec.source}` ({rec.dtype}) in run `{rec.name}` "
        f"(id `{rec.run_id}`) of suite `{rec.suite}`; status **{rec.status}**.",
        "",
        "## Method",
        "",
    ]
    for step in rec.pipeline:
        lines.append(f"- `{step.get('method')}` with `{json.dumps(step.get('params', {}), sort_keys=True)}`")
    lines += ["", "## Metrics", ""]
    rows = list(_scalars(rec.metrics))
    if rows:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    else:
        lines.append("No metrics were recorded" + (f" (the run failed: {rec.error})." if rec.error else "."))
    lines += ["", "## How to load", ""]
    if loader == TRANSFORMERS:
        fmt = saved.get("format", TRANSFORMERS)
        lines.append("A standard checkpoint: transformers alone loads it." if fmt == TRANSFORMERS else
                     f"A standard `{fmt}` checkpoint (`quantization_config` in config.json): transformers loads it "
                     f"with the `{fmt}` package installed, and engines that read that format (e.g. vLLM) can serve it.")
    else:
        lines.append(
            "This folder keeps moebench's own layout (a structure no transformers config field can state, "
            f"e.g. per-layer expert counts, skipped blocks or moebench modules). Plain transformers refuses it "
            f"with an error naming `{LOADER}`; load it with moebench installed:"
        )
    lines += ["", "```python", how_to_load(folder, loader), "```", ""]
    if rec.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rec.notes] + [""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def _scalars(metrics: dict[str, Any], prefix: str = ""):
    """``(name, value)`` of every number or string in ``metrics``, nested keys joined by dots."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, f"{name}.")
        elif isinstance(value, float):
            yield name, f"{value:.6g}"
        elif isinstance(value, (int, str, bool)):
            yield name, value
