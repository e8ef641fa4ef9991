"""The regression gate: new results against a stored baseline, metric by metric.

Runs are matched by suite and run name. Each metric is checked against the first
tolerance whose name or glob pattern matches it — command-line tolerances first, then
the suite's ``[compare]`` table, then the built-in defaults — in the metric's own
direction (lower perplexity is better, higher accuracy is better). A change beyond the
tolerance in the bad direction is a regression; in the good direction, an improvement.
A run that failed, or is missing from the new results, is a regression too (unless
``missing = "warn"``). A run measured with another model or evaluation spec (eval data,
split, seqlen, sample count: :mod:`moebench.comparable`) is not compared at all: it is
reported as ``incomparable`` and fails the gate. Timings are not gated unless a tolerance names them: they are
noise on shared machines.

The ``[compare]`` table of a suite::

    [compare]
    missing = "fail"                  # fail | warn: a baseline run or metric absent from the new results
    defaults = true                   # also apply the tolerances the metrics declare (default_tolerances)

    [compare.tolerances]              # metric name or glob -> tolerance; first match wins
    perplexity = { rel = 0.02 }       # relative: |new - base| <= 0.02 * |base|
    "lm_eval.*.acc" = { abs = 0.02 }  # absolute: |new - base| <= 0.02
    "speed.*" = { rel = 0.25 }        # timings are gated only when named
    compress_seconds = { ignore = true }
    my_score = { abs = 0.1, better = "higher" }   # direction for a metric moebench does not know
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import comparable
from .errors import MoebenchError, SuiteError, did_you_mean
from .report import better as default_better
from .record import Record, records_of

KEYS = {"rel", "abs", "better", "ignore"}
TABLE_KEYS = {"tolerances", "missing", "defaults"}


@dataclass(frozen=True)
class Tolerance:
    """How far a metric may move in the bad direction before it counts as a regression."""

    pattern: str
    rel: float | None = None
    abs: float | None = None
    better: str | None = None  # "lower" | "higher"; default: the metric's declared direction
    ignore: bool = False
    source: str = "default"  # where it came from: command line | suite | default

    def allowed(self, base: float) -> float:
        """The largest change that is not a regression, for this baseline value (both kinds: the larger)."""
        return max(self.abs or 0.0, (self.rel or 0.0) * abs(base))

    def matches(self, metric: str) -> bool:
        return metric == self.pattern or fnmatch.fnmatchcase(metric, self.pattern)

    def describe(self) -> str:
        if self.ignore:
            return "ignored"
        parts = []
        if self.rel:
            parts.append(f"±{self.rel:.3g}×base" if self.rel >= 1 else f"±{self.rel * 100:.3g}%")
        if self.abs:
            parts.append(f"±{self.abs:.3g}")
        return " or ".join(parts) or "exact"


def default_tolerances() -> list[Tolerance]:
    """Tolerances applied unless a suite sets ``defaults = false``: each metric declares its
    own (``Column.tolerance``): quality within noise of a CPU rerun, sizes exact (they are
    deterministic); timings and memory are not gated."""
    from .columns import default_tolerances as declared

    return [Tolerance(pattern, **tol) for pattern, tol in declared()]


@dataclass
class CompareSpec:
    """Tolerances in precedence order, and what a missing run or metric means."""

    tolerances: list[Tolerance] = field(default_factory=default_tolerances)
    missing: str = "fail"

    def tolerance_for(self, metric: str) -> Tolerance | None:
        """The first tolerance naming ``metric`` exactly, else the first whose pattern matches it."""
        if "stderr" in metric:  # an error bar is not a quality figure
            return None
        for tol in self.tolerances:
            if tol.pattern == metric:
                return tol
        return next((t for t in self.tolerances if t.matches(metric)), None)

    def with_overrides(self, overrides: Iterable[Tolerance], missing: str | None = None) -> "CompareSpec":
        return CompareSpec([*overrides, *self.tolerances], missing or self.missing)


# --------------------------------------------------------------------------- parsing


def parse_tolerance(pattern: str, table: Any, where: str = "compare.tolerances", source: str = "suite") -> Tolerance:
    """One ``{ rel = .., abs = .., better = .., ignore = .. }`` entry; ValueError names the field on bad input."""
    field_ = f"{where}.{pattern}"
    if not isinstance(table, dict):
        raise _FieldError(field_, f"expected a table like {{ rel = 0.02 }} or {{ abs = 0.01 }}, got {table!r}")
    for key in table:
        if key not in KEYS:
            raise _FieldError(f"{field_}.{key}", f"unknown key{did_you_mean(key, KEYS)}; expected rel, abs, better or ignore")
    values: dict[str, Any] = {}
    for key in ("rel", "abs"):
        if key in table:
            v = table[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _FieldError(f"{field_}.{key}", f"expected a number >= 0, got {v!r}")
            values[key] = float(v)
    if "better" in table:
        if table["better"] not in ("lower", "higher"):
            raise _FieldError(f"{field_}.better", f"expected 'lower' or 'higher', got {table['better']!r}")
        values["better"] = table["better"]
    if "ignore" in table:
        if not isinstance(table["ignore"], bool):
            raise _FieldError(f"{field_}.ignore", f"expected true or false, got {table['ignore']!r}")
        values["ignore"] = table["ignore"]
    if not values.get("ignore") and "rel" not in values and "abs" not in values:
        raise _FieldError(field_, "expected rel = X (relative), abs = X (absolute), or ignore = true")
    return Tolerance(pattern, source=source, **values)


def parse_compare(table: Any, path: str = "<suite>") -> CompareSpec:
    """Validate a suite's ``[compare]`` table into a :class:`CompareSpec` (SuiteError naming the field)."""
    if table in (None, {}):
        return CompareSpec()
    try:
        if not isinstance(table, dict):
            raise _FieldError("compare", "expected a table")
        for key in table:
            if key not in TABLE_KEYS:
                raise _FieldError(f"compare.{key}", f"unknown key{did_you_mean(key, TABLE_KEYS)}; expected one of {', '.join(sorted(TABLE_KEYS))}")
        missing = table.get("missing", "fail")
        if missing not in ("fail", "warn"):
            raise _FieldError("compare.missing", f"expected 'fail' or 'warn', got {missing!r}")
        defaults = table.get("defaults", True)
        if not isinstance(defaults, bool):
            raise _FieldError("compare.defaults", f"expected true or false, got {defaults!r}")
        tolerances = table.get("tolerances", {})
        if not isinstance(tolerances, dict):
            raise _FieldError("compare.tolerances", "expected a table of metric = { rel = .. } entries")
        parsed = [parse_tolerance(p, t) for p, t in tolerances.items()]
    except _FieldError as exc:
        raise SuiteError(path, exc.field, exc.message) from None
    return CompareSpec(parsed + (default_tolerances() if defaults else []), missing)


