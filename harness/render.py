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
from typing import Any, Iterable

import pandas as pd

from . import columns as _columns
from .record import Record, records_of
from .report import better, fmt, frame, with_deltas

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
    dicts = [r.to_dict() if isinstance(r, Record) else r for r in records]
    for g in group(dicts, key=lambda r: r.get("suite")):
        title = f"{g.key} [{g.label}]" if g.label else g.key
        while title in by_suite:  # groups whose differences do not show in their labels stay apart
            title += "'"
        by_suite[title] = records_of(g.records)
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


def cell(row: pd.Series, column: str) -> str:
    """A formatted value, with its change against the baseline for the headline columns."""
    text = fmt(row.get(column), column)
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
        if key in shown and not r.ok:
            out[key] = r
    return list(out.values())


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

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode()


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


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


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df else df


def _labels(df: pd.DataFrame) -> list[str]:
    if "origin" in df.columns:
        return [f"{n} @{o.split()[0]}" for n, o in zip(df["name"], df["origin"])]
    return list(df["name"])


def plot_perplexity_vs_bytes(df: pd.DataFrame) -> Plot:
    title = "Perplexity vs weight bytes"
    df = _ok(df)
    if "perplexity" not in df or "weight_bytes" not in df:
        return Plot(title, None, "no perplexity or weight bytes in these results")
    df = df[df["perplexity"].notna() & df["weight_bytes"].notna()]
    if df.empty:
        return Plot(title, None, "no run has both perplexity and weight bytes")
    x = (df["weight_bytes"] / 2**20).tolist()
    y = df["perplexity"].tolist()
    names = _labels(df)
    front = pareto_front(list(zip(x, y)))
    fig, ax = _figure()
    base = [i for i, n in enumerate(df["name"]) if n == "baseline"]
    others = [i for i in range(len(x)) if i not in base]
    ax.scatter([x[i] for i in others], [y[i] for i in others], s=36, color="#4c72b0", label="runs", zorder=3)
    if base:
        ax.scatter([x[i] for i in base], [y[i] for i in base], s=80, marker="*", color="#333333", label="baseline", zorder=4)
    ax.step([x[i] for i in front], [y[i] for i in front], where="post", color="#dd8452", lw=1.5, zorder=2)
    ax.scatter([x[i] for i in front], [y[i] for i in front], s=140, facecolors="none", edgecolors="#dd8452", lw=1.8, label="Pareto front", zorder=5)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("weight bytes (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    on_front = ", ".join(names[i] for i in front)
    return Plot(title, _png(fig), f"Pareto front (no run is both smaller and lower in perplexity): {on_front}")


def accuracy_columns(df: pd.DataFrame) -> list[str]:
    """``lm_eval.<task>.acc`` columns (``acc_norm`` where a task has no ``acc``)."""
    cols = [c for c in df.columns if c.startswith("lm_eval.") and c.endswith(".acc") and df[c].notna().any()]
    tasks = {c[: -len(".acc")] for c in cols}
    cols += [c for c in df.columns if c.endswith(".acc_norm") and c.startswith("lm_eval.") and c[: -len(".acc_norm")] not in tasks and df[c].notna().any()]
    return cols


def plot_accuracy_vs_params(df: pd.DataFrame) -> Plot:
    title = "Accuracy vs parameters"
    df = _ok(df)
    cols = accuracy_columns(df)
    xcol = "params.total" if "params.total" in df else "params.active"  # expert drop changes total, not active
    if not cols or xcol not in df:
        return Plot(title, None, "no lm-eval accuracy in these results (add an [eval.lm_eval] table to the suite)")
    fig, ax = _figure()
    for col in cols:
        part = df[df[col].notna() & df[xcol].notna()]
        ax.plot(part[xcol] / 1e6, part[col], "o", label=col[len("lm_eval.") :], ms=6)
        for xi, yi, name in zip(part[xcol] / 1e6, part[col], _labels(part)):
            ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{'active' if xcol == 'params.active' else 'total'} parameters (M)")
    ax.set_ylabel("accuracy (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return Plot(title, _png(fig), f"lm-eval accuracy per task against {xcol}")


def plot_speedup(df: pd.DataFrame) -> Plot:
    title = "Speedup per method"
    df = _ok(df)
    cols = [c for c in ("speed.speedup_prefill", "speed.speedup_decode") if c in df and df[c].notna().any()]
    if not cols:
        return Plot(title, None, "no speed measurements in these results (add an [eval.speed] table to the suite)")
    df = df[df[cols].notna().any(axis=1)]
    names = _labels(df)
    fig, ax = _figure(height=max(2.5, 0.45 * len(names) + 1.2))
    height = 0.8 / len(cols)
    for j, col in enumerate(cols):
        pos = [i + (j - (len(cols) - 1) / 2) * height for i in range(len(names))]
        ax.barh(pos, df[col].fillna(0), height=height, label=col.split("_", 1)[1])
    ax.axvline(1.0, color="#333333", lw=1, ls="--")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup against the baseline (×, higher is better)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return Plot(title, _png(fig), "tokens/s of each run divided by the baseline's, measured in the same process")


# -- sweeps (fusion): drawn only when the records hold them ------------------------------


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _series(record: Record, leave_out: tuple[str, ...]) -> str:
    """The line a run belongs to: its method entry plus the grid values other than the x axis."""
    rest = [f"{k}={_short(v)}" for k, v in (record.grid or {}).items() if k not in leave_out]
    return " ".join([str(record.entry or record.name), *rest])


def _perplexity(record: Record) -> float | None:
    value = ((record.metrics or {}).get("perplexity") or {}).get("value")
    return float(value) if _num(value) else None


def _sweep(records: list[Record], x_of, leave_out: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
    """Lines of ``(x, perplexity)`` points, keeping only lines that actually sweep x (two or more values)."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if not r.ok or not r.pipeline:
            continue
        x, y = x_of(r), _perplexity(r)
        if x is not None and y is not None:
            lines.setdefault(_series(r, leave_out), []).append((float(x), y))
    return {k: sorted(v) for k, v in lines.items() if len({p[0] for p in v}) > 1}


def experts_after(record: Record) -> int | None:
    """Routed experts left by the last step that changed the expert count."""
    for step in reversed(record.pipeline):
        n = ((record.changes or {}).get(step["method"]) or {}).get("experts_after")
        if n is not None:
            return n
    return None


def lora_rank(record: Record) -> int | None:
    for step in reversed(record.pipeline):
        if step.get("params", {}).get("rank") is not None:
            return step["params"]["rank"]
    return None


def _baseline_line(ax, records: list[Record]) -> None:
    base = next((_perplexity(r) for r in records if r.name == "baseline" and r.ok), None)
    if base is not None:
        ax.axhline(base, color="#333333", lw=1, ls="--", label="baseline")


def _legend(ax, lines: int) -> None:
    """Inside the axes for a few lines, to the right of them for many (it would hide the data)."""
    if lines <= 5:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.figure.set_figwidth(ax.figure.get_figwidth() + 3.2)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _sweep_plot(title: str, lines: dict, records: list[Record], xlabel: str, caption: str, log_x: bool = False) -> Plot | None:
    if not lines:
        return None
    fig, ax = _figure()
    for i, (name, points) in enumerate(lines.items()):  # past ten lines the colours repeat: dash them
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if i < 10 else "o--", ms=4, label=name)
    _baseline_line(ax, records)
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(alpha=0.3)
    _legend(ax, len(lines))
    return Plot(title, _png(fig), caption)


def plot_perplexity_vs_experts(table: SuiteTable) -> Plot | None:
    lines = _sweep(table.records, experts_after, ("keep", "keep_ratio"))
    return _sweep_plot("Perplexity vs routed experts", lines, table.records, "routed experts left (all MoE layers)",
                       "one line per method and setting that sweeps the kept/fused expert count (changes.<method>.experts_after)")


def plot_perplexity_vs_rank(table: SuiteTable) -> Plot | None:
    lines = _sweep(table.records, lora_rank, ("rank",))
    return _sweep_plot("Perplexity vs LoRA rank", lines, table.records, "rank (log scale)",
                       "one line per method and setting that sweeps the rank parameter", log_x=True)


def loss_curves(records: Iterable[dict[str, Any] | Record]) -> dict[str, list[float]]:
    """Healing loss curves by run name (``changes.<method>.healing.loss_curve``)."""
    curves = {}
    for r in records_of(records):
        for step in r.pipeline:
            curve = (((r.changes or {}).get(step["method"]) or {}).get("healing") or {}).get("loss_curve")
            if curve and r.ok:
                curves[str(r.name)] = curve
    return curves


def plot_healing_loss(table: SuiteTable) -> Plot | None:
    curves = loss_curves(table.records)
    if not curves:
        return None
    fig, ax = _figure()
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(range(1, len(curve) + 1), curve, "-" if i < 10 else "--", lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("healing step")
    ax.set_ylabel("distillation loss (log scale)")
    ax.grid(alpha=0.3)
    _legend(ax, len(curves))
    return Plot("Healing loss curves", _png(fig), "distillation loss per step of each run that healed (changes.<method>.healing.loss_curve)")


PLOTS = (plot_perplexity_vs_bytes, plot_accuracy_vs_params, plot_speedup)
SWEEP_PLOTS = (plot_perplexity_vs_experts, plot_perplexity_vs_rank, plot_healing_loss)


def plots(table: SuiteTable) -> list[Plot]:
    """The three plots every report has, then the sweep plots its records hold."""
    drawn = [make(table.df) for make in PLOTS]
    return drawn + [p for p in (make(table) for make in SWEEP_PLOTS) if p is not None]


# --------------------------------------------------------------------------- html

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.8rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25rem .55rem;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}
td.better{color:#1a7f37}td.worse{color:#cf222e}tr.baseline td{font-weight:600;background:#fafafa}
tr.failed td{color:#888}
.plots{display:flex;flex-wrap:wrap;gap:1rem}figure{margin:0;flex:1 1 480px;max-width:600px}.scroll{overflow-x:auto}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85rem;color:#555}
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
    return (
        f'<figure><img alt="{esc(plot.title)}" src="{plot.data_uri()}">'
        f"<figcaption><b>{esc(plot.title)}</b>. {esc(plot.caption)}</figcaption></figure>"
    )


def html_page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
        f"<style>{CSS}</style><script>{IMAGE_CHECK}</script></head>\n<body>\n{body}\n</body></html>\n"
    )


def html(records: list[dict[str, Any]], title: str = "moebench report", columns: list[str] | None = None) -> str:
    """The whole report as one HTML page: per suite a table and its plots, then provenance."""
    body = [f"<h1>{esc(title)}</h1>"]
    for table in suite_tables(records):
        cols = display_columns(table, columns)
        rows, classes, row_classes = [], [], []
        for _, row in table.df.iterrows():
            rows.append([cell(row, c) for c in cols])
            classes.append([verdict(row, c) if c in table.metrics else "" for c in cols])
            row_classes.append("baseline" if row["name"] == "baseline" else ("failed" if row["status"] != "ok" else ""))
        left = 3 if "origin" in cols else 2
        body.append(f"<h2>suite {esc(table.suite)}</h2>")
        body.append('<p class="small">Changes are against the suite\'s baseline; green is better, red is worse.</p>')
        body.append('<div class="scroll">' + html_table([label(c) for c in cols], rows, classes, row_classes, left=left) + "</div>")
        failed = _failed(table)
        if failed:
            body.append("<p>Failed runs:</p><ul>" + "".join(f"<li><code>{esc(r.name)}</code>: {esc(r.error)}</li>" for r in failed) + "</ul>")
        body.append('<div class="plots">' + "".join(html_figure(p) for p in plots(table)) + "</div>")
    prov = provenance(records)
    body.append("<h2>provenance</h2>")
    body.append(html_table(["commit", "device", "versions", "host"], [list(p.values()) for p in prov], left=4))
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
