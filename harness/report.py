"""Tables of results: one row per run, metric columns, deltas against the baseline.

Records are flattened into numeric columns (``perplexity``, ``params.active``,
``lm_eval.pydoc_mc.acc``...; a nested ``value`` takes its parent's name), then shown
with the baseline's figures and each run's relative change. What a column means (its
header, direction, order, whether it is a detail) comes from the metric that writes it
(:mod:`moebench.columns`).
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

from . import columns as _columns
from .columns import flatten  # noqa: F401  (re-exported: moebench.report.flatten)
from .record import Record, records_of
from .reference import PAPER

#: identity columns of every row (the rest are metric columns described by moebench.columns)
ID_COLUMNS = ("suite", "name", "run_id", "status")


def frame(records: Iterable[dict[str, Any] | Record]) -> pd.DataFrame:
    """One row per record (suite, name, status, metric columns); later records of a run id win.

    Records of one suite name measured with different evaluation specs (model, eval
    data, split, seqlen, sample count: :mod:`moebench.comparable`) are never one table:
    their ``suite`` is suffixed with the settings that differ, e.g. ``ci [perplexity.windows=8]``.
    """
    from .comparable import group

    records = records_of(records)
    labels = {}
    for g in group(records, key=lambda r: r.suite):
        for r in g.records:
            labels[id(r)] = f"{g.key} [{g.label}]" if g.label else g.key
    rows: dict[tuple, dict] = {}
    for r in records:
        row = {"suite": labels[id(r)], "name": r.name, "run_id": r.run_id, "status": r.status}
        row.update(r.flat_metrics())
        _columns.derive(row)  # plugin columns built from others (e.g. PreMoe's active/kept)
        rows[(row["suite"], r.run_id)] = row
    df = pd.DataFrame(list(rows.values()))
    if df.empty:
        return df
    metric_cols = [c for c in df.columns if c not in ID_COLUMNS]
    ordered = sorted(metric_cols, key=_columns.order_key)
    return df[["suite", "name", "run_id", "status", *ordered]]


def with_deltas(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``Δ<col>`` columns: relative change of each run against its suite's baseline."""
    out = df.copy()
    for col in [c for c in df.columns if c not in ("suite", "name", "run_id", "status") and pd.api.types.is_numeric_dtype(df[c])]:
        deltas = []
        for _, row in df.iterrows():
            if row.get("status") == PAPER:  # a paper's figures: shown as they are, no change against our baseline
                deltas.append(None)
                continue
            base = df[(df["suite"] == row["suite"]) & (df["name"] == "baseline")]
            b = base[col].iloc[0] if len(base) and col in base else None
            deltas.append((row[col] - b) / abs(b) if b not in (None, 0) and pd.notna(b) and pd.notna(row[col]) else None)
        out[f"Δ{col}"] = deltas
    return out


def better(column: str) -> str:
    """``higher`` or ``lower``: which direction improves a metric column (declared by its metric)."""
    return _columns.better(column)


def fmt(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, str):
        return value
    if column.endswith("bytes"):
        return f"{value / 2**20:.2f} MiB"
    if column and _columns.column(column).si:
        return _si(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def label(column: str) -> str:
    """A column's short header (``ppl``, ``weights``), as its metric declares it."""
    return _columns.label(column)


def terminal_table(records: list[dict[str, Any]], columns: list[str] | None = None):
    """A rich Table per suite: runs as rows, metrics with their change against the baseline."""
    from rich.markup import escape
    from rich.table import Table

    df = frame(records)
    tables = []
    if df.empty:
        return tables
    for suite, part in df.groupby("suite", sort=False):
        part = part.dropna(axis=1, how="all")
        cols = columns or [c for c in part.columns if c not in ("suite", "run_id") and (c in ("name", "status") or not _terminal_hidden(c))]
        base = part[part["name"] == "baseline"]
        table = Table(title=f"suite {suite}", show_lines=False, caption=escape(paper_note(records, suite)) or None)
        for c in cols:
            table.add_column(escape(label(c)), justify="left" if c in ("name", "status") else "right", overflow="fold", min_width=28 if c == "name" else None)
        for _, row in part.iterrows():
            cells = []
            for c in cols:
                text = fmt(row.get(c), c)
                stderr = row.get(f"{c}_stderr") if f"{c}_stderr" in part else None
                if stderr is not None and pd.notna(stderr) and pd.notna(row.get(c)):
                    text += f" ±{stderr:.2f}"
                if _columns.column(c).delta is True and len(base) and row["name"] != "baseline" and row["status"] != PAPER and pd.notna(row.get(c)):
                    b = base[c].iloc[0] if c in base else None
                    if b not in (None, 0) and pd.notna(b):
                        text += f" ({(row[c] - b) / abs(b):+.1%})"
                cells.append(escape(text))
            table.add_row(*cells)
        tables.append(table)
    return tables


def _terminal_hidden(column: str) -> bool:
    c = _columns.column(column)
    return c.detail or c.hidden or "stderr" in column


def citation(record: Record) -> str:
    """A paper row's citation: paper, table, row (where it was read, how its setting differs)."""
    ref = record.reference or {}
    text = f"{ref.get('paper')}, arXiv {ref.get('arxiv')}, {ref.get('table')}, row {ref.get('row')}"
    if ref.get("where"):
        text += f"; read from {ref['where']}"
    if ref.get("setting"):
        text += f"; setting: {ref['setting']}"
    return text


def paper_note(records: Iterable[dict[str, Any] | Record], suite: str | None = None) -> str:
    """``name: citation`` for the paper rows (status ``paper``) of a suite, one per line; "" when none."""
    lines = [f"{r.name}: {citation(r)}" for r in (Record.from_dict(x) for x in records)
             if r.is_reference and (suite is None or str(suite).split(" [")[0] == r.suite)]
    return "\n".join(dict.fromkeys(lines))
