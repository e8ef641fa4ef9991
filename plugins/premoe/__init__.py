"""PreMoe (Pei et al., arXiv 2505.17639): task-conditioned expert pruning with FAISS task retrieval.

- ``premoe`` (method): keeps each MoE layer's ``keep`` experts with the highest
  task-conditioned expected selection score (TCESS) of one task. The task is named
  (``task = "prose"``) or retrieved (``task = "retrieve"``): the query prompt's own
  routing finds the nearest task pattern in a FAISS index built from the suite's
  ``[tasks]`` (built once per model and cached like calibration statistics).
- ``task_perplexity`` (metric): perplexity on the test split of every task of the
  suite, so the baseline, a task-agnostic expert drop and each task's PreMoe run are
  compared on each task; a PreMoe run's own task is also reported as ``own``.
- ``mix:`` (data source): several data specs interleaved in equal shares
  (``mix:embedded:prose,embedded:code``): task-agnostic calibration text.

The model is pruned in memory here (what a suite measures); reading only the kept
experts from a checkpoint is :func:`moebench_plugins.premoe.index.load_for_query` /
:func:`moebench.checkpoint.load`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from moebench_plugins.premoe import index as premoe
from moebench.adapter import MoEModel
from moebench.budgets import check_keep, kept_count
from moebench.calibration import CalibrationSpec
from moebench.columns import Column
from moebench.data import SPLITS, DataSpec, encode, load_text, random_windows, windows
from moebench.errors import MoebenchError
from moebench.hookspecs import hookimpl
from moebench.method import Context, Method, Metric
from moebench.suite import SuiteTable
from moebench.params import param
from moebench_plugins.metrics import WindowParams, perplexity


@dataclass
class PreMoeParams:
    keep_ratio: float | None = param(0.5, help="fraction of each layer's routed experts kept (ignored when keep is set)")
    keep: int | None = param(None, help="routed experts kept per MoE layer (the paper's 8/128 is keep = 128)")
    k: int = param(1, help="experts each token marks in TCESS: 1 as in the reference code; 0: the layer's top-k (moebench's earlier variant)")
    threshold: float = param(0.0, help="r: a token marks an expert only if its probability renormalised over the k marked is >= r (0: every marked expert)")
    task: str = param("retrieve", help="a task of the suite's tasks table whose experts are kept, or 'retrieve': the task nearest to the query's routing")
    query: str | None = param(None, help="with task = 'retrieve': a task name (its held-out queries) or a data spec; the prompt routed for retrieval")
    query_split: str = param("validation", help="split the query prompt is taken from")
    query_tokens: int = param(256, help="prompt tokens routed for retrieval: a window at a seeded offset of a task's query split, or the start of a data spec's")
    key_layer: int = param(0, help="which MoE layer's scores are the retrieval key (0 = first MoE layer, as in the paper)")
    metric: Literal["l2", "cosine"] = param("l2", help="distance between retrieval keys (FAISS flat index)")
    index: str | None = param(None, help="folder of a saved PreMoe index (default: built from the suite's tasks table and cached)")

    def check(self):
        check_keep(self.keep, self.keep_ratio)
        if self.k < 0:
            raise ValueError(f"k must be >= 0 (0: the layer's top-k), got {self.k}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.task == "retrieve" and not self.query:
            raise ValueError("query is required with task = 'retrieve': a task name or a data spec whose text is the prompt")
        if self.query_split not in SPLITS:
            raise ValueError(f"query_split must be one of {', '.join(SPLITS)}, got {self.query_split!r}")
        if self.query_tokens < 1:
            raise ValueError(f"query_tokens must be >= 1, got {self.query_tokens}")
        if self.key_layer < 0:
            raise ValueError(f"key_layer must be >= 0, got {self.key_layer}")


class PreMoe(Method):
    """PreMoe: keep the experts one task needs (TCESS), the task named or retrieved from the query's routing."""

    name = "premoe"
    Params = PreMoeParams
    # router logits per task come from task-specific calibrations, not the suite's
    stats = ()

    def apply(self, model: MoEModel, params: PreMoeParams, ctx: Context) -> dict:
        tasks = _tasks(ctx)
        settings = premoe.IndexSettings(params.threshold, params.key_layer, params.metric, params.k)
        if params.index:
            index = premoe.TaskIndex.load(params.index, model)
            if index.settings != settings:
                ctx.note(f"premoe: the saved index's settings {index.settings} are used, not the run's")
        else:
            # through the run's calibration service: its statistics show in the record's calibration summary
            service = ctx.calibration if ctx.calibration is not None else CalibrationSpec(seed=ctx.seed)
            index = premoe.cached(model, tasks, service, settings)
        expected, matches = None, []
        if params.task == "retrieve":
            text, expected = self._query(params, tasks)
            ids = encode(model.tokenizer, load_text(text, params.query_split))
            if expected is not None and ids.numel() > params.query_tokens:
                # a task's held-out query: a window at a seeded offset (a split's first tokens are one
                # document's header, e.g. a licence comment in code, rarely typical of the task)
                ids = random_windows(ids, params.query_tokens, 1, ctx.seed)[0]
            ids = ids[: params.query_tokens]
            if ids.numel() < 2:
                raise MoebenchError(f"premoe: query {params.query!r} has fewer than 2 tokens in split {params.query_split!r}")
            key = premoe.query_key(model, ids[None], index.settings)
            matches = index.search(key)
            chosen = matches[0][0]
        else:
            chosen = params.task
            if chosen not in index.tasks:
                raise MoebenchError(f"premoe: task {chosen!r} is not among the indexed tasks ({', '.join(index.tasks)}); name one or use 'retrieve'")
        blocks = list(model.blocks())
        total = {b.layer: b.num_experts for b in blocks}
        n = kept_count(max(total.values()), params.keep, params.keep_ratio)
        kept = index.keep(chosen, n)
        for layer, experts in kept.items():
            for note in model.keep_experts(layer, experts):
                ctx.note(f"layer {layer}: {note}")
        active = max(model.block(layer).top_k for layer in kept)
        changes = {
            "notation": f"{active}/{n}",
            "task": chosen,
            "tcess_k": index.settings.k,  # experts a token marks in TCESS (0: the layer's top-k, moebench's variant; 1: the reference)
            "kept": {layer: sorted(e) for layer, e in kept.items()},
            "experts_before": sum(total.values()),
            "experts_after": sum(len(e) for e in kept.values()),
        }
        if params.task == "retrieve":
            changes["retrieval"] = {
                "query": params.query,
                "query_tokens": int(ids.numel()),
                "expected": expected,
                "correct": None if expected is None else chosen == expected,
                "distances": {t: round(d, 6) for t, d in matches},
                "faiss": premoe.faiss_device(),
            }
        return changes

    @staticmethod
    def _query(params: PreMoeParams, tasks: dict) -> tuple[str, str | None]:
        """The query's data spec, and the task it belongs to when it names one."""
        if params.query in tasks:
            return tasks[params.query].query_data, params.query
        try:
            DataSpec.parse(params.query)
        except MoebenchError:
            raise MoebenchError(
                f"premoe: query {params.query!r} is neither a task ({', '.join(tasks) or 'none declared'}) nor a data spec like 'embedded:code'"
            ) from None
        return params.query, None