def check_compare(table: Any, path: str = "<suite>") -> None:
    """Suite-parsing hook: raise SuiteError when a ``[compare]`` table is malformed."""
    parse_compare(table, path)


def compare_spec_from_suite(path: str | os.PathLike) -> CompareSpec:
    """The ``[compare]`` table of a suite file (only that table is validated)."""
    from .toml_file import read_toml

    return parse_compare(read_toml(path).get("compare"), str(path))


def parse_tolerance_arg(text: str) -> Tolerance:
    """``PATTERN=SPEC`` from the command line; SPEC is ``rel:X``, ``abs:X``, ``X%``, ``ignore``,
    several joined by commas, optionally with ``higher`` or ``lower`` (e.g. ``score=abs:0.1,higher``)."""
    pattern, sep, spec = text.partition("=")
    usage = "expected PATTERN=rel:X | abs:X | X% | ignore (comma-joined, optionally with higher/lower), e.g. perplexity=rel:0.02"
    if not sep or not pattern.strip() or not spec.strip():
        raise MoebenchError(f"--tol {text!r}: {usage}")
    table: dict[str, Any] = {}
    for part in (p.strip() for p in spec.split(",")):
        try:
            if part == "ignore":
                table["ignore"] = True
            elif part in ("higher", "lower"):
                table["better"] = part
            elif part.endswith("%"):
                table["rel"] = float(part[:-1]) / 100
            elif part.startswith(("rel:", "abs:")):
                table[part[:3]] = float(part[4:])
            else:
                raise ValueError(part)
        except ValueError:
            raise MoebenchError(f"--tol {text!r}: cannot read {part!r}; {usage}") from None
    try:
        return parse_tolerance(pattern.strip(), table, where="--tol", source="command line")
    except _FieldError as exc:
        raise MoebenchError(f"--tol {text!r}: {exc.message}") from None


class _FieldError(ValueError):
    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message
        super().__init__(f"{field_name}: {message}")


# --------------------------------------------------------------------------- comparing

#: finding kinds that fail the gate (missing ones only when the spec says missing = "fail")
REGRESSIONS = {"regressed", "failed", "missing_run", "missing_metric", "incomparable"}
IMPROVEMENTS = {"improved", "fixed"}


