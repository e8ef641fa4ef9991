"""The ``moebench`` command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

# Third-party progress bars (transformers' weight loading and saving, datasets, lm-eval's
# tqdm loops) would interleave with moebench's own log; set before any of them is imported,
# and only where the user has not chosen. tqdm reads TQDM_* overrides from the environment.
for _var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
    os.environ.setdefault(_var, "1")

import typer
from rich.table import Table

from .errors import MoebenchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark Mixture-of-Experts compression methods.")
zoo_app = typer.Typer(no_args_is_help=True, help="Tiny trained MoE checkpoints for every adapted architecture.")
app.add_typer(zoo_app, name="zoo")
from .console import err, out  # noqa: E402  (re-exported: plugins' commands print with moebench.cli.out/err)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"moebench {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version, help="print moebench's version and exit")):
    """Benchmark Mixture-of-Experts compression methods."""


@app.command()
def run(
    suite: Path = typer.Argument(..., help="suite TOML file"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="results directory (default reports/<suite>/<timestamp>)"),
    resume: bool = typer.Option(False, "--resume", help="skip runs already recorded ok (in --out, else the latest run directory)"),
    save_models: Optional[Path] = typer.Option(None, "--save-models", help="save each compressed model under this folder"),
    shard: Optional[str] = typer.Option(None, "--shard", help="run shard K of N (K/N, e.g. 1/2): a deterministic subset of the runs; join with moebench merge. 'slurm' takes K/N from the SLURM job array this runs in"),
    executor: str = typer.Option("serial", "--executor", help="where runs execute: serial (here, one after another) or ray (one Ray task per run; pip install 'moebench[ray]')"),
    address: Optional[str] = typer.Option(None, "--address", help="with --executor ray: the running cluster to use (e.g. 10.0.0.1:6379 or auto); default: start a local one"),
    retries: int = typer.Option(1, "--retries", help="with --executor ray: times a run whose worker died is tried again before it is recorded as failed"),
):
    """Run a suite: baseline and every method, one JSON record per run."""
    from .executor import make_executor
    from .report import terminal_table
    from .runner import RunOptions, default_out, latest_out, run_suite
    from .shard import resolve_shard
    from .suite import load_suite

    from .preflight import check_output

    s = load_suite(suite)
    chosen = resolve_shard(shard)
    select = chosen.selector() if chosen else None
    runner = make_executor(executor, address=address, retries=retries)
    if out_dir is not None:
        check_output(out_dir, create=True)  # an existing file, an unwritable place: said before anything else
    target = out_dir or (latest_out(s) if resume else None) or default_out(s)
    err.print(f"suite {s.name}: {len(s.runs())} run(s){f', shard {chosen}' if chosen else ''}{f', on {executor}' if executor != 'serial' else ''} -> {target / 'results.jsonl'}")
    try:
        with runner:
            result = run_suite(s, RunOptions(out=target, resume=resume, select=select, save_models=save_models.resolve() if save_models else None, executor=runner, log=lambda m: err.print(m, markup=False, highlight=False)))
    except KeyboardInterrupt:
        err.print(f"interrupted; finished runs are in {target / 'results.jsonl'} (continue with --resume --out {target})")
        raise typer.Exit(130)
    from .store import read_records

    for table in terminal_table(list(read_records(target / "results.jsonl"))):
        out.print(table)
    failed = [r.name for r in result.records if not r.ok]
    if failed:
        err.print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        raise typer.Exit(1)


@app.command()
def validate(
    suite: Path = typer.Argument(..., help="suite TOML file"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="also check this results directory is writable (default: reports/)"),
):
    """Check a suite without running it (data, tasks, model, parameters, output folder); lists its runs."""
    from .preflight import check_suite
    from .suite import load_suite

    s = load_suite(suite)
    check_suite(s, out_dir if out_dir is not None else Path("reports"))
    runs = s.runs()
    out.print(f"{suite}: ok, {len(runs)} run(s)")
    for r in runs:
        steps = " -> ".join(step.method for step in r.pipeline) or "(baseline)"
        out.print(f"  {r.run_id}  {r.name}: {steps}", markup=False, highlight=False)


@app.command()
def plugins():
    """List plugins with their versions and what each provides (and any that failed to load)."""
    from .plugins import host

    table = Table("plugin", "package", "version", "provides")
    for p in host().plugins:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in p.provides.items() if v)
        table.add_row(p.name, p.distribution, p.version, f"[red]failed to load: {p.error}[/red]" if p.error else provides)
    out.print(table)


@app.command()
def methods(name: Optional[str] = typer.Argument(None, help="show one method only")):
    """Each method's parameters, with types, defaults and help."""
    _describe("methods", name)


