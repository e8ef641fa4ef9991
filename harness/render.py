"""Reports as Markdown, CSV and one self-contained HTML page with plots.

Records from several result files (machines, commits, shards) merge into one table per
suite. Shards of one run simply join; when the same run was measured on different
machines or commits, each copy keeps its row and an ``origin`` column tells them apart,
and deltas are taken against the baseline of the same origin.

Plots are drawn with matplotlib's object API (no pyplot, no global backend) and
embedded as base64 PNGs, so the HTML page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import fnmatch
import html as _html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from . import columns as _columns
from .record import Record, records_of
from .reference import PAPER
from .report import better, citation, fmt, frame, with_deltas

ID_COLUMNS = ("suite", "origin", "name", "run_id", "status")


# --------------------------------------------------------------------------- merging


def origin(record: dict[str, Any] | Record) -> str:
    """Where a record was measured: short commit and device (hosts differ between shards, so they are left out)."""
    env = Record.from_dict(record).environment
    commit = (env.get("git_commit") or "no-git")[:7] + ("-dirty" if str(env.get("git_commit", "")).endswith("-dirty") else "")
    device = env.get("device_name") or env.get("device") or "?"
    return f"{commit} {device}"


@dataclass
class SuiteTable:
    """One suite's runs: metric columns plus ``Δ<col>`` relative changes against its baseline."""

    suite: str
    df: pd.DataFrame
    records: list[Record] = field(default_factory=list)

    @property
    def metrics(self) -> list[str]:
        """Metric columns with at least one value, in report order."""
        return [c for c in self.df.columns if c not in ID_COLUMNS and not c.startswith("Δ") and self.df[c].notna().any()]


def suite_tables(records: Iterable[dict[str, Any] | Record]) -> list[SuiteTable]:
    """One table per suite and evaluation spec, in order of first appearance.

    A suite whose records were measured with different evaluation specs (model, eval data,
    split, seqlen, sample count) becomes one table per spec, titled with what differs.
    """
    from .comparable import group

    by_suite: dict[str, list[Record]] = {}
    for g in group(records_of(records), key=lambda r: r.suite):
        title = f"{g.key} [{g.label}]" if g.label else g.key
        while title in by_suite:  # groups whose differences do not show in their labels stay apart
            title += "'"
        by_suite[title] = list(g.records)
    tables = []
    for suite, recs in by_suite.items():
        origins = list(dict.fromkeys(origin(r) for r in recs))
        seen: dict[str, set] = {}
        for r in recs:
            seen.setdefault(r.run_id, set()).add(origin(r))
        split = len(origins) > 1 and any(len(o) > 1 for o in seen.values())
        if split:
            parts = []
            for o in origins:
                df = with_deltas(frame([r for r in recs if origin(r) == o]))
                df.insert(1, "origin", o)
                parts.append(df)
            df = pd.concat(parts, ignore_index=True)
        else:
            df = with_deltas(frame(recs))
        tables.append(SuiteTable(suite, df.reset_index(drop=True), recs))
    return tables