@dataclass
class Finding:
    """One thing the gate noticed about a run or one of its metrics."""

    kind: str  # regressed | improved | same | failed | fixed | still_failed | new_run | missing_run | new_metric | missing_metric | config_changed | incomparable | paper
    suite: str
    run: str
    metric: str = ""
    base: float | None = None
    new: float | None = None
    tolerance: Tolerance | None = None
    message: str = ""
    blocking: bool = False

    @property
    def change(self) -> str:
        if self.kind == "paper":  # base is the paper's figure, new the measured one (if any)
            return "paper " + (f"{self.base:.6g} → not measured" if self.new is None else Finding("", "", "", base=self.base, new=self.new).change)
        if self.base is None or self.new is None:
            return ""
        if not (math.isfinite(self.base) and math.isfinite(self.new)):
            return f"{self.base:.6g} → {self.new:.6g}"
        rel = f" ({(self.new - self.base) / abs(self.base):+.2%})" if self.base else ""
        return f"{self.base:.6g} → {self.new:.6g}{rel}"


@dataclass
class Comparison:
    findings: list[Finding]
    runs: int = 0  # runs present on both sides
    gated: int = 0  # metric values checked against a tolerance
    ungated: list[str] = field(default_factory=list)  # metric names no tolerance covers

    def of(self, *kinds: str) -> list[Finding]:
        return [f for f in self.findings if f.kind in kinds]

    @property
    def regressions(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking]

    @property
    def improvements(self) -> list[Finding]:
        return self.of(*IMPROVEMENTS)

    @property
    def passed(self) -> bool:
        return not self.regressions

    def summary(self) -> str:
        counts = {
            "regressed": len(self.of("regressed")),
            "failed": len(self.of("failed")),
            "incomparable": len(self.of("incomparable")),
            "missing": len(self.of("missing_run", "missing_metric")),
            "improved": len(self.improvements),
            "new": len(self.of("new_run", "new_metric")),
        }
        verdict = "PASS" if self.passed else "FAIL"
        text = ", ".join(f"{v} {k}" for k, v in counts.items())
        papers = len(self.of("paper"))
        text += f"; {papers} paper figure(s) shown, not gated" if papers else ""
        return f"{verdict}: {self.runs} run(s), {self.gated} metric value(s) checked; {text}"


def latest_by_run(records: Iterable[dict[str, Any] | Record]) -> dict[tuple[str, str], Record]:
    """One record per (suite, run name): the last ``ok`` one, else the last one; paper figures
    (``[[reference]]`` records, status ``paper``) are never runs to gate or hold to."""
    out: dict[tuple[str, str], Record] = {}
    for r in records_of(records):
        if r.is_reference:
            continue
        key = (r.suite, r.name)
        if key not in out or r.ok or not out[key].ok:
            out[key] = r
    return out


def compare(new: Iterable[dict[str, Any] | Record], baseline: Iterable[dict[str, Any] | Record], spec: CompareSpec | None = None,
            references: Iterable[dict[str, Any] | Record] = ()) -> Comparison:
    """Check every baseline run's gated metrics in the new results; list ``references`` (a suite's
    paper figures) beside the new figures, never gated."""
    new = records_of(new)
    spec = spec or CompareSpec()
    fail_missing = spec.missing == "fail"
    new_runs, base_runs = latest_by_run(new), latest_by_run(baseline)
    result = Comparison([])
    ungated: set[str] = set()
    for key, base in base_runs.items():
        suite, name = key
        rec = new_runs.get(key)
        if rec is None:
            result.findings.append(Finding("missing_run", suite, name, message="in the baseline but not in the new results", blocking=fail_missing))
            continue
        result.runs += 1
        b_ok, n_ok = base.ok, rec.ok
        if b_ok and not n_ok:
            result.findings.append(Finding("failed", suite, name, message=str(rec.error), blocking=True))
            continue
        if not b_ok:  # nothing to compare against: the baseline run itself failed
            kind = "fixed" if n_ok else "still_failed"
            result.findings.append(Finding(kind, suite, name, message=f"baseline: {base.error}"))
            continue
        if base.run_id != rec.run_id:
            result.findings.append(
                Finding("config_changed", suite, name, message=f"run id {base.run_id} → {rec.run_id}: the suite or method parameters changed; compared anyway")
            )
        differ = comparable.differences(comparable.spec(base), comparable.spec(rec))
        if differ:  # another model or evaluation: the figures say nothing about a regression
            message = "measured differently (" + "; ".join(differ) + "): not compared; rerun with the baseline's settings or refresh the baseline"
            result.findings.append(Finding("incomparable", suite, name, message=message, blocking=True))
            continue
        bm, nm = base.flat_metrics(), rec.flat_metrics()
        for metric in sorted(set(bm) | set(nm)):
            tol = spec.tolerance_for(metric)
            if tol is None or tol.ignore:
                if "stderr" not in metric:
                    ungated.add(metric)
                continue
            if metric not in nm:
                result.findings.append(Finding("missing_metric", suite, name, metric, base=bm[metric], tolerance=tol, blocking=fail_missing))
                continue
            if metric not in bm:
                result.findings.append(Finding("new_metric", suite, name, metric, new=nm[metric], tolerance=tol))
                continue
            result.gated += 1
            result.findings.append(check(suite, name, metric, bm[metric], nm[metric], tol))
    for key, rec in new_runs.items():
        if key not in base_runs:
            result.findings.append(Finding("new_run", key[0], key[1], message="not in the baseline"))
    result.ungated = sorted(ungated)
    result.findings += beside_papers(new_runs, references)
    return result


