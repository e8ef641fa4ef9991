"""Tables of results: one row per run, metric columns, deltas against the baseline.

Records are flattened into numeric columns (``perplexity``, ``params.active``,
``lm_eval.pydoc_mc.acc``...; a nested ``value`` takes its parent's name), then shown
with the baseline's figures and each run's relative change.
"""

from __future__ import annotations

from typing import Any, Iterable

import pandas as pd

#: columns shown first, in this order, when present; lower is better unless listed in HIGHER_IS_BETTER
PREFERRED = [
    "perplexity",
    "params.total",
    "params.active",
    "weight_bytes",
    "experts",
    "active/kept",
    "blocks",
    "flops_per_token",
    "peak_memory_bytes",
    "speed.prefill_tok_s",
    "speed.decode_tok_s",
    "speed.speedup_prefill",
    "speed.speedup_decode",
    "compress_seconds",
]
HIGHER_IS_BETTER_PREFIXES = ("lm_eval.", "speed.")
SKIP = {"perplexity.seqlen", "perplexity.windows", "perplexity.tokens"}


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as dotted column names."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = prefix[:-1] if key == "value" and prefix else f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name not in SKIP:
            out[name] = float(value)
    return out


def frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per record (suite, name, status, metric columns); later records of a run id win.

    Records of one suite name measured with different evaluation specs (model, eval
    data, split, seqlen, sample count: :mod:`moebench.comparable`) are never one table:
    their ``suite`` is suffixed with the settings that differ, e.g. ``ci [perplexity.windows=8]``.
    """
    from .comparable import group

    records = list(records)
    labels = {}
    for g in group(records, key=lambda r: r.get("suite")):
        for r in g.records:
            labels[id(r)] = f"{g.key} [{g.label}]" if g.label else g.key
    rows: dict[tuple, dict] = {}
    for r in records:
        row = {"suite": labels[id(r)], "name": r.get("name"), "run_id": r.get("run_id"), "status": r.get("status")}
        row.update(flatten(r.get("metrics") or {}))
        row.update(routed_notation(row))
        rows[(row["suite"], r.get("run_id"))] = row
    df = pd.DataFrame(list(rows.values()))
    if df.empty:
        return df
    metric_cols = [c for c in df.columns if c not in ("suite", "name", "run_id", "status")]
    ordered = [c for c in PREFERRED if c in metric_cols] + sorted(c for c in metric_cols if c not in PREFERRED)
    return df[["suite", "name", "run_id", "status", *ordered]]


def routed_notation(row: dict[str, Any]) -> dict[str, str]:
    """PreMoe's ``active/kept`` notation (e.g. ``8/128``: top-k of the routed experts kept) as one
    text column, in place of the numeric ``routed.active`` and ``routed.kept`` columns."""
    active, kept = row.pop("routed.active", None), row.pop("routed.kept", None)
    return {"active/kept": f"{int(active)}/{int(kept)}"} if active is not None and kept is not None else {}


def with_deltas(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``Δ<col>`` columns: relative change of each run against its suite's baseline."""
    out = df.copy()
    for col in [c for c in df.columns if c not in ("suite", "name", "run_id", "status") and pd.api.types.is_numeric_dtype(df[c])]:
        deltas = []
        for _, row in df.iterrows():
            base = df[(df["suite"] == row["suite"]) & (df["name"] == "baseline")]
            b = base[col].iloc[0] if len(base) and col in base else None
            deltas.append((row[col] - b) / abs(b) if b not in (None, 0) and pd.notna(b) and pd.notna(row[col]) else None)
        out[f"Δ{col}"] = deltas
    return out


def better(column: str) -> str:
    """``higher`` or ``lower``: which direction improves a metric column."""
    return "higher" if column.startswith(HIGHER_IS_BETTER_PREFIXES) and "stderr" not in column else "lower"


def fmt(value: Any, column: str = "") -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, str):
        return value
    if column.endswith("bytes"):
        return f"{value / 2**20:.2f} MiB"
    if column.startswith(("params.", "flops")):
        return _si(value)
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


#: short headers for the terminal table
LABELS = {
    "perplexity": "ppl",
    "params.total": "params",
    "params.active": "active",
    "weight_bytes": "weights",
    "flops_per_token": "FLOPs/tok",
    "peak_memory_bytes": "peak mem",
    "speed.prefill_tok_s": "prefill tok/s",
    "speed.decode_tok_s": "decode tok/s",
    "speed.speedup_prefill": "prefill ×",
    "speed.speedup_decode": "decode ×",
    "compress_seconds": "compress s",
}
#: detail columns left out of the terminal table (they stay in the record, Markdown, CSV and HTML)
TERMINAL_HIDDEN = ("stderr", "acc_norm", "lm_eval_info", "spread", "analytic", "above_runtime", "increase_bytes", "by_batch", "runs.", "by_step")
#: columns whose change against the baseline is shown in the terminal
DELTA_COLUMNS = {"perplexity", "params.total", "params.active", "weight_bytes", "flops_per_token"}


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
        cols = columns or [c for c in part.columns if c not in ("suite", "run_id") and not any(h in c for h in TERMINAL_HIDDEN)]
        base = part[part["name"] == "baseline"]
        table = Table(title=f"suite {suite}", show_lines=False)
        for c in cols:
            label = LABELS.get(c) or (c[len("lm_eval.") :].replace(".", " ") if c.startswith("lm_eval.") else c)
            table.add_column(escape(label), justify="left" if c in ("name", "status") else "right", overflow="fold", min_width=28 if c == "name" else None)
        for _, row in part.iterrows():
            cells = []
            for c in cols:
                text = fmt(row.get(c), c)
                stderr = row.get(f"{c}_stderr") if f"{c}_stderr" in part else None
                if stderr is not None and pd.notna(stderr) and pd.notna(row.get(c)):
                    text += f" ±{stderr:.2f}"
                if c in DELTA_COLUMNS and len(base) and row["name"] != "baseline" and pd.notna(row.get(c)):
                    b = base[c].iloc[0] if c in base else None
                    if b not in (None, 0) and pd.notna(b):
                        text += f" ({(row[c] - b) / abs(b):+.1%})"
                cells.append(escape(text))
            table.add_row(*cells)
        tables.append(table)
    return tables
