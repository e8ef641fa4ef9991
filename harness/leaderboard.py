"""The leaderboard: many result files, one row per method configuration, best result per model.

Results are grouped into boards by model and by the evaluation spec of the ranking
metric (its data, split, window length, sample count: :mod:`moebench.comparable`),
since figures from different evaluation settings are not comparable; boards of one
model name the setting that tells them apart. On each board a method configuration (its
pipeline with parameters, whatever the run was called) keeps its best record; the row
carries that record's provenance — commit, versions, device, date — so any figure can
be traced and reproduced.

Papers' reported figures (records with status ``paper``: a suite's ``[[reference]]`` tables,
read by ``moebench leaderboard --suite``) are shown on the boards of their model as rows
marked ``paper``, below the ranked rows, with their citations: never ranked, no change
against a baseline, not on the Pareto front (:mod:`moebench.reference`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from . import columns as column_specs
from . import comparable
from .render import HtmlColumn, esc, fitted_tables, front_plot, html_figure, html_page, html_table, label, md_table, origin, pareto_front, versions
from .errors import MoebenchError
from .record import Record, records_of
from .report import better, citation, fmt


@dataclass
class Entry:
    """One method configuration on a board: its best record and how it compares with the baseline."""

    config: str
    record: Record
    metrics: dict[str, float]
    delta: float | None = None  # relative change of the ranking metric against the baseline
    runs: int = 1  # records of this configuration on the board
    front: bool = False  # on the Pareto front of the ranking metric vs the size column (weight bytes)

    @property
    def env(self) -> dict[str, Any]:
        return self.record.environment


@dataclass
class Board:
    model: str
    setting: str
    metric: str
    entries: list[Entry] = field(default_factory=list)
    #: papers' reported figures for this model (status ``paper``): shown, never ranked
    papers: list[Entry] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"{self.model} — {self.metric}" + (f" ({self.setting})" if self.setting else "")


def config_key(record: Record) -> str:
    """What makes two runs the same method configuration: the pipeline and its parameters."""
    return json.dumps(record.pipeline, sort_keys=True)


def config_label(record: Record) -> str:
    """``expert_drop(keep_ratio=0.5, criterion=frequency) → gptq(bits=4)``; unset parameters left out."""
    steps = record.pipeline
    if not steps:
        return "baseline"
    parts = []
    for step in steps:
        params = ", ".join(f"{k}={v}" for k, v in (step.get("params") or {}).items() if v is not None)
        parts.append(f"{step.get('method')}({params})")
    return " → ".join(parts)


def setting_of(record: Record, metric: str) -> str:
    """The evaluation setting a metric value belongs to, as its column describes it
    (:attr:`moebench.columns.Column.setting`; perplexity: data, split, window length)."""
    describe = column_specs.column(metric).setting
    return describe(record.metrics.get(metric.split(".")[0])) if describe else ""


def default_metric() -> str:
    """The ranking metric when none is named: the column declared at leaderboard position 0 (perplexity)."""
    ranked = sorted((c.leaderboard, i, c.pattern) for i, c in enumerate(column_specs.registry()) if c.leaderboard is not None and "*" not in c.pattern)
    if not ranked:
        raise MoebenchError("no installed metric declares a ranking column: name one with --metric")
    return ranked[0][2]


def boards(records: Iterable[dict[str, Any] | Record], metric: str | None = None) -> list[Board]:
    """Group ok records into boards by (model, evaluation setting) and keep each configuration's best
    (ranked by ``metric``, default :func:`default_metric`). Paper records (status ``paper``) with the
    metric join every board of their model as unranked rows; a model with only paper figures gets
    a board of its own."""
    metric = metric or default_metric()
    lower = better(metric) == "lower"
    typed = records_of(records)
    ranked = [r for r in typed if r.ok and _finite(r.flat_metrics().get(metric))]
    papers = list({r.run_id: r for r in typed if r.is_reference and _finite(r.flat_metrics().get(metric))}.values())

    def model_of(r: Record) -> str:
        return (r.source or "?") + (f" ({r.dtype})" if r.dtype and r.dtype != "float32" else "")

    out = []
    # one board per model and evaluation spec of the ranking metric (data, split, seqlen, samples...)
    groups = comparable.group(ranked, key=model_of, tables=lambda r: [comparable.table_of(metric)])
    settings = [setting_of(g.records[0], metric) for g in groups]
    for g, setting in zip(groups, settings):
        model, recs = g.key, g.records
        if sum(1 for h, s in zip(groups, settings) if h.key == g.key and s == setting) > 1:  # the text does not tell them apart
            setting = f"{setting}; {g.label}" if setting else g.label
        baselines = {(r.suite, origin(r)): r for r in recs if r.is_baseline}
        best: dict[str, Entry] = {}
        for r in recs:
            flat = r.flat_metrics()
            key = config_key(r)
            entry = best.get(key)
            if entry is None or (flat[metric] < entry.metrics[metric] if lower else flat[metric] > entry.metrics[metric]):
                best[key] = Entry(config_label(r), r, flat, runs=entry.runs + 1 if entry else 1)
            else:
                entry.runs += 1
        entries = sorted(best.values(), key=lambda e: e.metrics[metric] if lower else -e.metrics[metric])
        board_base = next((e for e in entries if e.config == "baseline"), None)
        for e in entries:
            base = baselines.get((e.record.suite, origin(e.record))) or (board_base.record if board_base else None)
            b = base.flat_metrics().get(metric) if base else None
            if e.config != "baseline" and _finite(b) and b:
                e.delta = (e.metrics[metric] - b) / abs(b)
        size = column_specs.size_column()
        sized = [i for i, e in enumerate(entries) if size and _finite(e.metrics.get(size))]
        sign = 1 if lower else -1
        for i in pareto_front([(entries[i].metrics[size], sign * entries[i].metrics[metric]) for i in sized]):
            entries[sized[i]].front = True
        out.append(Board(model, setting, metric, entries))
    for paper in papers:
        model = model_of(paper)
        mine = [b for b in out if b.model == model] or [Board(model, "papers' figures only", metric)]
        if mine[0] not in out:
            out.append(mine[0])
        for board in mine:
            board.papers.append(Entry(paper.name, paper, paper.flat_metrics(), runs=0))
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- rendering


def _columns(board: Board) -> list[str]:
    """The ranking metric, then the columns metrics declare for leaderboards (``Column.leaderboard``)."""
    df = pd.DataFrame([e.metrics for e in [*board.entries, *board.papers]])
    shown = column_specs.leaderboard_columns([c for c in df.columns if df[c].notna().any() and c != board.metric])
    return [board.metric, *shown]


def _rows(board: Board) -> tuple[list[str], list[list[str]]]:
    cols = _columns(board)
    headers = ["#", "method configuration", *map(label, cols), "runs", "suite / run", "commit", "versions", "device", "date"]
    rows = []
    for rank, e in enumerate([*board.entries, *board.papers], 1):
        values = []
        for c in cols:
            text = fmt(e.metrics.get(c), c)
            err = next((e.metrics[s] for s in column_specs.stderr_names(c) if _finite(e.metrics.get(s))), None)
            if err is not None and _finite(e.metrics.get(c)):
                text += f" ±{err:.2g}"
            if c == board.metric and e.delta is not None:
                text += f" ({e.delta:+.1%})"
            values.append(text)
        if e.record.is_reference:  # a paper's figures: no rank, no run, no provenance but its citation
            ref = e.record.reference or {}
            rows.append(["paper", e.config, *values, "–", f"{e.record.suite} / {ref.get('paper')}", "–", "–", "–", "–"])
            continue
        env = e.env
        rows.append(
            [
                f"{rank}{' ★' if e.front else ''}",
                e.config,
                *values,
                str(e.runs),
                f"{e.record.suite} / {e.record.name}",
                str(env.get("git_commit") or "–")[:12],
                versions(env),
                f"{env.get('device', '?')} ({env.get('device_name', '?')})",
                str(e.record.finished or "–")[:10],
            ]
        )
    return headers, rows


LEGEND = (
    "One row per method configuration (pipeline and parameters) with its best result on this board; "
    "the change is against the baseline measured in the same suite run. ★ marks the Pareto front "
    "(no other configuration is both smaller and better). Rows marked paper are figures a paper "
    "reports for this model (cited below the board), not measured here and never ranked."
)


def _citations(board: Board) -> list[str]:
    """``name: citation`` of the board's paper rows."""
    return [f"{e.config}: {citation(e.record)}" for e in board.papers]


