"""lm-eval scores of the model as it is in memory: metric ``lm_eval``.

lm-eval's ``HFLM`` wraps the live ``transformers`` model and tokenizer, so a compressed
model is scored exactly as the method left it (custom modules, per-layer expert counts)
with no save/reload round trip. Generation tasks take the suite's ``gen_kwargs`` and
lm-eval's chat-template options; ``log_samples`` keeps lm-eval's own per-sample files,
written by its ``EvaluationTracker`` as its CLI writes them. We call lm-eval's ``evaluate`` rather than
``simple_evaluate``: the latter asks the Hugging Face Hub about the model (network) and
gathers environment details the runner already records.

Task names are looked up first among the offline tasks that ship with moebench
(``pydoc_mc``, ``pydoc_cloze``, the generation task ``pydoc_gen``; see :mod:`moebench_plugins.metrics.lmeval_tasks`) and the suite's
``include_paths``; lm-eval's own registry (thousands of YAML files, slow to index) is
read only when a name is not found there, and once per process.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from moebench.adapter import MoEModel
from moebench.columns import Column
from moebench.errors import MoebenchError, did_you_mean
from moebench.hookspecs import hookimpl
from .lmeval_tasks import GENERATION_TASKS, TASKS, TASKS_DIR
from moebench.method import Context, Metric
from moebench.params import ParamError, param


@dataclass
class LmEvalParams:
    tasks: list[str] = param(default_factory=lambda: list(TASKS), help="lm-eval task or group names (or task YAML paths)")
    num_fewshot: int | None = param(None, help="few-shot examples per item (default: each task's own, else 0)")
    limit: int | float | None = param(None, help="at most this many items per task; a value below 1 is a fraction")
    batch_size: int = param(8, help="requests per forward pass")
    include_paths: list[str] = param(default_factory=list, help="folders of local task YAML files (relative to the suite file)")
    max_length: int | None = param(None, help="longest input in tokens (default: the model's context length)")
    bootstrap_iters: int = param(1000, help="bootstrap resamples for standard errors of non-mean metrics (0: none)")
    log_samples: bool = param(False, help="keep lm-eval's per-sample outputs: samples_<task>_<date>.jsonl beside lm-eval's results_<date>.json in <--out>/runs/<run>/")
    gen_kwargs: dict[str, Any] = param(default_factory=dict, help="generation settings for generate_until tasks, over each task's own: max_gen_toks, until, do_sample, temperature, top_p, top_k")
    apply_chat_template: bool = param(False, help="wrap every prompt in the tokenizer's chat template (lm-eval's apply_chat_template)")
    fewshot_as_multiturn: bool = param(False, help="with apply_chat_template: few-shot examples as earlier chat turns")
    system_instruction: str | None = param(None, help="a system message before every prompt")

    def check(self):
        if not self.tasks:
            raise ValueError("tasks must name at least one lm-eval task, e.g. ['pydoc_mc']")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.limit is not None and not (self.limit > 0 and (self.limit < 1 or float(self.limit).is_integer())):
            raise ValueError(f"limit must be a whole number of items or a fraction in (0, 1), got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.bootstrap_iters < 0:
            raise ValueError(f"bootstrap_iters must be >= 0, got {self.bootstrap_iters}")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise ValueError("fewshot_as_multiturn needs apply_chat_template = true")
        check_gen_kwargs(self.gen_kwargs)


#: what gen_kwargs may set, each with a check of its value and what it expects
GEN_KWARGS: dict[str, tuple[Any, str]] = {
    "max_gen_toks": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive whole number of tokens"),
    "until": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) and x for x in v)), "a string or a list of non-empty strings that end generation"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
}


def check_gen_kwargs(gen_kwargs: dict[str, Any]) -> None:
    """A ParamError naming ``gen_kwargs.KEY`` for an unknown setting or a value of the wrong kind."""
    for key, value in gen_kwargs.items():
        if key not in GEN_KWARGS:
            raise ParamError(f"gen_kwargs.{key}", f"unknown generation setting{did_you_mean(key, GEN_KWARGS)}; expected any of {', '.join(GEN_KWARGS)}")
        ok, expected = GEN_KWARGS[key]
        if not ok(value):
            raise ParamError(f"gen_kwargs.{key}", f"expected {expected}, got {value!r}")


@contextlib.contextmanager
def _quiet():
    """Keep lm-eval's INFO chatter (and its warning about being handed a model object) out of the run log."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@lru_cache(maxsize=8)
