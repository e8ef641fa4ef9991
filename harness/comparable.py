"""Which results may share a table: same model, same evaluation data, split, sequence length and sample count.

A record's *evaluation spec* is its model (source and dtype) and every ``[eval.NAME]``
table it was measured with (``Record.evals``; older records without it fall back to
what the perplexity metric recorded about itself), minus settings that do not change
the figures (batch size, bootstrap iterations, logging). Report, compare and
leaderboard put records side by side only when their specs are identical; otherwise
they show separate groups, each labelled by the settings that differ. Functions take
:class:`moebench.record.Record` s (or their JSON objects); groups hold what they were given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Union

from .record import Record

#: a record, typed or as its JSON object
AnyRecord = Union[Record, dict[str, Any]]

#: eval-table fields that do not change what a metric measures
IGNORED = {"batch_size", "bootstrap_iters", "log_samples", "fresh_process", "checkpoint_dir", "checkpoint", "output_path"}


def evals_of(record: AnyRecord) -> dict[str, dict[str, Any]]:
    """The ``[eval.NAME]`` tables a record was measured with (``Record.evals``).

    Records older than that field are described by what their metrics recorded about
    themselves: a metric entry that names its ``data`` gives its data, split, seqlen and
    ``windows`` (the sample count used).
    """
    rec = Record.from_dict(record)
    if isinstance(rec.evals, dict):
        return {k: dict(v or {}) for k, v in rec.evals.items() if isinstance(v, dict)}
    return {
        name: {k: m.get(k) for k in ("data", "split", "seqlen", "windows")}
        for name, m in (rec.metrics or {}).items()
        if isinstance(m, dict) and "data" in m
    }


def spec(record: AnyRecord, tables: Iterable[str] | None = None) -> dict[str, Any]:
    """Flat evaluation spec: ``model``, ``dtype`` and ``<eval>.<field>`` (only ``tables`` when given)."""
    rec = Record.from_dict(record)
    out: dict[str, Any] = {"model": rec.source, "dtype": rec.dtype}
    wanted = None if tables is None else set(tables)
    for table, params in sorted(evals_of(rec).items()):
        if wanted is not None and table not in wanted:
            continue
        for key, value in sorted(params.items()):
            if key not in IGNORED:
                out[f"{table}.{key}"] = value
    return out


def table_of(metric: str) -> str:
    """The eval table a metric column comes from, as the column declares it (:attr:`moebench.columns.Column.table`)."""
    from .columns import table_of as declared

    return declared(metric)


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``field: a → b`` for every setting in which two specs differ.

    Model and dtype always count; a setting only one side states (a record older than
    ``Record.evals`` states fewer) is not a difference, since nothing is known about it.
    """
    keys = [k for k in sorted(set(a) | set(b)) if "." not in k or (k in a and k in b)]
    return [f"{k}: {_show(a.get(k))} → {_show(b.get(k))}" for k in keys if a.get(k) != b.get(k)]


@dataclass
class Group:
    """Records with one identical evaluation spec, within one outer key (a suite, a model, a metric)."""

    key: Hashable
    spec: dict[str, Any]
    records: list[AnyRecord] = field(default_factory=list)
    label: str = ""  # the settings that set it apart from the other groups of its key ("" when alone)


def group(
    records: Iterable[AnyRecord],
    key: Callable[[AnyRecord], Hashable] = lambda r: None,
    tables: Callable[[AnyRecord], Iterable[str] | None] = lambda r: None,
) -> list[Group]:
    """Split ``records`` by ``key`` and then by evaluation spec; label groups that share a key by what differs."""
    groups: dict[tuple, Group] = {}
    silent = []  # records that state no evaluation settings (a failed run): they join their key's first group
    for r in records:
        if not evals_of(r):
            silent.append(r)
            continue
        s = spec(r, tables(r))
        k = (key(r), json.dumps(s, sort_keys=True, default=str))
        groups.setdefault(k, Group(key(r), s)).records.append(r)
    for r in silent:
        home = next((g for g in groups.values() if g.key == key(r)), None)
        if home is None:
            s = spec(r, tables(r))
            home = groups.setdefault((key(r), json.dumps(s, sort_keys=True, default=str)), Group(key(r), s))
        home.records.append(r)
    by_key: dict[Hashable, list[Group]] = {}
    for g in groups.values():
        by_key.setdefault(g.key, []).append(g)
    for siblings in by_key.values():
        if len(siblings) > 1:
            fields = sorted({f for g in siblings for f in g.spec if len({_show(s.spec.get(f)) for s in siblings}) > 1})
            for g in siblings:
                g.label = ", ".join(f"{f}={_show(g.spec.get(f))}" for f in fields)
    return list(groups.values())


def _show(value: Any) -> str:
    return "unset" if value is None else value if isinstance(value, str) else json.dumps(value)