def beside_papers(runs: dict[tuple[str, str], Record], references: Iterable[dict[str, Any] | Record]) -> list[Finding]:
    """One ``paper`` finding per paper figure: the paper's value next to the run it stands beside (informational)."""
    from .report import citation

    out = []
    for ref in records_of(references):
        if not ref.is_reference:
            continue
        rec = runs.get((ref.suite, ref.entry))
        measured = rec.flat_metrics() if rec is not None and rec.ok else {}
        for metric, value in sorted(ref.flat_metrics().items()):
            out.append(Finding("paper", ref.suite, ref.entry, metric, base=value, new=measured.get(metric),
                               message=citation(ref) + ("" if metric in measured else "; not measured in the new results")))
    return out


def check(suite: str, run: str, metric: str, base: float, new: float, tol: Tolerance) -> Finding:
    """One metric value against its tolerance, in the metric's direction."""
    direction = tol.better or default_better(metric)
    finding = Finding("same", suite, run, metric, base=base, new=new, tolerance=tol)
    if not math.isfinite(new) or not math.isfinite(base):
        if math.isfinite(new) != math.isfinite(base):
            finding.kind = "improved" if math.isfinite(new) else "regressed"
        elif not (base == new or (math.isnan(base) and math.isnan(new))):
            finding.kind = "regressed"
        finding.blocking = finding.kind == "regressed"
        return finding
    delta = new - base
    slack = 1e-9 * max(1.0, abs(base))  # float noise in sums of identical values
    if abs(delta) <= tol.allowed(base) + slack:
        return finding
    worse = delta > 0 if direction == "lower" else delta < 0
    finding.kind = "regressed" if worse else "improved"
    finding.blocking = worse
    return finding


# --------------------------------------------------------------------------- output

TITLES = {
    "regressed": "regressed",
    "failed": "run failed",
    "missing_run": "missing run",
    "missing_metric": "missing metric",
    "improved": "improved",
    "fixed": "fixed (failed in the baseline)",
    "still_failed": "failed in both",
    "new_run": "new run",
    "new_metric": "new metric",
    "config_changed": "configuration changed",
    "incomparable": "measured differently",
    "paper": "paper figure (not gated)",
}
ORDER = ["regressed", "failed", "incomparable", "missing_run", "missing_metric", "improved", "fixed", "new_run", "new_metric", "config_changed", "still_failed", "paper"]


def rows(result: Comparison) -> list[list[str]]:
    """Table rows (status, suite, run, metric, change, tolerance, note) of everything but unchanged metrics."""
    out = []
    for kind in ORDER:
        for f in result.of(kind):
            status = TITLES[kind] + ("" if f.blocking or kind not in REGRESSIONS else " (warning)")
            tol = f"{f.tolerance.describe()} ({f.tolerance.source})" if f.tolerance else ""
            out.append([status, f.suite, f.run, f.metric, f.change, tol, f.message])
    return out


HEADERS = ["status", "suite", "run", "metric", "baseline → new", "tolerance", "note"]


def markdown(result: Comparison) -> str:
    from .render import md_table

    lines = [f"### moebench compare: {result.summary()}", ""]
    body = rows(result)
    lines.append(md_table(HEADERS, body) if body else "Every gated metric is within its tolerance.")
    if result.ungated:
        lines += ["", "Not gated (no tolerance names them): " + ", ".join(f"`{m}`" for m in result.ungated)]
    return "\n".join(lines) + "\n"