def task_manager(include_paths: tuple[str, ...] = (), defaults: bool = False):
    """An lm-eval TaskManager over moebench's tasks and ``include_paths`` (plus lm-eval's own when ``defaults``)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *include_paths], include_defaults=defaults)


def find_tasks(tasks: list[str], include_paths: tuple[str, ...] = ()):
    """The cheapest TaskManager that knows every name in ``tasks``, or a MoebenchError naming the unknown ones."""
    manager = task_manager(include_paths)
    missing = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if missing:
        manager = task_manager(include_paths, defaults=True)
        missing = [t for t in missing if t not in manager.all_tasks]
    if missing:
        hint = did_you_mean(missing[0], manager.all_tasks)
        raise MoebenchError(
            f"eval.lm_eval.tasks: unknown lm-eval task {missing[0]!r}{hint}; expected an lm-eval task or group name, "
            f"one of the offline tasks ({', '.join(TASKS + GENERATION_TASKS)}), or a task in include_paths"
        )
    return manager


@lru_cache(maxsize=1)
def quiet_hflm():
    """lm-eval's ``HFLM`` without its progress bars (they would interleave with the run log).

    lm-eval passes ``disable_tqdm=False`` explicitly, so tqdm's environment defaults cannot
    turn its bars off; each request type is asked with ``disable_tqdm=True`` instead.
    """
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def evaluate(
    model: MoEModel,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_paths: tuple[str, ...] = (),
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    log_samples: bool = False,
    gen_kwargs: dict[str, Any] | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    system_instruction: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval on the in-memory model; returns lm-eval's raw results dict (with ``samples`` when ``log_samples``).

    ``gen_kwargs`` update each generation task's own ``generation_kwargs``, as lm-eval's
    ``--gen_kwargs`` does; the chat-template options are lm-eval's own.
    """
    from lm_eval import evaluator

    if model.tokenizer is None:
        raise MoebenchError(f"model {model.source!r} has no tokenizer; lm-eval needs one")
    if apply_chat_template and not getattr(model.tokenizer, "chat_template", None):
        raise MoebenchError(
            f"eval.lm_eval.apply_chat_template: the tokenizer of {model.source!r} has no chat template; "
            "expected a model whose tokenizer_config.json has one (or set apply_chat_template = false)"
        )
    with _quiet():
        manager = find_tasks(list(tasks), tuple(include_paths))
        lm = quiet_hflm()(pretrained=model.model, tokenizer=model.tokenizer, batch_size=batch_size, max_length=max_length)
        loaded = manager.load(list(tasks))
        for task in loaded["tasks"].values():  # what simple_evaluate does before evaluating
            if gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=seed)
        return evaluator.evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            system_instruction=system_instruction,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn,
        )


