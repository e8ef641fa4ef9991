"""The runner: a suite's runs, one after another, each recorded the moment it ends.

For each run: load a fresh model, apply the method pipeline, measure every configured
metric, append one record. A run that raises is recorded as failed and the suite goes
on; ``resume`` skips runs that already have an ``ok`` record. Statistics every method
of the suite needs from the uncompressed model are gathered in one calibration pass up
front and shared through the calibration cache.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__, model_card, placement
from .adapter import MoEModel
from .calibration import Calibration
from .memory import PeakMemory
from .method import Context
from .models import LOADER, load
from .params import to_dict
from .plugins import host
from .record import Record
from .store import ResultStore
from .suite import RunSpec, Suite


@dataclass
class RunOptions:
    out: Path
    resume: bool = False
    #: keep only these runs (e.g. a shard); the baseline is always kept when anything runs
    select: Callable[[list[RunSpec]], list[RunSpec]] | None = None
    log: Callable[[str], None] = print
    #: write each compressed model here (one folder per run: ``<name>-<run id>`` with a README model card) when set
    save_models: Path | None = None
    #: where the runs execute (:mod:`moebench.executor`); None runs them here, one after another (:class:`SerialExecutor`)
    executor: Any = None


@dataclass
class Job:
    """One run and all it needs, self-contained so it can execute in another process (a Ray worker)."""

    suite: Suite
    spec: RunSpec
    calibration: Calibration | None = None
    #: the baseline's metrics, for relative metrics (speedups)
    baseline: dict[str, Any] | None = None
    save_models: Path | None = None
    #: the suite's output folder (``--out``); files a metric writes for a run go under ``<out>/runs/<name>-<run id>``
    out: Path | None = None


def run_job(job: Job, log: Callable[[str], None] = print) -> Record:
    """Execute one run and return its record: the per-run unit every executor calls."""
    suite = job.suite
    if suite.hardware.threads:
        torch.set_num_threads(suite.hardware.threads)
    run_dir = Path(job.out) / "runs" / model_card.folder_name(job.spec.name, job.spec.run_id) if job.out is not None else None
    ctx = Context(seed=suite.info.seed, calibration=job.calibration, device=suite.model.device, baseline=job.baseline, suite=suite, log=log, run_dir=run_dir)
    return execute(suite, job.spec, ctx, job.save_models)


@dataclass
class SuiteResult:
    out: Path
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)


def default_out(suite: Suite, reports: str | os.PathLike = "reports") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(reports) / suite.name / stamp


def latest_out(suite: Suite, reports: str | os.PathLike = "reports") -> Path | None:
    """The newest existing run directory of a suite (what ``--resume`` continues by default)."""
    root = Path(reports) / suite.name
    dirs = sorted(p for p in root.glob("*") if (p / "results.jsonl").exists()) if root.exists() else []
    return dirs[-1] if dirs else None


def run_suite(suite: Suite, options: RunOptions) -> SuiteResult:
    from .preflight import check_output, check_suite, disk_failure, inside

    check_suite(suite)  # every bad input that can be known without weights, before any work
    check_output(options.out, create=True)
    if options.save_models is not None:
        check_output(options.save_models, "--save-models", create=True)
    if suite.hardware.threads:
        torch.set_num_threads(suite.hardware.threads)
    store = ResultStore(inside(options.out, options.out / "results.jsonl", "results file"))
    runs = suite.runs()
    if options.select is not None:
        chosen = options.select(runs)
        runs = [r for r in runs if r.is_baseline or r in chosen] if chosen else []
    done = store.finished_ids() if options.resume else set()
    todo = [r for r in runs if r.run_id not in done]
    result = SuiteResult(options.out, skipped=[r.name for r in runs if r.run_id in done])
    if result.skipped:
        options.log(f"resume: {len(result.skipped)} finished run(s) skipped")
    calibration = Calibration(suite.calibration) if suite.calibration else None
    options.out.mkdir(parents=True, exist_ok=True)
    executor = options.executor or SerialExecutor()

    if calibration is not None:
        executor.precalibrate(suite, todo, calibration, options.log)

    baseline: dict[str, Any] | None = None
    needs_relative = [name for name in suite.evals if host().metric(name).relative]
    if todo and needs_relative and runs and runs[0].is_baseline and runs[0] not in todo:
        options.log("re-measuring the baseline for relative metrics: " + ", ".join(needs_relative))
        baseline = executor.measure(suite, runs[0], needs_relative, calibration)

    records = contextlib.closing(_records(executor, suite, todo, calibration, baseline, needs_relative, options))
    with _interrupts() as interrupted, records as finished:  # closing cancels what an executor still has queued
        for spec, record in finished:
            store.append(record)  # a disk that refuses it stops the suite here (DiskFull), the file left whole
            host().notify("on_record", suite=suite, record=record.to_dict())  # plugins get the JSON object, as written
            result.records.append(record)
            status = "ok" if record.ok else f"FAILED: {record.error}"
            options.log(f"  {spec.name}: {status}")
            if interrupted.is_set():  # Ctrl-C landed in a finalizer, which swallows the exception
                raise KeyboardInterrupt
            if disk_failure(record.error):  # a run the disk failed: recorded, then the suite stops
                from .store import DiskFull

                raise DiskFull(f"run {spec.name!r}: the disk refused data ({record.error}); stopped after this run, finished runs are in {store.path}; free space, then continue with --resume")
    _PRISTINE.clear()  # the model snapshot lives for one suite
    result.calibration = calibration.summary() if calibration else {}
    return result


def _records(executor, suite: Suite, todo: list[RunSpec], calibration, baseline, needs_relative, options: RunOptions):
    """(spec, record) as the executor finishes runs; with relative metrics the baseline runs alone
    first and its figures go to every later run."""

    count = iter(range(1, len(todo) + 1))

    def started(spec: RunSpec) -> None:
        host().notify("on_run_start", suite=suite, spec=spec)
        options.log(f"run {next(count)}/{len(todo)}: {spec.name} ({spec.run_id})")

    first = [r for r in todo if r.is_baseline] if needs_relative else []
    for batch in (first, [r for r in todo if r not in first]):
        jobs = [Job(suite, spec, calibration, baseline, options.save_models, options.out) for spec in batch]
        for spec, record in executor.run(jobs, started, options.log):
            if spec.is_baseline and record.ok:
                baseline = record.metrics
            yield spec, record


@contextlib.contextmanager
def _interrupts():
    """Remember every Ctrl-C, besides raising KeyboardInterrupt as usual.

    Python ignores an exception raised inside ``__del__`` (freeing a model runs many), so
    a Ctrl-C arriving there would be lost and the suite would run on; the flag makes the
    runner stop after the run it is in.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def execute(suite: Suite, spec: RunSpec, ctx: Context, save_models: Path | None = None) -> Record:
    """One run: fresh model, pipeline, metrics. Exceptions become a failed record."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = _new_record(suite, spec, ctx.notes)
    torch.manual_seed(suite.info.seed)
    model = None
    try:
        model = load_model(suite, keep=True)
        if spec.pipeline and placement.materialize(model.model):  # device = "auto" with offload
            ctx.note("device=auto: offloaded layers were loaded into CPU memory to be edited, and ran there")
        if model.stream is not None:
            ctx.note("offload=disk: decoder layers were read from the checkpoint one at a time; each step wrote a new checkpoint layer by layer")
        t0 = time.perf_counter()
        steps: dict[str, float] = {}
        with PeakMemory(suite.model.device) as peak:
            record.changes = apply_pipeline(model, spec, ctx, steps)
        if spec.pipeline:
            record.metrics["compress_seconds"] = time.perf_counter() - t0
            if peak.bytes is not None:
                record.metrics.update(compress_peak_bytes=peak.bytes, compress_peak_kind=peak.kind)
        if len(steps) > 1:
            record.metrics["compress_seconds_by_step"] = steps
        if save_models is not None and spec.pipeline:
            from .preflight import inside

            folder = inside(save_models, save_models / model_card.folder_name(spec.name, spec.run_id), "saved model folder")
            if model.stream is not None:  # [model] offload: the last step already wrote the checkpoint, layer by layer
                model.stream.keep(folder)
            else:
                model.save(folder)
            loader = LOADER if model.saved_format == "moebench" else model_card.TRANSFORMERS
            record.saved_model = {"path": str(folder), "loader": loader, "format": model.saved_format}
            ctx.log(f"  saved to {folder}; load it with:\n    " + model_card.how_to_load(folder, loader).replace("\n", "\n    "))
        record.metrics.update(measure(model, suite, ctx))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, and the suite goes on
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        record.traceback = traceback.format_exc(limit=8)
    finally:
        if model is not None and model.stream is not None:
            model.stream.close()  # the streamed steps' outputs nobody kept
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if record.saved_model:
        model_card.write(record.saved_model["path"], record)
    if ctx.calibration is not None and spec.pipeline:
        record.calibration = {**ctx.calibration.spec.key(), **ctx.calibration.summary()}
    record.started = started
    record.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record.env = environment(suite.model.device)
    return record


def _new_record(suite: Suite, spec: RunSpec, notes: list[str]) -> Record:
    return Record(
        run_id=spec.run_id,
        suite=suite.name,
        name=spec.name,
        entry=spec.entry,
        grid=spec.grid,
        pipeline=[s.to_dict() for s in spec.pipeline],
        model={"source": suite.model.source, "dtype": suite.model.dtype},
        evals={name: to_dict(params) for name, params in suite.evals.items()},
        notes=notes,  # the run's Context.notes: what a method notes later lands here too
    )


def failed_record(suite: Suite, spec: RunSpec, error: str) -> Record:
    """The record of a run that never returned one (its worker died): failed, with the cause."""
    record = _new_record(suite, spec, [])
    record.status, record.error = "failed", error
    record.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


#: the suite's model as loaded, in host memory: (load arguments, snapshot); see load_model
_PRISTINE: list = []


def load_model(suite: Suite, keep: bool = False) -> MoEModel:
    """A clean model for one run: with ``keep`` (the runs of a suite), loaded once and then
    restored from a host-memory snapshot.

    Restoring is a memory copy instead of re-reading the checkpoint; a model too large for
    a second host copy (see :func:`moebench.models.snapshot`) is reloaded every run as before.
    """
    from .models import fingerprint, restore, snapshot

    m = suite.model
    if m.offload is not None:  # streamed from its checkpoint: nothing but embeddings and head is loaded, so nothing to keep
        from . import offload
        from .models import resolve

        path = resolve(m.source, suite.hardware.threads, m.dtype)
        return offload.open_model(path, dtype=m.dtype, device=m.device, source=m.source)
    if not keep:
        return _load(suite)
    local = fingerprint(m.source) if os.path.isdir(m.source) else None
    key = (m.source, local, m.dtype, m.device, m.trust_remote_code, str(suite.hardware.max_memory))
    if _PRISTINE and _PRISTINE[0][0] == key and m.device != "auto":
        return restore(_PRISTINE[0][1], m.device)
    _PRISTINE.clear()
    model = _load(suite)
    if m.device != "auto":
        pristine = snapshot(model)
        if pristine is not None:
            _PRISTINE.append((key, pristine))
    return model


def _load(suite: Suite) -> MoEModel:
    m = suite.model
    return load(m.source, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code, max_memory=suite.hardware.max_memory, threads=suite.hardware.threads)


def apply_pipeline(model: MoEModel, spec: RunSpec, ctx: Context, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """Apply each step in order; returns each step's changes keyed by method name (``name#2`` on repeats).

    ``seconds``, when given, receives each step's wall time under the same key (device
    work included: CUDA is synchronised before the clock stops).
    """
    changes: dict[str, Any] = ctx.changes  # the run's metrics and later steps read it
    for step in spec.pipeline:
        method = host().method(step.method)()
        key = step.method
        n = 2
        while key in changes:
            key, n = f"{step.method}#{n}", n + 1
        t0 = time.perf_counter()
        if model.stream is not None:  # [model] offload: the step reads one checkpoint and writes the next, layer by layer
            model.stream.begin()
            try:
                changes[key] = method.apply(model, step.params, ctx) or {}
            except BaseException:
                model.stream.abort()
                raise
            model.stream.end(step.method)
        else:
            changes[key] = method.apply(model, step.params, ctx) or {}
        model.record_step(step.method, step.params)  # later steps never read statistics of the model before this one
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        if seconds is not None:
            seconds[key] = time.perf_counter() - t0
    return changes


def measure(model: MoEModel, suite: Suite, ctx: Context, only: list[str] | None = None) -> dict[str, Any]:
    """Every always-on metric plus each ``[eval.<name>]`` of the suite, merged into one dict."""
    from .params import NoParams

    metrics: dict[str, Any] = {}
    for name, cls in host().metrics.items():
        if only is not None and name not in only:
            continue
        if name in suite.evals:
            params = suite.evals[name]
        elif cls.always:
            params = NoParams() if cls.Params is NoParams else cls.Params()
        else:
            continue
        model.model.eval()
        metrics.update(cls().measure(model, params, ctx))
    return metrics


def measure_only(suite: Suite, spec: RunSpec, names: list[str], calibration) -> dict[str, Any]:
    ctx = Context(seed=suite.info.seed, calibration=calibration, device=suite.model.device, suite=suite)
    torch.manual_seed(suite.info.seed)
    model = load_model(suite, keep=True)
    try:
        return measure(model, suite, ctx, only=names)
    finally:
        del model
        gc.collect()


def precalibrate(suite: Suite, todo: list[RunSpec], calibration: Calibration, log) -> None:
    """Gather, in one pass, what every run's first step reads from the uncompressed model."""
    needs: list[str] = []
    for spec in todo:
        if spec.pipeline:
            first = spec.pipeline[0]
            needs.extend(host().method(first.method)().requires(first.params).stats)
    needs = list(dict.fromkeys(needs))
    if not needs:
        return
    model = load_model(suite, keep=True)
    try:
        calibration.stats(model, needs)
    finally:
        del model
        gc.collect()
    s = calibration.summary()
    log(f"calibration: {s['passes']} pass(es); computed {', '.join(s['computed']) or 'nothing'}; reused from cache {', '.join(s['reused']) or 'nothing'}")