def provenance(records: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """The distinct environments the records were measured in (commit, device, versions, host)."""
    rows: dict[tuple, dict[str, str]] = {}
    for r in records:
        env = Record.from_dict(r).env
        if not env:
            continue
        row = {
            "commit": str(env.get("git_commit") or "–"),
            "device": f"{env.get('device', '?')} ({env.get('device_name', '?')})",
            "versions": versions(env),
            "host": str(env.get("host") or "–"),
        }
        rows.setdefault(tuple(row.values()), row)
    return list(rows.values())


def versions(env: dict[str, Any]) -> str:
    keys = ("moebench", "torch", "transformers", "lm_eval", "python")
    return " ".join(f"{k} {env[k]}" for k in keys if env.get(k))


def record_of(table: SuiteTable, row: pd.Series) -> Record:
    """The record a table row came from (the last one of its run id, as in :func:`moebench.report.frame`)."""
    for r in reversed(table.records):
        if r.run_id == row["run_id"] and ("origin" not in row or origin(r) == row["origin"]):
            return r
    return {}


# --------------------------------------------------------------------------- cells


def display_columns(table: SuiteTable, columns: list[str] | None = None) -> list[str]:
    """Columns a person reads: name, status, then the metrics matching ``columns`` (globs, in
    their order), or every metric but the bookkeeping ones (``hidden`` in their column description)."""
    ids = ["origin"] if "origin" in table.df.columns else []
    if columns:
        chosen = [m for pattern in columns for m in table.metrics if fnmatch.fnmatchcase(m, pattern)]
    else:
        chosen = [m for m in table.metrics if not (_columns.column(m).hidden or "stderr" in m)]
    return ["name", *ids, "status", *dict.fromkeys(chosen)]


def label(column: str) -> str:
    """A column's short header (``ppl``, ``weights``, ``pydoc_mc acc``), as its metric declares it."""
    return _columns.label(column)


def stderr_column(columns: Iterable[str], column: str) -> str | None:
    """The column holding ``column``'s standard error (``<col>_stderr`` or ``<col>.stderr``), if the results have one."""
    present = set(columns)
    return next((s for s in _columns.stderr_names(column) if s in present), None)


def cell(row: pd.Series, column: str) -> str:
    """A formatted value, ``±`` its standard error where one is recorded, and its change
    against the baseline for the headline columns."""
    text = fmt(row.get(column), column)
    err = stderr_column(row.index, column)
    if err and _num(row.get(err)) and _num(row.get(column)):
        text += f" ±{row[err]:.2g}"
    delta = row.get(f"Δ{column}")
    if _columns.column(column).delta and row.get("name") != "baseline" and _num(delta):
        text += f" ({delta:+.1%})"
    return text


def verdict(row: pd.Series, column: str) -> str:
    """``better``, ``worse`` or ``""``: the direction of a run's change against the baseline."""
    delta = row.get(f"Δ{column}")
    if row.get("name") == "baseline" or not _num(delta) or abs(delta) < 1e-12:
        return ""
    improved = delta < 0 if better(column) == "lower" else delta > 0
    return "better" if improved else "worse"


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- markdown


def md_table(headers: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    right = set(right)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---:" if i in right else ":---" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(records: list[dict[str, Any]], title: str = "moebench report", columns: list[str] | None = None) -> str:
    """One Markdown table per suite, values with their change against the baseline."""
    parts = [f"# {title}", ""]
    for table in suite_tables(records):
        cols = display_columns(table, columns)
        parts += [f"## suite {table.suite}", ""]
        rows = [[cell(row, c) for c in cols] for _, row in table.df.iterrows()]
        parts += [md_table([label(c) for c in cols], rows, right=range(2, len(cols))), ""]
        parts += _papers_md(table)
        parts += _failures_md(table)
    parts += ["## provenance", ""]
    prov = provenance(records)
    parts += [md_table(["commit", "device", "versions", "host"], [list(p.values()) for p in prov]), ""]
    return "\n".join(parts)


def _failed(table: SuiteTable) -> list[dict]:
    """Failed runs as shown in the table (a later ok record of the same run hides an earlier failure)."""
    shown = {(row["run_id"], row.get("origin")) for _, row in table.df.iterrows() if row["status"] != "ok"}
    out: dict[tuple, dict] = {}
    for r in table.records:
        key = (r.run_id, origin(r) if "origin" in table.df.columns else None)
        if key in shown and not r.ok and not r.is_reference:
            out[key] = r
    return list(out.values())


def _papers(table: SuiteTable) -> list[Record]:
    """The table's paper rows (status ``paper``): figures a paper reports, not runs measured here."""
    return list({r.run_id: r for r in table.records if r.is_reference}.values())


def _papers_md(table: SuiteTable) -> list[str]:
    papers = _papers(table)
    if not papers:
        return []
    return ["Paper figures (status `paper`: reported by the paper, not measured here; never gated):", "",
            *[f"- `{r.name}`: {citation(r)}" for r in papers], ""]


def _failures_md(table: SuiteTable) -> list[str]:
    failed = _failed(table)
    if not failed:
        return []
    return ["Failed runs:", "", *[f"- `{r.name}`: {r.error}" for r in failed], ""]


# --------------------------------------------------------------------------- csv


def csv(records: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Every run of every suite as one CSV: raw metric values, ``Δ`` columns, provenance."""
    frames = []
    for table in suite_tables(records):
        if columns:
            keep = display_columns(table, columns)
            table.df = table.df[["suite", *[c for c in table.df.columns if c in keep or c == "run_id"], *[f"Δ{c}" for c in keep if f"Δ{c}" in table.df]]]
        env = [record_of(table, row).environment for _, row in table.df.iterrows()]
        extra = pd.DataFrame(
            [{"git_commit": e.get("git_commit"), "device": e.get("device"), "device_name": e.get("device_name"), "versions": versions(e)} for e in env]
        )
        frames.append(pd.concat([table.df, extra], axis=1))
    if not frames:
        return ""
    return pd.concat(frames, ignore_index=True).to_csv(index=False)


# --------------------------------------------------------------------------- plots


@dataclass
class Plot:
    title: str
    png: bytes | None  # None when the results hold nothing to draw
    caption: str = ""
    wide: bool = False  # takes the page's whole width (a figure of several panels)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode()


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _wide(fig) -> bool:
    """A figure widened for a legend beside it is shown at the page's whole width (else its text shrinks)."""
    return fig.get_figwidth() > 7.5


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def ok_runs(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def _labels(df: pd.DataFrame) -> list[str]:
    if "origin" in df.columns:
        return [f"{n} @{o.split()[0]}" for n, o in zip(df["name"], df["origin"])]
    return list(df["name"])


#: run styles: ten colours, then the same colours with other markers (a run keeps one style across a figure)
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def style(i: int, name: str = "") -> dict[str, Any]:
    """The colour and marker of the ``i``-th run in a figure (the baseline: a black star)."""
    if name == "baseline":
        return {"color": "#333333", "marker": "*", "ms": 10}
    return {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[(i // len(COLOURS)) % len(MARKERS)], "ms": 6}


def wrap(name: str, width: int = 30) -> str:
    """A run name broken into lines of about ``width`` characters, after commas and brackets where it can."""
    if len(name) <= width:
        return name
    lines, line = [], ""
    for piece in __import__("re").split(r"(?<=[,\[\]( ])", name):
        while len(piece) > width:  # one long word: cut it
            if line:
                lines.append(line)
                line = ""
            lines.append(piece[:width])
            piece = piece[width:]
        if len(line) + len(piece) > width and line:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join([*lines, line] if line else lines)


def stderr_values(df: pd.DataFrame, column: str) -> list[float] | None:
    """``column``'s standard errors per row (0 where missing), or None when the results record none."""
    err = stderr_column(df.columns, column)
    if err is None or not df[err].notna().any():
        return None
    return [float(v) if _num(v) else 0.0 for v in df[err]]


def legend(ax_or_fig, entries: int, outside: bool | None = None) -> None:
    """A legend inside the axes for a few entries, else to the right of the plot (it would hide the data).

    Points are named in the legend, never beside themselves, so labels cannot overlap.
    """
    outside = entries > 5 if outside is None else outside
    if hasattr(ax_or_fig, "add_subplot"):  # a figure: its legend always sits to the right
        ax_or_fig.legend(fontsize=7, loc="outside right upper")
        return
    if not outside:
        ax_or_fig.legend(fontsize=7, loc="best")
        return
    fig = ax_or_fig.figure
    fig.set_figwidth(fig.get_figwidth() + 2.6)
    ax_or_fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def front_plot(df: pd.DataFrame, y: str, x: str, title: str, ylabel: str, xlabel: str, lower: bool = True) -> Plot:
    """``y`` against a size ``x`` (a ``*bytes`` column in MiB), one marker per run named in the
    legend, error bars where ``y`` has a standard error, and the Pareto front of the two."""
    df = ok_runs(df)
    if y not in df or x not in df:
        return Plot(title, None, f"no {label(y)} or {label(x)} in these results")
    df = df[df[y].notna() & df[x].notna()]
    if df.empty:
        return Plot(title, None, f"no run has both {label(y)} and {label(x)}")
    scale = 2**20 if x.endswith("bytes") else 1
    xs = (df[x] / scale).tolist()
    ys = df[y].tolist()
    err = stderr_values(df, y)
    names = _labels(df)
    front = pareto_front([(a, b if lower else -b) for a, b in zip(xs, ys)])
    fig, ax = _figure()
    ax.step([xs[i] for i in front], [ys[i] for i in front], where="post", color="#dd8452", lw=1.2, alpha=0.6, zorder=2)
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=150, facecolors="none", edgecolors="#dd8452", lw=1.6, label="Pareto front", zorder=5)
    for i, (xi, yi, name) in enumerate(zip(xs, ys, names)):
        ax.errorbar([xi], [yi], yerr=[err[i]] if err else None, ls="none", capsize=3, label=wrap(name), zorder=4,
                    **style(i, df["name"].iloc[i]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" ± standard error" if err else ""))
    ax.grid(alpha=0.3)
    legend(ax, len(names) + 1)
    on_front = ", ".join(names[i] for i in front)
    return Plot(title, _png(fig), f"Pareto front (no run is both smaller and better): {on_front}", wide=_wide(fig))


def points_plot(df: pd.DataFrame, ys: list[str], x: str, title: str, ylabel: str, xlabel: str, caption: str) -> Plot:
    """One panel per ``ys`` column against ``x``, a marker per run (same style in every panel, named
    in one legend), error bars where a column has a standard error."""
    df = ok_runs(df)
    ys = [c for c in ys if c in df and df[c].notna().any()]
    if not ys or x not in df:
        return Plot(title, None, "")
    from matplotlib.figure import Figure

    cols = min(len(ys), 3)
    rows = math.ceil(len(ys) / cols)
    fig = Figure(figsize=(3.3 * cols + 2.4, 3.2 * rows + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    names = _labels(df)
    for ax, col in zip(axes, ys):
        err = stderr_values(df, col)
        for i, name in enumerate(names):
            xi, yi = df[x].iloc[i], df[col].iloc[i]
            if _num(xi) and _num(yi):
                ax.errorbar([xi / 1e6], [yi], yerr=[err[i]] if err else None, ls="none", capsize=3, label=wrap(name),
                            **style(i, df["name"].iloc[i]))
        ax.set_title(label(col) + (" ± stderr" if err else ""), fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(ys):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel(ylabel, fontsize=8)
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, fontsize=7, loc="outside right upper")
    return Plot(title, _png(fig), caption, wide=len(ys) > 1)


def bars_plot(df: pd.DataFrame, cols: list[str], title: str, xlabel: str, caption: str, reference: float | None = None) -> Plot:
    """Horizontal bars, one group per run and a bar per column, error bars where a column has a standard error."""
    df = ok_runs(df)
    cols = [c for c in cols if c in df and df[c].notna().any()]
    if not cols:
        return Plot(title, None, "")
    df = df[df[cols].notna().any(axis=1)]
    names = [wrap(n, 34) for n in _labels(df)]
    lines = sum(n.count("\n") + 1 for n in names)
    fig, ax = _figure(width=7.0, height=max(2.5, 0.3 * lines + 0.15 * len(names) * len(cols) + 1.2))
    height = 0.8 / len(cols)
    for j, col in enumerate(cols):
        pos = [i + (j - (len(cols) - 1) / 2) * height for i in range(len(names))]
        err = stderr_values(df, col)
        ax.barh(pos, df[col].fillna(0), height=height, xerr=err, capsize=2 if err else 0, label=label(col), color=COLOURS[j % len(COLOURS)])
    if reference is not None:
        ax.axvline(reference, color="#333333", lw=1, ls="--")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return Plot(title, _png(fig), caption)


# -- sweeps: one line per method setting, drawn only when the records hold them -----------


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _series(record: Record, leave_out: tuple[str, ...]) -> str:
    """The line a run belongs to: its method entry plus the grid values other than the x axis."""
    rest = [f"{k}={_short(v)}" for k, v in (record.grid or {}).items() if k not in leave_out]
    return " ".join([str(record.entry or record.name), *rest])


def _value(record: Record, column: str) -> tuple[float | None, float | None]:
    """A record's value of a metric column and its standard error (None when not recorded)."""
    flat = record.flat_metrics()
    value = flat.get(column)
    err = next((flat[e] for e in _columns.stderr_names(column) if _num(flat.get(e))), None)
    return (float(value), err) if _num(value) else (None, None)


def sweep_lines(records: list[Record], x_of: Callable[[Record], float | None], y: str, leave_out: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Lines of ``(x, y, stderr)`` points, one per method entry and grid setting other than
    ``leave_out``, keeping only lines that actually sweep x (two or more values)."""
    lines: dict[str, list[tuple]] = {}
    for r in records:
        if not r.ok or not r.pipeline:
            continue
        x, (value, err) = x_of(r), _value(r, y)
        if x is not None and value is not None:
            lines.setdefault(_series(r, leave_out), []).append((float(x), value, err))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items() if len({p[0] for p in v}) > 1}


def sweep_plot(title: str, table: SuiteTable, x_of: Callable[[Record], float | None], y: str, leave_out: tuple[str, ...],
               xlabel: str, caption: str, log_x: bool = False, ylabel: str | None = None) -> Plot | None:
    """``y`` against a swept setting ``x_of(record)``, one line per method setting, the baseline's
    value as a dashed line, error bars where ``y`` has a standard error; None when nothing sweeps."""
    lines = sweep_lines(table.records, x_of, y, leave_out)
    if not lines:
        return None
    fig, ax = _figure()
    for i, (name, points) in enumerate(lines.items()):  # past ten lines the colours repeat: dash them
        errs = [p[2] or 0.0 for p in points] if any(p[2] for p in points) else None
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=errs, fmt="o-" if i < 10 else "o--", ms=4, capsize=2 if errs else 0, label=wrap(name))
    base = next((_value(r, y)[0] for r in table.records if r.name == "baseline" and r.ok), None)
    if base is not None:
        ax.axhline(base, color="#333333", lw=1, ls="--", label="baseline")
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or f"{label(y)} ({_columns.better(y)} is better)")
    ax.grid(alpha=0.3)
    legend(ax, len(lines) + 1)
    return Plot(title, _png(fig), caption, wide=_wide(fig))


def curves_plot(title: str, curves: dict[str, list[float]], xlabel: str, ylabel: str, caption: str, log_y: bool = True) -> Plot | None:
    """One line per run (e.g. a training loss per step); None when there are none."""
    if not curves:
        return None
    fig, ax = _figure()
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, "-" if i < 10 else "--", lw=1, label=wrap(name))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    legend(ax, len(curves))
    return Plot(title, _png(fig), caption, wide=_wide(fig))


# -- which plots a report draws: declared by the plugins -----------------------------------


@dataclass(frozen=True)
class ReportPlot:
    """A plot the HTML report draws for each suite table, declared by the plugin whose figures it shows
    (``register_report_plots``).

    ``draw(table)`` returns a :class:`Plot`; one without a PNG shows its caption as what is
    missing (a plot every report has), ``None`` leaves it out (a sweep the results do not
    hold). Plots appear by ``order``, then title.
    """

    title: str
    draw: Callable[[SuiteTable], Plot | None]
    order: int = 100


def report_plots() -> list[ReportPlot]:
    """Every declared plot, in page order."""
    from .plugins import host

    found = [p for group in host().pm.hook.register_report_plots() for p in (group or ())]
    return sorted(found, key=lambda p: (p.order, p.title))


@dataclass(frozen=True)
class ExportFormat:
    """A ``moebench report --format NAME --out FOLDER`` writer, declared by the plugin whose
    figures it exports (``register_export_formats``).

    ``write(records, folder)`` writes the files and returns their paths (empty when no
    record holds what the format needs; ``needs`` then says what, in the error).
    """

    name: str
    write: Callable[[list[Any], Path], list[Path]]
    help: str = ""
    needs: str = "records with the figures this format exports"


def export_formats() -> dict[str, ExportFormat]:
    """Every declared export format, by name."""
    from .plugins import host

    return {f.name: f for group in host().pm.hook.register_export_formats() for f in (group or ())}


def plots(table: SuiteTable) -> list[Plot]:
    """The plots the installed plugins declare, those with nothing to draw left out."""
    return [p for p in (rp.draw(table) for rp in report_plots()) if p is not None]


# --------------------------------------------------------------------------- html

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}td.name{white-space:normal;overflow-wrap:anywhere;max-width:15rem}
details.more{margin:.2rem 0 .8rem}details.more summary{cursor:pointer;color:#444}
td.better{color:#1a7f37}td.worse{color:#cf222e}tr.baseline td{font-weight:600;background:#fafafa}
tr.failed td{color:#888}tr.paper td{font-style:italic;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;flex:1 1 480px;max-width:600px}.scroll{overflow-x:auto}
figure.wide{flex-basis:100%;max-width:100%}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
.missing{color:#777;font-style:italic}.small{font-size:.85rem;color:#555}
"""

# Marks the page with how many images decoded (``data-images="3/3"``) so a headless
# browser check can tell a broken embed from a working one.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


def esc(text: Any) -> str:
    return _html.escape(str(text))


def html_table(
    headers: list[str],
    rows: list[list[str]],
    classes: list[list[str]] | None = None,
    row_classes: list[str] | None = None,
    left: int = 1,
    left_tail: int = 0,
) -> str:
    """A plain HTML table (cells escaped here); the first ``left`` and last ``left_tail`` columns align left, numbers right."""
    n = len(headers)
    is_left = lambda i: i < left or i >= n - left_tail  # noqa: E731
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"l" if is_left(i) else ""}">{esc(h)}</th>' for i, h in enumerate(headers)]
    out.append("</tr></thead><tbody>")
    for r, row in enumerate(rows):
        cls = row_classes[r] if row_classes else ""
        out.append(f'<tr class="{cls}">')
        for i, value in enumerate(row):
            c = (classes[r][i] if classes else "") + (" l" if is_left(i) else "")
            out.append(f'<td class="{c.strip()}">{esc(value)}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def html_figure(plot: Plot) -> str:
    if plot.png is None:
        return f'<figure><figcaption><b>{esc(plot.title)}</b></figcaption><p class="missing">{esc(plot.caption)}</p></figure>'
    wide = ' class="wide"' if plot.wide else ""
    return (
        f'<figure{wide}><img alt="{esc(plot.title)}" src="{plot.data_uri()}">'
        f"<figcaption><b>{esc(plot.title)}</b>. {esc(plot.caption)}</figcaption></figure>"
    )


def html_page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style><script>{IMAGE_CHECK}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


#: the width an HTML table may take (the page's 1200 px less its padding), in CSS pixels
TABLE_WIDTH = 1180
#: a generous glyph width of the table font (14 px system-ui, bold headers) and a cell's padding and border
CHAR_PX, CELL_PX = 8.0, 20.0
#: run names wrap inside this width (``td.name`` in the CSS)
NAME_PX = 240


def text_width(texts: Iterable[str]) -> float:
    """An upper estimate of the pixels a column of texts takes (the widest text, padding included)."""
    return max((len(t) for t in texts), default=0) * CHAR_PX + CELL_PX


def column_groups(lead: list[float], widths: list[float], budget: float | None = None) -> list[list[int]]:
    """Split metric columns (their ``widths``) into tables that fit ``budget`` beside the ``lead`` columns.

    Columns keep their order, so the first table holds the leading (most important)
    columns; every table holds at least one column, even one wider than the budget.
    """
    budget = TABLE_WIDTH if budget is None else budget
    groups: list[list[int]] = []
    used = math.inf
    for i, w in enumerate(widths):
        if used + w > budget:
            groups.append([])
            used = sum(lead)
        groups[-1].append(i)
        used += w
    return groups


@dataclass
class HtmlColumn:
    """One column of an HTML table: header, cell texts, cell classes; ``wrap`` lets its text wrap (run names)."""

    header: str
    cells: list[str]
    classes: list[str] | None = None
    wrap: bool = False

    @property
    def width(self) -> float:
        w = text_width([self.header, *self.cells])
        return min(w, NAME_PX + CELL_PX) if self.wrap else w


def fitted_tables(lead: list[HtmlColumn], rest: list[HtmlColumn], row_classes: list[str], repeat: int) -> str:
    """HTML tables no wider than the page: the ``lead`` columns (left-aligned) and as many of
    ``rest`` as fit, then the remaining columns in tables folded into a ``<details>`` below,
    each repeating the first ``repeat`` lead columns."""
    rows = len(row_classes)

    def one(left: list[HtmlColumn], part: list[HtmlColumn]) -> str:
        shown = left + part
        cells = [[c.cells[r] for c in shown] for r in range(rows)]
        cls = [[("name " if c.wrap else "") + (c.classes[r] if c.classes else "") for c in shown] for r in range(rows)]
        return html_table([c.header for c in shown], cells, cls, row_classes, left=len(left))

    groups = column_groups([c.width for c in lead], [c.width for c in rest]) or [[]]
    first = one(lead, [rest[i] for i in groups[0]])
    if len(groups) == 1:
        return first
    folded = [[rest[i] for i in g] for g in groups[1:]]
    names = ", ".join(c.header for part in folded for c in part)
    tables = "".join(one(lead[:repeat], part) for part in folded)
    return first + f'<details class="more"><summary>{sum(map(len, folded))} more columns: {esc(names)}</summary>{tables}</details>'


def html_suite_table(table: SuiteTable, columns: list[str] | None = None) -> str:
    """A suite's runs as HTML tables no wider than the page: the leading columns first, the rest
    in tables folded into a ``<details>`` below (each repeating the run names)."""
    cols = display_columns(table, columns)
    ids = [c for c in cols if c in ("name", "origin", "status")]
    df = table.df
    lead = [HtmlColumn(label(c), [cell(row, c) for _, row in df.iterrows()], wrap=c == "name") for c in ids]
    rest = [
        HtmlColumn(label(c), [cell(row, c) for _, row in df.iterrows()], [verdict(row, c) for _, row in df.iterrows()])
        for c in cols if c not in ids
    ]
    row_classes = ["baseline" if row["name"] == "baseline" else ("paper" if row["status"] == PAPER else "failed" if row["status"] != "ok" else "") for _, row in df.iterrows()]
    repeat = len([c for c in ids if c != "status"])  # name (and origin) head every folded table
    return fitted_tables(lead, rest, row_classes, repeat)


def html(records: list[dict[str, Any]], title: str = "moebench report", columns: list[str] | None = None) -> str:
    """The whole report as one HTML page: per suite a table and its plots, then provenance."""
    body = [f"<h1>{esc(title)}</h1>"]
    for table in suite_tables(records):
        body.append(f"<h2>suite {esc(table.suite)}</h2>")
        body.append('<p class="small">Changes are against the suite\'s baseline; green is better, red is worse; '
                    "± is the standard error where the metric records one.</p>")
        body.append('<div class="scroll">' + html_suite_table(table, columns) + "</div>")
        papers = _papers(table)
        if papers:
            body.append("<p>Paper figures (status <code>paper</code>: reported by the paper, not measured here; never gated):</p><ul>"
                        + "".join(f"<li><code>{esc(r.name)}</code>: {esc(citation(r))}</li>" for r in papers) + "</ul>")
        failed = _failed(table)
        if failed:
            body.append("<p>Failed runs:</p><ul>" + "".join(f"<li><code>{esc(r.name)}</code>: {esc(r.error)}</li>" for r in failed) + "</ul>")
        body.append('<div class="plots">' + "".join(html_figure(p) for p in plots(table)) + "</div>")
    prov = provenance(records)
    body.append("<h2>provenance</h2>")
    wraps = [["", "name", "name", ""] for _ in prov]  # device and versions wrap
    body.append('<div class="scroll">' + html_table(["commit", "device", "versions", "host"], [list(p.values()) for p in prov], wraps, left=4) + "</div>")
    return html_page(title, "\n".join(body))


FORMATS = ("terminal", "markdown", "csv", "html")
EXTENSIONS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv", ".html": "html", ".htm": "html"}


def render(records: list[dict[str, Any]], fmt_name: str, title: str = "moebench report", columns: list[str] | None = None) -> str:
    """The report in one of the file formats (markdown, csv, html); ``columns`` are metric globs to show."""
    if fmt_name == "markdown":
        return markdown(records, title, columns)
    if fmt_name == "csv":
        return csv(records, columns)
    if fmt_name == "html":
        return html(records, title, columns)
    raise ValueError(f"format {fmt_name!r}: expected one of {', '.join(FORMATS)}")