def write_samples(results: dict[str, Any], folder: Path) -> dict[str, Any]:
    """lm-eval's own files for one evaluation, written by its ``EvaluationTracker`` as its CLI
    does: ``results_<date>.json`` and one ``samples_<task>_<date>.jsonl`` per task, in ``folder``.

    Pops ``samples`` from ``results``; returns ``{"results": path, "samples": {task: path}}``.
    """
    from lm_eval.loggers import EvaluationTracker

    samples = results.pop("samples", None) or {}
    folder.mkdir(parents=True, exist_ok=True)
    tracker = EvaluationTracker(output_path=str(folder / "results.json"))  # a .json path: files go in its folder
    with _quiet():
        tracker.save_results_aggregated(results=copy.deepcopy(results), samples=samples)
        date = getattr(tracker, "date_id", None)
        for task in results.get("configs") or {}:
            if task in samples:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    written = {"results": folder / f"results_{date}.json", "samples": {t: folder / f"samples_{t}_{date}.jsonl" for t in samples}}
    missing = [p for p in [written["results"], *written["samples"].values()] if not p.is_file()]
    if date is None or missing:  # lm-eval logs a failed write as a warning and goes on
        raise MoebenchError(f"eval.lm_eval.log_samples: lm-eval could not write {missing[0] if missing else 'its results'} in {folder}; expected a writable --out folder")
    return {"results": str(written["results"]), "samples": {t: str(p) for t, p in written["samples"].items()}}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def scores(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: value, metric_stderr: value}}`` from lm-eval's results (groups included).

    lm-eval keys metrics ``"acc,none"`` (metric, filter); the default filter ``none`` is
    dropped, any other is kept as ``acc/<filter>``. A standard error lm-eval did not
    compute (``"N/A"``) is ``None``.
    """
    out: dict[str, dict[str, float | None]] = {}
    for section in ("results", "groups"):
        for task, table in (results.get(section) or {}).items():
            row = out.setdefault(task, {})
            for key, value in table.items():
                if "," not in key:
                    continue  # alias, sample_len, ...
                metric, _, filt = key.partition(",")
                name = metric if filt == "none" else f"{metric}/{filt}"
                row[name] = _number(value)
    return out


def resolve_paths(paths: list[str], suite_path: str | None) -> tuple[str, ...]:
    """Include paths as absolute folders: as given when they exist, else relative to the suite file."""
    base = Path(suite_path).parent if suite_path and os.path.exists(suite_path) else Path.cwd()
    resolved = []
    for p in paths:
        path = Path(p).expanduser()
        path = path if path.is_absolute() or path.is_dir() else base / path
        if not path.is_dir():
            raise MoebenchError(f"eval.lm_eval.include_paths: {p!r} is not a folder; expected a folder of lm-eval task YAML files")
        resolved.append(str(path.resolve()))
    return tuple(resolved)


class LmEval(Metric):
    """lm-eval task scores with standard errors, on the in-memory model (HFLM, no save/reload)."""

    name = "lm_eval"
    Params = LmEvalParams

    @classmethod
    def preflight(cls, params: LmEvalParams, suite) -> None:
        """Task names checked offline against moebench's tasks, include_paths and lm-eval's own task index."""
        find_tasks(list(params.tasks), resolve_paths(params.include_paths, getattr(suite, "path", None)))

    def measure(self, model: MoEModel, params: LmEvalParams, ctx: Context) -> dict:
        include = resolve_paths(params.include_paths, ctx.suite.path if ctx.suite is not None else None)
        results = evaluate(
            model,
            params.tasks,
            num_fewshot=params.num_fewshot,
            limit=params.limit,
            batch_size=params.batch_size,
            include_paths=include,
            max_length=params.max_length,
            bootstrap_iters=params.bootstrap_iters,
            seed=ctx.seed,
            log_samples=params.log_samples,
            gen_kwargs=params.gen_kwargs,
            apply_chat_template=params.apply_chat_template,
            fewshot_as_multiturn=params.fewshot_as_multiturn,
            system_instruction=params.system_instruction,
        )
        import lm_eval

        files = None
        if params.log_samples:
            if ctx.run_dir is None:
                raise MoebenchError("eval.lm_eval.log_samples: no run folder to write the samples to; expected a run of `moebench run` (or a Context with run_dir)")
            files = write_samples(results, Path(ctx.run_dir))

        samples = {t: n.get("effective") for t, n in (results.get("n-samples") or {}).items()}
        fewshot = {t: c.get("num_fewshot") for t, c in (results.get("configs") or {}).items()}
        return {
            "lm_eval": scores(results),
            "lm_eval_info": {
                "samples": samples,
                "num_fewshot": fewshot,
                "limit": params.limit,
                "how": f"measured: lm-eval {getattr(lm_eval, '__version__', '?')} HFLM on the in-memory model",
                **({"files": files} if files else {}),
            },
        }


def _task_label(column: str) -> str:
    """``pydoc_mc acc`` for ``lm_eval.pydoc_mc.acc``."""
    return column[len("lm_eval.") :].replace(".", " ")


LmEval.columns = (
    Column("lm_eval.*stderr*", hidden=True),  # error bars print beside their score
    Column("lm_eval.*acc_norm*", label=_task_label, better="higher", delta="tables", detail=True),
    Column("lm_eval.*", label=_task_label, better="higher", delta="tables", tolerance={"abs": 0.02}, leaderboard=4),
    Column("lm_eval_info.*", hidden=True),
)


def accuracy_columns(df) -> list[str]:
    """``lm_eval.<task>.acc`` columns (``acc_norm`` where a task has no ``acc``)."""
    cols = [c for c in df.columns if c.startswith("lm_eval.") and c.endswith(".acc") and df[c].notna().any()]
    tasks = {c[: -len(".acc")] for c in cols}
    cols += [c for c in df.columns if c.endswith(".acc_norm") and c.startswith("lm_eval.") and c[: -len(".acc_norm")] not in tasks and df[c].notna().any()]
    return cols


def plot_accuracy_vs_params(table):
    """Accuracy per task against parameters, ± lm-eval's standard errors (a report plot)."""
    from moebench.render import Plot, ok_runs, points_plot

    title, df = "Accuracy vs parameters", table.df
    cols = accuracy_columns(ok_runs(df))
    xcol = "params.total" if "params.total" in df else "params.active"  # expert drop changes total, not active
    if not cols or xcol not in df:
        return Plot(title, None, "no lm-eval accuracy in these results (add an [eval.lm_eval] table to the suite)")
    xlabel = f"{'active' if xcol == 'params.active' else 'total'} parameters (M)"
    return points_plot(df, cols, xcol, title, "accuracy (higher is better)", xlabel,
                       f"lm-eval accuracy per task against {xcol}; bars are ± one standard error where lm-eval computed it")


@hookimpl
def register_metrics():
    return [LmEval]


@hookimpl
def register_report_plots():
    from moebench.render import ReportPlot

    return [ReportPlot("Accuracy vs parameters", plot_accuracy_vs_params, order=20)]


@hookimpl
def register_export_formats():
    from moebench.render import ExportFormat

    from . import lmeval_export

    return [ExportFormat(
        "lm-eval", lmeval_export.write,
        help="one results JSON per run is written there",
        needs="lm-eval scores (add an [eval.lm_eval] table to the suite)",
    )]
