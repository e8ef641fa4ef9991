"""Commands that read results: ``report``, ``compare``, ``leaderboard``, ``merge``; and ``new-plugin``.

Imported by :mod:`moebench.cli`, these register themselves on its ``app``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Iterable, Optional

import typer
from rich.table import Table

from .console import err, out
from .errors import MoebenchError


def collect(paths: Iterable[Path]) -> list[Path]:
    """Result files named by ``paths``: a file as is; a run directory's ``results.jsonl``;
    every ``*.jsonl`` below any other directory (e.g. ``reports/`` or ``reports/<suite>``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "results.jsonl").exists():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise MoebenchError(f"{p}: no results.jsonl or other *.jsonl file below this directory")
            files.extend(found)
        else:
            files.append(p / "results.jsonl" if p.is_dir() else p)
    return files


def read_all(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of every result file, in order (later files after earlier ones)."""
    from .store import read_records, skipped_summary

    files = collect(paths)
    skipped: list[str] = []
    records = [r for f in files for r in read_records(f, skipped)]
    if skipped:
        err.print(skipped_summary(skipped), markup=False, highlight=False, soft_wrap=True)
    if not records:
        raise MoebenchError("no records in " + ", ".join(map(str, files)))
    return records


def paper_records(suites: Iterable[Path]) -> list[dict[str, Any]]:
    """The ``[[reference]]`` paper figures of these suite files, as records with status ``paper``."""
    from .reference import suite_records
    from .suite import load_suite

    return [r.to_dict() for path in suites for r in suite_records(load_suite(path))]


def _write(text: str, path: Optional[Path]) -> None:
    if path is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    if path.is_dir():
        raise MoebenchError(f"--out {path}: is a folder; expected a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise MoebenchError(f"--out {path}: cannot write it ({exc.strerror or exc})") from None
    err.print(f"wrote {path}", markup=False, highlight=False)


# --------------------------------------------------------------------------- report

def report(
    results: list[Path] = typer.Argument(..., help="results.jsonl files or run directories (several merge into one report)"),
    format: str = typer.Option("terminal", "--format", "-f", help="terminal | markdown | csv | html (default: from --out's extension, else terminal) | lm-eval (lm-eval's results JSON per run, into the --out folder)"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="write to this file instead of standard output"),
    title: str = typer.Option("moebench report", "--title", help="page title (markdown, html)"),
    columns: Optional[str] = typer.Option(None, "--columns", help="metric columns to show, comma-separated globs (e.g. 'perplexity,weight_bytes,lm_eval.*.acc')"),
    suite: list[Path] = typer.Option([], "--suite", help="show this suite's \\[\\[reference]] paper figures as rows labelled 'paper' beside its runs; repeatable"),
):
    """One table per suite with deltas against the baseline; Markdown, CSV, or an HTML page with plots."""
    from . import render
    from .report import terminal_table

    exports = render.export_formats()
    if format in exports:
        export = exports[format]
        if out_path is None:
            raise MoebenchError(f"--format {format}: name a folder with --out; {export.help or 'its files are written there'}")
        written = export.write(read_all(results), out_path)
        if not written:
            raise MoebenchError(f"--format {format}: no record to export; it needs {export.needs}")
        out.print(f"{len(written)} {format} file(s) under {out_path}", markup=False)
        return
    if format not in render.FORMATS:
        raise MoebenchError(f"--format {format!r}: expected one of {', '.join([*render.FORMATS, *exports])}")
    if format == "terminal" and out_path is not None:
        format = render.EXTENSIONS.get(out_path.suffix.lower(), "markdown")
    records = read_all(results) + paper_records(suite)
    patterns = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if format == "terminal":
        cols = None
        if patterns:
            cols = [c for t in render.suite_tables(records) for c in render.display_columns(t, patterns) if c != "origin"]
            cols = list(dict.fromkeys(cols))
        for table in terminal_table(records, cols):
            out.print(table)
        return
    _write(render.render(records, format, title, patterns), out_path)


# --------------------------------------------------------------------------- compare


def compare(
    new: Path = typer.Argument(..., help="new results (results.jsonl or run directory)"),
    baseline: Path = typer.Argument(..., help="baseline results to hold them to (e.g. reports/baselines/ci.jsonl)"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="read tolerances from this suite's \\[compare] table and list its \\[\\[reference]] paper figures beside the new results (never gated)"),
    tol: list[str] = typer.Option([], "--tol", help="PATTERN=rel:X | abs:X | X% | ignore [,higher|lower]; repeatable, wins over the suite"),
    missing: Optional[str] = typer.Option(None, "--missing", help="fail | warn: a baseline run or metric absent from the new results"),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="also write the findings as Markdown here (e.g. a CI job summary)"),
):
    """Check new results against a baseline with per-metric tolerances; exit 1 on a regression."""
    from .compare import CompareSpec, compare as run_compare, compare_spec_from_suite, markdown, parse_tolerance_arg, rows, HEADERS

    if missing not in (None, "fail", "warn"):
        raise MoebenchError(f"--missing {missing!r}: expected fail or warn")
    spec = compare_spec_from_suite(suite) if suite else CompareSpec()
    spec = spec.with_overrides([parse_tolerance_arg(t) for t in tol], missing)
    result = run_compare(read_all([new]), read_all([baseline]), spec, paper_records([suite] if suite else []))
    body = rows(result)
    if body:
        from rich.markup import escape

        table = Table(title=escape(f"{new} vs {baseline}"))
        for h in HEADERS:
            table.add_column(h, overflow="fold")
        for row in body:
            style = "red" if row[0].startswith(("regressed", "run failed", "missing")) and "warning" not in row[0] else ("green" if row[0].startswith(("improved", "fixed")) else None)
            table.add_row(*map(escape, row), style=style)
        out.print(table)
    if result.ungated:
        err.print("not gated (no tolerance names them): " + ", ".join(result.ungated), markup=False, highlight=False)
    out.print(("[green]" if result.passed else "[red]") + result.summary().replace("[", "\\["))
    if markdown_path is not None:
        _write(markdown(result), markdown_path)
    if not result.passed:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- leaderboard


def leaderboard(
    results: list[Path] = typer.Argument(..., help="result files or directories (searched for *.jsonl)"),
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="a .md or .html file, or a directory for leaderboard.md and leaderboard.html"),
    metric: Optional[str] = typer.Option(None, "--metric", help="the ranking metric column (e.g. perplexity, lm_eval.pydoc_mc.acc); default: the one a metric declares (perplexity)"),
    title: str = typer.Option("moebench leaderboard", "--title"),
    suite: list[Path] = typer.Option([], "--suite", help="show this suite's \\[\\[reference]] paper figures as rows marked 'paper' on its model's boards (never ranked); repeatable"),
):
    """A leaderboard page: one row per method configuration, best result per model, with provenance."""
    from . import leaderboard as lb

    metric = metric or lb.default_metric()
    bs = lb.boards(read_all(results) + paper_records(suite), metric)
    if not bs:
        raise MoebenchError(f"no ok record has the metric {metric!r}")
    if out_path is None:
        _write(lb.markdown(bs, title), None)
    elif out_path.suffix.lower() in (".md", ".markdown"):
        _write(lb.markdown(bs, title), out_path)
    elif out_path.suffix.lower() in (".html", ".htm"):
        _write(lb.html(bs, title), out_path)
    else:
        _write(lb.markdown(bs, title), out_path / "leaderboard.md")
        _write(lb.html(bs, title), out_path / "leaderboard.html")


# --------------------------------------------------------------------------- merge


def merge(
    results: list[Path] = typer.Argument(..., help="the shards' results.jsonl files or run directories"),
    out_path: Path = typer.Option(..., "--out", "-o", help="merged results file (a directory gets results.jsonl)"),
    suite: Optional[Path] = typer.Option(None, "--suite", help="order runs as in this suite and report any that no shard has"),
):
    """Join shards' (or machines') results into one results file; one record per run."""
    from .shard import merge as join
    from .store import ResultStore, read_records, skipped_summary

    files = collect(results)
    order = names = None
    if suite is not None:
        from .suite import load_suite

        runs = load_suite(suite).runs()
        order, names = [r.run_id for r in runs], {r.run_id: r.name for r in runs}
    skipped: list[str] = []
    merged = join([list(read_records(f, skipped)) for f in files], order)
    if skipped:
        err.print(skipped_summary(skipped), markup=False, highlight=False, soft_wrap=True)
    target = out_path / "results.jsonl" if out_path.is_dir() or not out_path.suffix else out_path
    if target.exists() and (target.is_dir() or target.stat().st_size):
        raise MoebenchError(f"{target}: already exists; merge writes a new file")
    store = ResultStore(target)
    for r in merged.records:
        store.append(r)
    err.print(f"merged {len(files)} file(s): {len(merged.records)} run(s), {len(merged.duplicates)} duplicate(s) dropped -> {target}", markup=False, highlight=False)
    if merged.missing:
        err.print("missing from every input: " + ", ".join(names[m] for m in merged.missing), markup=False, highlight=False)
        raise typer.Exit(1)


# --------------------------------------------------------------------------- new-plugin

TEMPLATE = Path(__file__).parent / "templates" / "plugin"


def scaffold(name: str, parent: Path) -> Path:
    """Write the package ``moebench-<name>`` under ``parent`` from the plugin template; returns its folder."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise MoebenchError(f"plugin name {name!r}: expected lowercase letters, digits and underscores, starting with a letter (it is the method's name)")
    from .plugins import host

    if name in host().methods:
        raise MoebenchError(f"plugin name {name!r}: a method of that name is already installed; pick another")
    values = {
        "name": name,
        "module": f"moebench_{name}",
        "package": f"moebench-{name.replace('_', '-')}",
        "cls": "".join(part.capitalize() for part in name.split("_")),
    }
    root = parent / values["package"]
    if root.exists():
        raise MoebenchError(f"{root}: already exists; choose another name or --dir")
    for src in sorted(TEMPLATE.rglob("*.tmpl")):
        rel = Path(str(src.relative_to(TEMPLATE)).replace("__module__", values["module"]))
        dest = root / rel.with_suffix("")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(string.Template(src.read_text(encoding="utf-8")).substitute(values), encoding="utf-8")
    return root


def new_plugin(
    name: str = typer.Argument(..., help="the method's name (lowercase, e.g. my_prune); the package is moebench-NAME"),
    directory: Path = typer.Option(Path("."), "--dir", help="where to create the package folder"),
):
    """Write a ready plugin package: pyproject with the entry point, a method skeleton, a test, a suite."""
    root = scaffold(name, directory)
    typer.echo(f"created {root}")
    typer.echo(f"next: pip install -e {root} && pytest {root / 'tests'} && moebench run {root / 'suite.toml'}")


def register(app: typer.Typer) -> None:
    """Add the report commands to the ``moebench`` app (kept apart from :mod:`moebench.cli`, which calls this)."""
    for fn in (report, compare, leaderboard, merge):
        app.command()(fn)
    app.command("new-plugin")(new_plugin)