@app.command()
def metrics(name: Optional[str] = typer.Argument(None, help="show one metric only")):
    """Each metric's parameters (its eval.NAME table in a suite), with types, defaults and help."""
    _describe("metrics", name)


def _describe(kind: str, name: str | None) -> None:
    from .method import summary_of
    from .params import describe
    from .plugins import host

    table_of = getattr(host(), kind)
    names = [name] if name else sorted(table_of)
    for n in names:
        cls = host().method(n) if kind == "methods" else host().metric(n)
        out.print(f"[bold]{n}[/bold] — {summary_of(cls)}")
        rows = describe(cls.Params)
        if not rows:
            out.print("  (no parameters)")
            continue
        table = Table("parameter", "type", "default", "help", show_edge=False)
        for row in rows:
            table.add_row(row["name"], row["type"], row["default"], row["help"])
        out.print(table)


@zoo_app.command("list")
def zoo_list():
    """The zoo's models and whether each is built (in the cache, ready to load without training)."""
    from . import zoo

    table = Table("name", "built", "description")
    for name in zoo.names():
        builds = zoo.builds(name)
        default = zoo.folder(name)
        state = "yes" if default in builds else f"no (moebench zoo build {name})"
        others = [p for p in builds if p != default]
        if others:
            state += f"; {len(others)} other build(s)"
        table.add_row(name + (" (default)" if name == zoo.DEFAULT else ""), state, zoo.ZOO[name].description)
    out.print(table)


@zoo_app.command("build")
def zoo_build(
    names: list[str] = typer.Argument(None, help="zoo models to build (default: the default one)"),
    all_: bool = typer.Option(False, "--all", help="build every zoo model"),
    force: bool = typer.Option(False, "--force", help="rebuild even if cached"),
    steps: Optional[int] = typer.Option(None, "--steps", help="training steps (default: each model's recipe); a suite names the result zoo:NAME?steps=N"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads to train on (default 2; a suite's [hardware] threads picks the build trained on that many)"),
):
    """Build (train) zoo checkpoints into the cache."""
    from . import zoo

    if steps is not None and steps < 1:
        raise MoebenchError(f"--steps {steps}: expected a positive number of training steps")
    if threads is not None and threads < 1:
        raise MoebenchError(f"--threads {threads}: expected a positive number of CPU threads")
    for name in zoo.names() if all_ else (names or [zoo.DEFAULT]):
        path = zoo.build(name, force=force, steps=steps, threads=threads)
        out.print(f"{name}: {path}")


def main() -> None:
    """Console entry point: user errors print one line and exit 2."""
    try:
        app()
    except MoebenchError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # a disk or file problem outside the checks (full, read-only, vanished): one line
        where = f"{exc.filename}: " if exc.filename else ""
        err.print(f"error: {where}{exc.strerror or exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)


# The report commands live in their own module; plugins add theirs through `register_commands`.
from . import cli_reports  # noqa: E402

cli_reports.register(app)


def _plugin_commands() -> None:
    from .plugins import host

    host().pm.hook.register_commands(cli=app)


_plugin_commands()


if __name__ == "__main__":
    # `python -m moebench.cli`: run the imported module's app, where the command modules registered
    from moebench.cli import main as _main

    _main()