_ENV_CACHE: dict[str, Any] = {}


def environment(device: str) -> dict[str, Any]:
    """Versions, git commit and device, so any figure can be traced to what produced it."""
    if not _ENV_CACHE:
        import importlib.metadata as md

        versions = {}
        for pkg in ("torch", "transformers", "lm_eval", "safetensors", "bitsandbytes", "faiss-cpu", "peft"):
            try:
                versions[pkg.replace("-", "_")] = md.version(pkg)
            except md.PackageNotFoundError:
                pass
        _ENV_CACHE.update(
            {"moebench": __version__, **versions, "python": platform.python_version(), "git_commit": _git_commit(), "host": platform.node()}
        )
    env = dict(_ENV_CACHE)
    env["device"] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name()
    else:
        env["device_name"] = platform.processor() or platform.machine()
    env["threads"] = torch.get_num_threads()
    return env


def _git_commit() -> str | None:
    """The commit of the moebench checkout in use (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class SerialExecutor:
    """Runs here, in this process, one after another."""

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def precalibrate(self, suite, todo, calibration, log) -> None:
        precalibrate(suite, todo, calibration, log)

    def measure(self, suite, spec, names, calibration) -> dict[str, Any]:
        return measure_only(suite, spec, names, calibration)

    def run(self, jobs, started, log):
        for job in jobs:
            started(job.spec)
            yield job.spec, run_job(job, log)