def _tasks(ctx: Context) -> dict:
    """The suite's ``[tasks]`` table, parsed (none without a suite)."""
    return ctx.suite.tables.get("tasks", {}) if ctx.suite is not None else {}


def _own_task(changes: dict) -> str | None:
    """The task a premoe step of this run kept experts for: the query's own task when the
    query named one, else the task chosen (None when no premoe step ran)."""
    own = None
    for key, change in changes.items():
        if key.split("#")[0] == PreMoe.name and isinstance(change, dict):
            own = (change.get("retrieval") or {}).get("expected") or change.get("task")
    return own


# -- per-task evaluation --------------------------------------------------------------
class TaskPerplexity(Metric):
    """Perplexity on each task of the suite's tasks table (and the run's own task); routed experts as active/kept."""

    name = "task_perplexity"
    Params = WindowParams  # each task's own data, so no data field

    def measure(self, model: MoEModel, params: WindowParams, ctx: Context) -> dict:
        tasks = _tasks(ctx)
        if not tasks:
            raise MoebenchError("[eval.task_perplexity] needs a [tasks] table: [tasks.NAME] data = 'embedded:prose'")
        values = {}
        for name, task in tasks.items():
            ids = windows(encode(model.tokenizer, load_text(task.data, params.split)), params.seqlen, params.max_samples)
            values[name] = perplexity(model.model, ids, params.batch_size)
        own = _own_task(ctx.changes)
        if own in values:
            values["own"] = values[own]
        blocks = list(model.blocks())
        routed = {"active": max(b.top_k for b in blocks), "kept": max(b.num_experts for b in blocks)} if blocks else {}
        return {"task_perplexity": values, "routed": routed}


