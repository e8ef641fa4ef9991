"""The result record: one run's outcome, as written to ``results.jsonl``.

:class:`Record` is the typed view of one JSON line. The runner builds one per run; the
report, the gate, the leaderboard and the shard merger read records through it instead
of string keys. The JSON on disk is unchanged: :meth:`Record.to_dict` writes the same
fields in the same order, fields a record did not have stay absent, and fields this
version does not know (written by a newer moebench or a plugin) are kept in ``extra``
and written back, so old and new results files load and round-trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: fields written only when set (absent from baselines, ok runs or runs without --save-models)
OPTIONAL = ("saved_model", "traceback", "calibration", "started", "finished", "env", "reference")
def model_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` less the process figures (time, memory: columns declared ``process``),
    i.e. what any executor must reproduce for a run."""
    from .columns import process_metric

    return {k: v for k, v in metrics.items() if not process_metric(k)}


@dataclass
class Record:
    """One run: what ran (suite, name, pipeline, model), how it ended, what it measured, where."""

    run_id: str
    suite: str
    name: str
    status: str = "ok"  # ok | failed
    #: the [[methods]] entry the run came from ("baseline" for the baseline) and its grid point
    entry: str = ""
    grid: dict[str, Any] = field(default_factory=dict)
    #: [{"method": ..., "params": {...}}]; empty for the baseline
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    #: {"source", "dtype"}
    model: dict[str, Any] = field(default_factory=dict)
    #: the [eval.NAME] tables the run was measured with (absent in older records; see moebench.comparable)
    evals: dict[str, Any] | None = None
    #: every metric's output merged (nested dicts; see docs/design.md)
    metrics: dict[str, Any] = field(default_factory=dict)
    #: per pipeline step (``method``, ``method#2``): what it changed
    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    #: calibration key plus passes/computed/reused (runs with a pipeline)
    calibration: dict[str, Any] | None = None
    #: {"path", "loader"} with --save-models
    saved_model: dict[str, Any] | None = None
    started: str | None = None
    finished: str | None = None
    #: versions, git commit, host, device
    env: dict[str, Any] | None = None
    #: a paper's figures, not a measured run (status "paper"): its citation (moebench.reference)
    reference: dict[str, Any] | None = None
    #: fields this version does not know, kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def is_baseline(self) -> bool:
        return not self.pipeline and self.reference is None

    @property
    def is_reference(self) -> bool:
        """A paper's reported figures (``[[reference]]`` of a suite): shown beside runs, never gated."""
        return self.reference is not None

    @property
    def source(self) -> str | None:
        return (self.model or {}).get("source")

    @property
    def dtype(self) -> str | None:
        return (self.model or {}).get("dtype")

    @property
    def environment(self) -> dict[str, Any]:
        return self.env or {}

    def flat_metrics(self) -> dict[str, float]:
        """Numeric metrics as dotted column names (see :func:`moebench.report.flatten`)."""
        from .columns import flatten

        return flatten(self.metrics or {})

    def __getitem__(self, key: str) -> Any:
        """Read-only ``record["name"]`` over the JSON form, for scripts written when
        :func:`moebench.runner.run_suite` returned dicts (bench/gpu_smoke.py); moebench's own
        code reads the attributes."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        """``record.get("error")`` over the JSON form; see :meth:`__getitem__`."""
        return self.to_dict().get(key, default)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | "Record") -> "Record":
        """A record from its JSON object; missing fields take their defaults, unknown ones go to ``extra``."""
        if isinstance(data, Record):
            return data
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in ("run_id", "suite", "name"):
            values.setdefault(key, None)
        for key in ("grid", "model", "metrics", "changes"):
            if values.get(key) is None and key in values:
                values[key] = {}
        if values.get("pipeline") is None:
            values["pipeline"] = []
        if values.get("notes") is None:
            values["notes"] = []
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, fields in the order the runner has always written them."""
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "suite": self.suite,
            "name": self.name,
            "entry": self.entry,
            "grid": self.grid,
            "status": self.status,
            "pipeline": self.pipeline,
            "model": self.model,
            **({"evals": self.evals} if self.evals is not None else {}),
            "metrics": self.metrics,
            "changes": self.changes,
            "notes": self.notes,
            "error": self.error,
        }
        for key in OPTIONAL:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out


def records_of(items) -> list[Record]:
    """Records from JSON objects or records (readers accept either)."""
    return [Record.from_dict(r) for r in items]
