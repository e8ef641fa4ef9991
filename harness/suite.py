"""Suites: the TOML file that says what to compress, how, and what to measure.

:func:`load_suite` parses and validates a suite (every error names the file, the field
and what was expected); :meth:`Suite.runs` expands it into :class:`RunSpec` s, the
baseline first, then one run per point of each method's parameter grid. A list value
is a grid axis unless the parameter itself is a list.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .calibration import CalibrationSpec
from .errors import MoebenchError, SuiteError, did_you_mean
from .params import ParamError, is_list_type, parse, to_dict
from .toml_file import read_toml  # noqa: F401  (re-exported: moebench.suite.read_toml)

#: a suite name is a folder name under reports/: letters, digits and - _ . (never a path)
SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
#: the tables the harness parses; plugins add theirs with ``register_suite_tables``
TABLES = {"suite", "model", "hardware", "calibration", "eval", "methods", "compare", "reference"}
DEVICES_HELP = "cpu | cuda | cuda:N | auto"


@dataclass
class SuiteInfo:
    name: str
    seed: int = 0
    description: str = ""


@dataclass
class ModelSpec:
    source: str
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    #: "disk": never load the model whole; stream decoder layers from its checkpoint one at a time (moebench.offload)
    offload: str | None = None


@dataclass
class HardwareSpec:
    """``[hardware]``: threads, the memory budget of ``device = "auto"``, and what one run
    reserves on a Ray cluster (defaults follow the model's device: 1 CPU, plus 1 GPU on cuda)."""

    threads: int | None = None
    #: per device, for accelerate's device map: {"0" = "20GiB", cpu = "60GiB"}; the rest is offloaded to disk
    max_memory: dict[str, str] | None = None
    gpus_per_run: float | None = None
    cpus_per_run: float | None = None

    def check(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads expected a positive integer, got {self.threads}")
        if self.gpus_per_run is not None and self.gpus_per_run < 0:
            raise ValueError(f"gpus_per_run expected a number >= 0, got {self.gpus_per_run}")
        if self.cpus_per_run is not None and self.cpus_per_run <= 0:
            raise ValueError(f"cpus_per_run expected a number > 0, got {self.cpus_per_run}")
        if self.max_memory is not None:
            from .placement import parse_max_memory

            parse_max_memory(self.max_memory)


@dataclass(frozen=True)
class SuiteTable:
    """A top-level suite table a plugin owns (``register_suite_tables``), e.g. PreMoe's ``[tasks]``.

    ``parse(raw, err)`` validates the raw TOML value and returns what methods and metrics
    read from ``Suite.tables[name]``; ``err(field, message)`` builds the one-line error
    naming the suite file. With ``run_id`` the raw table is hashed into every run id of a
    suite that has it (it shapes the runs' numbers).
    """

    name: str
    parse: Callable[[Any, Callable[[str, str], Exception]], Any]
    run_id: bool = True
    help: str = ""


@dataclass
class Step:
    """One method of a pipeline with its parsed parameters."""

    method: str
    params: Any

    def to_dict(self) -> dict:
        return {"method": self.method, "params": to_dict(self.params)}


@dataclass
class RunSpec:
    """One run: a named pipeline of steps (empty for the baseline), with a stable id."""

    name: str
    pipeline: list[Step]
    entry: str = "baseline"
    grid: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""

    @property
    def is_baseline(self) -> bool:
        return not self.pipeline


@dataclass
class Suite:
    path: str
    info: SuiteInfo
    model: ModelSpec
    hardware: HardwareSpec
    calibration: CalibrationSpec | None
    evals: dict[str, Any]
    methods: list[dict]
    compare: dict[str, Any] = field(default_factory=dict)
    #: plugin-owned tables (``register_suite_tables``): name -> what the table's parser returned
    tables: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    #: plugin-owned tables hashed into every run id: name -> raw TOML value
    hashed_tables: dict[str, Any] = field(default_factory=dict)
    #: ``[[reference]]``: papers' reported figures shown beside the runs (moebench.reference); not hashed into run ids
    references: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.info.name

    def runs(self) -> list[RunSpec]:
        """The baseline, then every method entry expanded over its grid, each with its run id."""
        specs = [RunSpec("baseline", [])]
        for entry in self.methods:
            specs.extend(entry["runs"])
        for spec in specs:
            spec.run_id = self.run_id(spec)
        return specs

    def run_id(self, spec: RunSpec) -> str:
        """A hash of everything that determines the run's numbers (model, pipeline, data, evaluation)."""
        blob = {
            "model": {"source": self.model.source, "dtype": self.model.dtype},
            "pipeline": [s.to_dict() for s in spec.pipeline],
            "calibration": self.calibration.key() if (spec.pipeline and self.calibration) else None,
            "eval": {name: to_dict(p) for name, p in sorted(self.evals.items())},
            "seed": self.info.seed,
            **{name: value for name, value in sorted(self.hashed_tables.items()) if value},  # plugin tables that shape the runs
        }
        return hashlib.sha1(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_suite(path: str | os.PathLike) -> Suite:
    """Read, validate and expand a suite file."""
    return parse_suite(read_toml(path), str(path))


def parse_suite(raw: dict, path: str = "<suite>") -> Suite:
    from .plugins import host

    def err(field_name: str, message: str) -> SuiteError:
        return SuiteError(path, field_name, message)

    owned = host().suite_tables
    known = TABLES | set(owned)
    for key in raw:
        if key not in known:
            raise err(key, f"unknown table{did_you_mean(key, known)}; expected one of {', '.join(sorted(known))}")

    default_name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem).strip(".") or "suite"
    info = _dataclass(SuiteInfo, raw.get("suite", {}), "suite", err, default_name=default_name)
    if not SAFE_NAME.fullmatch(info.name) or set(info.name) == {"."}:
        raise err("suite.name", f"{info.name!r} is not a safe name; expected letters, digits and - _ . only (it names a folder under reports/)")
    if "model" not in raw:
        raise err("model", "missing [model] table; expected at least source = 'zoo:deepseek_v2' or a model folder / hub id")
    model = _dataclass(ModelSpec, raw["model"], "model", err)
    _check_model(model, err)
    hardware = _dataclass(HardwareSpec, raw.get("hardware", {}), "hardware", err)
    _check_hardware(hardware, model, err)
    if hardware.threads is not None and not 1 <= hardware.threads <= 4096:
        raise err("hardware.threads", f"expected a positive number of threads, got {hardware.threads}")

    calibration = None
    if "calibration" in raw:
        if not isinstance(raw["calibration"], dict):
            raise err("calibration", f"expected a [calibration] table, got {type(raw['calibration']).__name__}")
        cal = dict(raw["calibration"])
        if "seed" in cal and (not isinstance(cal["seed"], int) or isinstance(cal["seed"], bool)):
            raise err("calibration.seed", f"expected an integer, got {cal['seed']!r}")
        calibration = _dataclass(CalibrationSpec, cal, "calibration", err)
        calibration.seed = cal.get("seed", info.seed)
        _check_positive(calibration, ("samples", "seqlen", "batch_size"), "calibration", err)
        _check_data(calibration.data, "calibration.data", err)

    for table_name, kind in (("eval", dict), ("methods", list), ("compare", dict)):
        if table_name in raw and not isinstance(raw[table_name], kind):
            what = "a list of [[methods]] tables" if kind is list else f"a [{table_name}] table"
            raise err(table_name, f"expected {what}, got {type(raw[table_name]).__name__}")
    evals = {}
    metrics = host().metrics
    for name, table in (raw.get("eval") or {}).items():
        if name not in metrics:
            raise err(f"eval.{name}", f"unknown metric{did_you_mean(name, metrics)}; known: {', '.join(sorted(metrics))}")
        if not isinstance(table, dict):
            raise err(f"eval.{name}", "expected a table of parameters")
        try:
            evals[name] = parse(metrics[name].Params, table)
        except ParamError as exc:
            raise err(f"eval.{name}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        data = getattr(evals[name], "data", None)
        if isinstance(data, str):
            _check_data(data, f"eval.{name}.data", err)

    entries, seen = [], set()
    for i, entry in enumerate(raw.get("methods") or []):
        parsed = _method_entry(entry, i, err)
        if parsed["name"] in seen:
            raise err(f"methods[{i}].name", f"duplicate run name {parsed['name']!r}; names must be unique")
        seen.add(parsed["name"])
        entries.append(parsed)
    needs_calibration = [
        (e["name"], s.method) for e in entries for r in e["runs"] for s in r.pipeline
        if host().method(s.method)().requires(s.params)
    ]
    if needs_calibration and calibration is None:
        name, method = needs_calibration[0]
        raise err("calibration", f"missing [calibration] table; method {method!r} of {name!r} needs calibration data")
    tables = {name: table.parse(raw.get(name), err) for name, table in owned.items()}
    hashed = {name: raw[name] for name, table in owned.items() if table.run_id and name in raw}
    from .compare import check_compare  # here, not at the top: it brings pandas

    check_compare(raw.get("compare"), path)  # [compare] tolerances for `moebench compare`
    suite = Suite(path, info, model, hardware, calibration, evals, entries, raw.get("compare", {}), tables, raw, hashed)
    _check_unique_runs(suite, err)
    if model.offload is not None:
        from .offload import refusal

        refused = refusal(suite)
        if refused:
            raise err(*refused)
    from .reference import parse_references

    suite.references = parse_references(raw.get("reference"), err, [r.name for r in suite.runs()])
    return suite


def _check_unique_runs(suite: Suite, err) -> None:
    """Two runs with one id would measure the same thing twice (e.g. a grid axis listing a value twice)."""
    seen: dict[str, RunSpec] = {}
    index = {e["name"]: i for i, e in enumerate(suite.methods)}
    for spec in suite.runs():
        if spec.run_id in seen:
            first = seen[spec.run_id]
            where = f"methods[{index.get(spec.entry, 0)}]" if not spec.is_baseline else "methods"
            what = "the baseline (an empty pipeline)" if first.is_baseline else f"run {first.name!r}"
            raise err(where, f"run {spec.name!r} is the same run as {what} (same run id {spec.run_id}); remove the repeated value or entry")
        seen[spec.run_id] = spec


def _method_entry(entry: Any, i: int, err) -> dict:
    from .plugins import host

    where = f"methods[{i}]"
    if not isinstance(entry, dict):
        raise err(where, "expected a table with name and method (or pipeline)")
    allowed = {"name", "method", "params", "pipeline"}
    for key in entry:
        if key not in allowed:
            raise err(f"{where}.{key}", f"unknown field{did_you_mean(key, allowed)}; expected one of {', '.join(sorted(allowed))}")
    if ("method" in entry) == ("pipeline" in entry):
        raise err(where, "expected exactly one of method = '...' or pipeline = [...]")
    if "method" in entry:
        if not isinstance(entry.get("params") or {}, dict):
            raise err(f"{where}.params", "expected a table of parameters, e.g. params = {keep_ratio = 0.5}")
        steps = [{"method": entry["method"], **(entry.get("params") or {})}]
        step_where = [f"{where}.params"]
    else:
        if "params" in entry:
            raise err(f"{where}.params", "a pipeline takes parameters inside each step, not in params")
        steps = entry["pipeline"]
        if not isinstance(steps, list) or not steps:
            raise err(f"{where}.pipeline", "expected a non-empty list of {method = '...', ...} steps")
        step_where = [f"{where}.pipeline[{j}]" for j in range(len(steps))]
    name = entry.get("name") or "+".join(str(s.get("method")) for s in steps if isinstance(s, dict))
    if not isinstance(name, str) or not name:
        raise err(f"{where}.name", "expected a non-empty string")

    methods = host().methods
    axes: list[list[tuple[int, str, Any]]] = []  # per axis: (step, param, value) choices
    fixed: list[dict] = []
    for j, (step, sw) in enumerate(zip(steps, step_where)):
        if not isinstance(step, dict) or "method" not in step:
            raise err(sw, "expected a table with method = '...' and its parameters")
        step = dict(step)
        method = step.pop("method")
        extra = step.pop("params", None) or {}
        if not isinstance(extra, dict):
            raise err(f"{sw}.params", "expected a table of parameters")
        step.update(extra)
        if not isinstance(method, str):
            raise err(f"{sw}.method" if "pipeline" in sw else f"{where}.method", f"expected a method name (a string), got {type(method).__name__}")
        if method not in methods:
            raise err(f"{sw}.method" if "pipeline" in sw else f"{where}.method", f"unknown method {method!r}{did_you_mean(method, methods)}; known: {', '.join(sorted(methods))}{host().broken_hint()}")
        hints = typing.get_type_hints(methods[method].Params)
        values = {}
        for key, value in step.items():
            hint = hints.get(key)
            grid = isinstance(value, list) and (hint is None or not is_list_type(hint) or (value and isinstance(value[0], list)))
            if grid:
                if not value:
                    raise err(f"{sw}.{key}", "an empty list gives no runs; expected at least one value")
                axes.append([(j, key, v) for v in value])
            else:
                values[key] = value
        fixed.append({"method": method, "values": values})

    runs = []
    for point in itertools.product(*axes) if axes else [()]:
        tables = [dict(f["values"]) for f in fixed]
        for j, key, value in point:
            tables[j][key] = value
        pipeline = []
        for j, (f, table, sw) in enumerate(zip(fixed, tables, step_where)):
            try:
                pipeline.append(Step(f["method"], parse(methods[f["method"]].Params, table)))
            except ParamError as exc:
                raise err(f"{sw}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        grid = {key if len(fixed) == 1 else f"{fixed[j]['method']}.{key}": value for j, key, value in point}
        label = name if not grid else f"{name}[{','.join(f'{k}={v}' for k, v in grid.items())}]"
        runs.append(RunSpec(label, pipeline, entry=name, grid=grid))
    return {"name": name, "runs": runs}


def _dataclass(cls, table: Any, where: str, err, default_name: str | None = None):
    if not isinstance(table, dict):
        raise err(where, "expected a table")
    table = dict(table)
    known = {f.name for f in fields(cls)}
    if cls is SuiteInfo:
        table.setdefault("name", default_name)
    if cls is CalibrationSpec:
        table.pop("seed", None)
    for key in table:
        if key not in known:
            raise err(f"{where}.{key}", f"unknown field{did_you_mean(key, known)}; expected one of {', '.join(sorted(known))}")
    try:
        return parse(cls, table)
    except ParamError as exc:
        raise err(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None


def _check_model(model: ModelSpec, err) -> None:
    from .models import DTYPES

    if model.dtype not in DTYPES:
        raise err("model.dtype", f"expected one of {', '.join(DTYPES)}, got {model.dtype!r}{did_you_mean(model.dtype, DTYPES)}")
    dev = model.device
    if not (dev in ("cpu", "cuda", "auto", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise err("model.device", f"expected {DEVICES_HELP}, got {dev!r}")
    source = model.source
    if source.startswith("zoo:"):
        from . import zoo

        try:
            zoo.parse_source(source[4:])
        except MoebenchError as exc:
            raise err("model.source", str(exc)) from None
    elif source.startswith("twin:"):
        from . import twin

        try:
            twin.parse_source(source[5:])
        except MoebenchError as exc:
            raise err("model.source", str(exc)) from None
    elif not os.path.isdir(source) and (source.count("/") != 1 or source.startswith((".", "/"))):
        raise err("model.source", f"{source!r} is neither zoo:NAME, twin:NAME, an existing model folder, nor a hub id like 'org/name'")
    if model.offload is not None:
        from .offload import MODES

        if model.offload not in MODES:
            raise err("model.offload", f"expected one of {', '.join(repr(m) for m in MODES)} (stream decoder layers from the checkpoint), got {model.offload!r}")
        if model.trust_remote_code:
            raise err("model.offload", "offload streams the checkpoint with transformers' own model classes; expected trust_remote_code = false")


def _check_hardware(hardware: HardwareSpec, model: ModelSpec, err) -> None:
    if hardware.gpus_per_run == 0 and model.device.startswith("cuda"):
        raise err("hardware.gpus_per_run", f"0 GPUs per run, but model.device is {model.device!r}; expected at least 1 (or a fraction of one)")
    if hardware.gpus_per_run and model.device in ("cpu", "mps"):
        raise err("hardware.gpus_per_run", f"{hardware.gpus_per_run:g} GPU(s) per run, but model.device is {model.device!r}, which uses none; expected 0 or device = 'cuda' / 'auto'")
    if hardware.max_memory is not None and model.device != "auto":
        raise err("hardware.max_memory", f"only used with model.device = 'auto' (accelerate's device map); model.device is {model.device!r}")


def _check_data(spec: str, where: str, err) -> None:
    from .data import DataSpec
    from .plugins import host

    try:
        parsed = DataSpec.parse(spec)
    except MoebenchError as exc:
        raise err(where, str(exc)) from None
    schemes = host().data_sources
    if parsed.scheme not in schemes:
        raise err(where, f"unknown data scheme {parsed.scheme!r}{did_you_mean(parsed.scheme, schemes)}; known: {', '.join(sorted(schemes))}")


def _check_positive(obj, names, where, err) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise err(f"{where}.{name}", f"expected a positive integer, got {getattr(obj, name)}")