# -- task-agnostic data ---------------------------------------------------------------
class MixSource:
    """``mix:SPEC,SPEC,...``: the documents of several data specs in equal shares, interleaved.

    Each source contributes the same number of characters (the smallest source's
    total; documents beyond it are left out), documents alternating so every stretch of
    the text mixes the sources. Used as task-agnostic calibration text.
    """

    scheme: ClassVar[str] = "mix"

    def documents(self, arg: str, split: str) -> list[str]:
        from moebench.plugins import host

        specs = [s.strip() for s in arg.split(",") if s.strip()]
        if len(specs) < 2:
            raise MoebenchError(f"data mix:{arg}: expected two or more comma-separated data specs, e.g. mix:embedded:prose,embedded:code")
        sources = []
        for text in specs:
            spec = DataSpec.parse(text)
            if spec.scheme == "mix":
                raise MoebenchError(f"data mix:{arg}: a mix cannot contain another mix")
            sources.append(list(host().data_source(spec.scheme).documents(spec.arg, split)))
        budget = min(sum(len(d) for d in docs) for docs in sources)
        used = [0] * len(sources)
        cursor = [0] * len(sources)
        out = []
        while True:
            open_ = [i for i in range(len(sources)) if cursor[i] < len(sources[i]) and used[i] < budget]
            if not open_:
                return out
            i = min(open_, key=lambda j: used[j])  # the source furthest behind goes next
            doc = sources[i][cursor[i]][: budget - used[i]]
            out.append(doc)
            used[i] += len(doc)
            cursor[i] += 1


@hookimpl
def register_methods():
    return [PreMoe]


@hookimpl
def register_metrics():
    return [TaskPerplexity]


@hookimpl
def register_suite_tables():
    return [SuiteTable("tasks", premoe.parse_tasks, help="[tasks.NAME] data = 'SCHEME:ARG' (query optional): PreMoe's tasks")]


def _active_kept(row: dict):
    """PreMoe's ``active/kept`` notation (e.g. ``8/128``: top-k of the routed experts kept) as one
    text column, in place of the numeric ``routed.active`` and ``routed.kept`` columns."""
    active, kept = row.get("routed.active"), row.get("routed.kept")
    return f"{int(active)}/{int(kept)}" if active is not None and kept is not None else None


@hookimpl
def register_report_columns():
    return [Column("active/kept", order=50, derive=_active_kept, consumes=("routed.active", "routed.kept"))]


@hookimpl
def register_data_sources():
    return [MixSource]


@hookimpl
def register_commands(cli):
    from . import cli as commands

    commands.register(cli)
