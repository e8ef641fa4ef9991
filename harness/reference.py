"""Paper reference records: figures a paper reports for the suite's model and setting.

A suite's ``[[reference]]`` tables hold numbers typed from a paper's tables, each citing
the paper, its arXiv id, the table and the row, and marked ``source = "paper"``. They are
data only (nothing read is executed) and never measured: ``moebench report --suite`` shows
them as rows labelled ``paper`` beside the measured runs, and ``moebench compare --suite``
lists them beside the new figures, so a reproduction can be read against the paper. They
never gate, are never a baseline, and are never counted missing. Metric names are the
report's columns (``perplexity``, ``lm_eval.mmlu.acc``) in moebench's units (accuracy as a
fraction: a paper's 58.3 % is 0.583).

::

    [[reference]]
    name = "baseline"                 # the suite run the figures stand beside
    source = "paper"
    paper = "DeepSeek-V2 (DeepSeek-AI, 2024)"
    arxiv = "2405.04434"
    table = "Standard Benchmark (Models smaller than 16B)"
    row = "MMLU; GSM8K (column DeepSeek-V2-Lite)"
    where = "..."                     # optional: where the figures were read, when not the paper itself
    setting = "..."                   # optional: how the paper's setting differs from the suite's
    metrics = { "lm_eval.mmlu.acc" = 0.583 }
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from .errors import did_you_mean

#: ``Record.status`` of a reference record (a measured run is ok or failed)
PAPER = "paper"
ARXIV = re.compile(r"\d{4}\.\d{4,5}(v\d+)?")
METRIC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:%-]*")
REQUIRED = ("name", "source", "paper", "arxiv", "table", "row", "metrics")


@dataclass(frozen=True)
class Reference:
    """One paper's figures for one suite run (see the module docstring for the TOML)."""

    name: str
    source: str
    paper: str
    arxiv: str
    table: str
    row: str
    metrics: dict[str, float] = field(default_factory=dict)
    where: str = ""
    setting: str = ""

    @property
    def label(self) -> str:
        """The row name a report shows: the run it stands beside, marked as the paper's."""
        return f"{self.name} (paper, arXiv {self.arxiv})"

    def citation(self) -> str:
        """One line: paper, arXiv id, table, row (and where it was read, how the setting differs)."""
        text = f"{self.paper}, arXiv {self.arxiv}, {self.table}, row {self.row}"
        if self.where:
            text += f"; read from {self.where}"
        if self.setting:
            text += f"; setting: {self.setting}"
        return text

    def record(self, suite: str, model: dict[str, Any] | None = None):
        """The reference as a :class:`~moebench.record.Record` (status ``paper``) for report and compare."""
        from .record import Record

        cite = {k: v for k, v in asdict(self).items() if k != "metrics"}
        run_id = "paper-" + hashlib.sha1(json.dumps([suite, cite], sort_keys=True).encode()).hexdigest()[:8]
        return Record(run_id=run_id, suite=suite, name=self.label, status=PAPER, entry=self.name,
                      model=dict(model or {}), metrics=unflatten(self.metrics), reference=cite)


def unflatten(metrics: dict[str, float]) -> dict[str, Any]:
    """Dotted column names as the nested metrics dict a record holds (``perplexity`` stays flat)."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def parse_references(raw: Any, err: Callable[[str, str], Exception], runs: list[str]) -> list[Reference]:
    """Validate a suite's ``[[reference]]`` array; ``runs`` are the suite's run names. One-line errors name the field."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise err("reference", f"expected an array of [[reference]] tables, got {type(raw).__name__}")
    known = {f.name for f in fields(Reference)}
    out, seen = [], set()
    for i, entry in enumerate(raw):
        where = f"reference[{i}]"
        if not isinstance(entry, dict):
            raise err(where, "expected a table with name, source, paper, arxiv, table, row and metrics")
        for key in entry:
            if key not in known:
                raise err(f"{where}.{key}", f"unknown field{did_you_mean(key, known)}; expected one of {', '.join(sorted(known))}")
        for key in REQUIRED:
            if key not in entry:
                raise err(f"{where}.{key}", "missing; every paper figure cites its paper, arXiv id, table and row")
        for key in known - {"metrics"}:
            if key in entry and (not isinstance(entry[key], str) or (key in REQUIRED and not entry[key].strip())):
                raise err(f"{where}.{key}", f"expected a non-empty string, got {entry[key]!r}")
        if entry["source"] != PAPER:
            raise err(f"{where}.source", f"expected 'paper' (figures typed from a paper's table), got {entry['source']!r}")
        if not ARXIV.fullmatch(entry["arxiv"]):
            raise err(f"{where}.arxiv", f"expected an arXiv id like '2406.02500', got {entry['arxiv']!r}")
        if entry["name"] not in runs:
            raise err(f"{where}.name", f"no run {entry['name']!r} in this suite{did_you_mean(entry['name'], runs)}; expected the name of the run the figures stand beside (e.g. 'baseline')")
        metrics = entry["metrics"]
        if not isinstance(metrics, dict) or not metrics:
            raise err(f"{where}.metrics", "expected a non-empty table of column = number, e.g. { perplexity = 6.31 }")
        for name, value in metrics.items():
            if not METRIC.fullmatch(name) or ".." in name or name.endswith("."):
                raise err(f"{where}.metrics.{name}", "expected a report column name like 'perplexity' or 'lm_eval.mmlu.acc'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise err(f"{where}.metrics.{name}", f"expected a finite number, got {value!r}")
        ref = Reference(**{**entry, "metrics": {k: float(v) for k, v in metrics.items()}})
        key = (ref.name, ref.arxiv, ref.table, ref.row)
        if key in seen:
            raise err(where, f"repeats the paper figures of another entry (run {ref.name!r}, arXiv {ref.arxiv}, {ref.table}, row {ref.row})")
        seen.add(key)
        out.append(ref)
    return out


def suite_records(suite) -> list:
    """A loaded suite's paper references as records (status ``paper``)."""
    model = {"source": suite.model.source, "dtype": suite.model.dtype}
    return [ref.record(suite.name, model) for ref in suite.references]
