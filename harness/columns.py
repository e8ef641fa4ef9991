"""Report columns: what each metric's figures mean to the report, the gate and the leaderboard.

A record's metrics flatten into dotted column names (``perplexity``, ``params.active``,
``lm_eval.pydoc_mc.acc``; a nested ``value`` takes its parent's name). The metric that
writes a column describes it with a :class:`Column` in its ``columns`` (see
:class:`moebench.method.Metric`): its short header, which direction is better, where it
sits in a table, whether its change against the baseline is shown, whether it is a
detail left out of the tables, and its default tolerance in ``moebench compare``.
A column also says which eval table it comes from (comparability), what evaluation
setting a leaderboard names, whether the leaderboard shows it, and whether it is the size
axis of Pareto fronts. Plugins add derived columns (built from others, like PreMoe's
``active/kept``) with the ``register_report_columns`` hook. The harness names no built-in metric here: every
description comes from the plugins that write the figures, except the runner's own
``compress_seconds`` and ``compress_peak_bytes``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Column:
    """How one metric column (an exact flattened name, or a glob like ``lm_eval.*``) is read.

    - ``label``: short header (a string, or ``fn(column) -> str`` for a glob); default: the name.
    - ``better``: ``"lower"`` or ``"higher"``; ``None`` means lower (sizes, costs, losses).
    - ``order``: position among the leading columns (smaller first); ``None`` sorts after them by name.
    - ``delta``: show the change against the baseline beside the value (``"tables"``: in the
      Markdown and HTML tables only, not the terminal).
    - ``detail``: left out of the terminal table (kept in the record, Markdown, CSV and HTML).
    - ``hidden``: bookkeeping, left out of the terminal, Markdown and HTML tables (kept in the CSV).
    - ``skip``: not a column at all (a setting stored beside a value, e.g. a window length).
    - ``tolerance``: the default gate of ``moebench compare``, e.g. ``{"rel": 0.01}``.
    - ``si``: print with an SI suffix (``2.19M``); a column named ``*bytes`` prints in MiB.
    - ``derive``: for a column built from others: ``fn(row) -> value or None``; ``consumes``
      lists the columns it replaces.
    - ``table``: the ``[eval.NAME]`` table its figures come from, whose settings must match for
      two values to be compared; default: the name of the metric that declares the column.
    - ``setting``: ``fn(entry) -> str``, the evaluation setting a leaderboard board names, from
      the metric's stored entry (``record.metrics[<first part of the column>]``).
    - ``leaderboard``: position among the columns a leaderboard shows beside its ranking metric
      (smaller first; the column at position 0 is the default ranking metric); ``None``: not shown there.
    - ``size``: the model-size axis that Pareto fronts trade against (the leaderboard's ★ and its plot).
    - ``process``: a figure of the process and machine the run ran in (time, memory), not of
      the compressed model: a serial, sharded or Ray run of the same suite may differ on it.
    """

    pattern: str
    label: str | Callable[[str], str] | None = None
    better: Literal["lower", "higher"] | None = None
    order: int | None = None
    delta: bool | Literal["tables"] = False
    detail: bool = False
    hidden: bool = False
    skip: bool = False
    tolerance: dict[str, Any] | None = None
    si: bool = False
    derive: Callable[[dict[str, Any]], Any] | None = None
    consumes: tuple[str, ...] = ()
    process: bool = False
    table: str | None = None
    setting: Callable[[Any], str] | None = None
    leaderboard: int | None = None
    size: bool = False

    def matches(self, column: str) -> bool:
        return column == self.pattern or fnmatch.fnmatchcase(column, self.pattern)


#: the runner's own figures (every run with a pipeline has them)
RUNNER_COLUMNS = (
    Column("compress_seconds", label="compress s", order=900, process=True),
    Column("compress_seconds_by_step.*", detail=True, process=True),
    Column("compress_peak_bytes", label="compress peak", detail=True, process=True),
    Column("compress_peak_kind", skip=True, process=True),
)
#: a column nobody describes: lower is better, no delta, after the described ones
UNKNOWN = Column("*")


_CACHE: dict[tuple, tuple[Column, ...]] = {}


def _registry(h) -> tuple[Column, ...]:
    key = (id(h), len(h.pm.get_plugins()))  # a plugin registered later (tests) refreshes it
    if key in _CACHE:
        return _CACHE[key]
    found: list[Column] = []
    for cls in h.metrics.values():  # a metric's columns come from its own [eval.NAME] table unless they say otherwise
        found.extend(c if c.table else replace(c, table=cls.name) for c in getattr(cls, "columns", ()) or ())
    for group in h.pm.hook.register_report_columns():
        found.extend(group or ())
    found.extend(RUNNER_COLUMNS)
    _CACHE.clear()
    _CACHE[key] = tuple(found)
    return _CACHE[key]


def registry() -> tuple[Column, ...]:
    """Every column description: metrics' ``columns``, then ``register_report_columns``, then the runner's."""
    from .plugins import host

    return _registry(host())


def column(name: str) -> Column:
    """The description of a column: an exact pattern first, else the first glob that matches."""
    cols = registry()
    for c in cols:
        if c.pattern == name:
            return c
    return next((c for c in cols if c.matches(name)), UNKNOWN)


def process_metric(key: str) -> bool:
    """Whether a record's top-level metric ``key`` is a process figure (a column declared ``process``)."""
    return any(c.process and (c.pattern == key or c.pattern.startswith(key + ".")) for c in registry())


def better(name: str) -> str:
    """``higher`` or ``lower``: which direction improves a metric column (stderr columns: lower)."""
    if "stderr" in name:
        return "lower"
    return column(name).better or "lower"


def stderr_names(name: str) -> tuple[str, str]:
    """Where a column's standard error is stored, if anywhere: ``<name>_stderr`` (lm-eval's) or ``<name>.stderr``."""
    return (f"{name}_stderr", f"{name}.stderr")


def label(name: str) -> str:
    lab = column(name).label
    if callable(lab):
        return lab(name)
    return lab or name


def order_key(name: str) -> tuple:
    """Leading columns by their ``order``, then the rest by name."""
    o = column(name).order
    return (0, o, name) if o is not None else (1, 0, name)


def derived() -> list[Column]:
    return [c for c in registry() if c.derive is not None]


def derive(row: dict[str, Any]) -> None:
    """Replace the columns a derived column consumes with its value, in place."""
    for c in derived():
        value = c.derive(row)
        for name in c.consumes:
            row.pop(name, None)
        if value is not None:
            row[c.pattern] = value


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict as dotted column names."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = prefix[:-1] if key == "value" and prefix else f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not column(name).skip:
            out[name] = float(value)
    return out


def table_of(name: str) -> str:
    """The eval table a column's figures come from (declared, else the column's first part)."""
    return column(name).table or name.split(".")[0]


def size_column() -> str | None:
    """The column Pareto fronts trade against (declared ``size=True``), if a plugin declares one."""
    return next((c.pattern for c in registry() if c.size), None)


def leaderboard_columns(names: list[str]) -> list[str]:
    """Of ``names``, those shown on leaderboard boards, by their declared position (then by name)."""
    shown = [(column(n).leaderboard, n) for n in names]
    return [n for pos, n in sorted((p, n) for p, n in shown if p is not None)]


def default_tolerances() -> list[tuple[str, dict[str, Any]]]:
    """``(pattern, tolerance)`` for every column that declares a default gate, in registry order."""
    return [(c.pattern, c.tolerance) for c in registry() if c.tolerance is not None]