def markdown(bs: list[Board], title: str = "moebench leaderboard") -> str:
    parts = [f"# {title}", "", LEGEND, ""]
    for board in bs:
        headers, rows = _rows(board)
        parts += [f"## {board.title}", "", md_table(headers, rows, right=range(2, 2 + len(_columns(board)) + 1)), ""]
        if board.papers:
            parts += ["Paper figures (reported by the paper, not measured here; never ranked):", "",
                      *[f"- {c}" for c in _citations(board)], ""]
    if not bs:
        parts.append("No ok results with the ranking metric.")
    return "\n".join(parts) + "\n"


def html(bs: list[Board], title: str = "moebench leaderboard") -> str:
    body = [f"<h1>{esc(title)}</h1>", f'<p class="small">{esc(LEGEND)}</p>']
    for board in bs:
        headers, rows = _rows(board)
        body.append(f"<h2>{esc(board.title)}</h2>")
        row_classes = ["baseline" if e.config == "baseline" else "" for e in board.entries] + ["paper"] * len(board.papers)
        # rank, configuration and figures fit the page; each row's provenance folds below
        n = 2 + len(_columns(board)) + 1
        columns = [HtmlColumn(h, [r[i] for r in rows], wrap=i == 1) for i, h in enumerate(headers[:n])]
        provenance = [[r[0], *r[n:]] for r in rows]
        wraps = [["", "name", "", "name", "name", ""] for _ in rows]
        body.append(
            '<div class="scroll">' + fitted_tables(columns[:2], columns[2:], row_classes, repeat=2)
            + '<details class="more"><summary>provenance of each row: suite / run, commit, versions, device, date</summary>'
            + html_table(["#", *headers[n:]], provenance, wraps, row_classes, left=len(headers) - n + 1) + "</details></div>"
        )
        if board.papers:
            body.append("<p>Paper figures (reported by the paper, not measured here; never ranked):</p><ul>"
                        + "".join(f"<li>{esc(c)}</li>" for c in _citations(board)) + "</ul>")
        size = column_specs.size_column()
        if size and any(_finite(e.metrics.get(size)) for e in board.entries):
            # points named by rank: configuration names are too long for a plot
            df = pd.DataFrame([{"name": "baseline" if e.config == "baseline" else f"#{i}", "status": "ok", **e.metrics} for i, e in enumerate(board.entries, 1)])
            lower = better(board.metric) == "lower"
            plot = front_plot(df, board.metric, size, f"{label(board.metric)} vs {label(size)}",
                              f"{label(board.metric)} ({'lower' if lower else 'higher'} is better)", label(size) + (" (MiB)" if size.endswith("bytes") else ""), lower=lower)
            body.append('<div class="plots">' + html_figure(plot) + "</div>")
    if not bs:
        body.append('<p class="missing">No ok results with the ranking metric.</p>')
    return html_page(title, "\n".join(body))
