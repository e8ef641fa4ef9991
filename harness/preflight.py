"""Checks that run before any work: everything about a suite that can be known without loading weights.

``moebench validate`` and the start of ``moebench run`` call :func:`check_suite`, so a
bad input is a one-line error (file, field, what was expected) before a model is loaded
or compressed: data sources and their splits, lm-eval task names (offline, from
lm-eval's own task index), the model source and its tokenizer, method parameters
against the model's shape (read from its config, built on the meta device), and that
the output folder is writable with free space.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import MoebenchError, SuiteError
from .params import ParamError

#: free space the output folder's disk must have before a suite starts (override: MOEBENCH_MIN_FREE_MB)
MIN_FREE_MB = 64
#: files any one of which makes a folder's tokenizer loadable by transformers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "tiktoken.model")
#: errors of a disk that cannot take more data (full, over quota, over a file-size limit, read-only, failing)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


@dataclass
class ModelShape:
    """What a model's config says about its shape: decoder layers, MoE layers and their expert counts."""

    layers: int
    moe_layers: list[int]
    experts: dict[int, int] = field(default_factory=dict)
    top_k: dict[int, int] = field(default_factory=dict)
    config: Any = None

    @property
    def min_experts(self) -> int:
        return min(self.experts.values()) if self.experts else 0


def check_suite(suite, out: Path | None = None) -> ModelShape | None:
    """Every check that needs no weights; raises a one-line :class:`MoebenchError` on the first problem."""
    check_data(suite)
    check_metrics(suite)
    shape = check_model_source(suite)
    check_methods(suite, shape)
    if out is not None:
        check_output(out)
    return shape


# --------------------------------------------------------------------------- data


def _uses(suite) -> list[tuple[str, str, str | None]]:
    """``(field, data spec, split)`` for every text the suite reads."""
    found = []
    if suite.calibration is not None:
        found.append(("calibration.data", suite.calibration.data, "train"))
    for name, params in suite.evals.items():
        data = getattr(params, "data", None)
        if isinstance(data, str):
            found.append((f"eval.{name}.data", data, getattr(params, "split", None)))
    tasks = suite.raw.get("tasks") if isinstance(suite.raw.get("tasks"), dict) else {}
    for name, table in tasks.items():
        if isinstance(table, dict) and isinstance(table.get("data"), str):
            found.append((f"tasks.{name}.data", table["data"], None))
    return found


def check_data(suite) -> None:
    """Each data spec's source exists and has the split it is read from (where the source can tell offline)."""
    from .data import DataSpec
    from .plugins import host

    for where, spec, split in _uses(suite):
        parsed = DataSpec.parse(spec)
        source = host().data_source(parsed.scheme)
        check = getattr(source, "check", None)
        if check is None:
            continue
        try:
            check(parsed.arg, split)
        except MoebenchError as exc:
            raise SuiteError(suite.path, where, str(exc)) from None


# --------------------------------------------------------------------------- metrics


def check_metrics(suite) -> None:
    """Each metric's own pre-run check (e.g. lm-eval task names against lm-eval's task index)."""
    from .plugins import host

    for name, params in suite.evals.items():
        cls = host().metric(name)
        try:
            cls.preflight(params, suite)
        except ParamError as exc:
            raise SuiteError(suite.path, f"eval.{name}.{exc.field}", str(exc).split(": ", 1)[1]) from None
        except MoebenchError as exc:
            text = str(exc)
            raise MoebenchError(text if text.startswith(suite.path) else f"{suite.path}: {text}") from None


# --------------------------------------------------------------------------- model


def check_model_source(suite) -> ModelShape | None:
    """The model source exists, has a config moebench can adapt and a usable tokenizer; returns its shape."""
    source = suite.model.source
    where = "model.source"
    if source.startswith("zoo:"):
        from . import zoo

        name, _ = zoo.parse_source(source[4:])
        return _zoo_shape(name)
    if source.startswith("twin:"):
        from . import twin

        name, options = twin.parse_source(source[5:])
        return _twin_shape(name, options.get("layers"))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SuiteError(suite.path, where, f"{source}: no config.json in that folder (expected a model folder written by save_pretrained)")
        check_tokenizer(path, suite.path, suite.model.trust_remote_code)
        if suite.model.trust_remote_code:
            return None  # its config class is remote code: not run before the run itself
        from .models import load_config

        try:
            config = load_config(str(path))  # a folder moebench saved with its own structure too
        except (OSError, ValueError, KeyError, TypeError, MoebenchError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SuiteError(suite.path, where, f"{source}: config.json cannot be read ({first})") from None
        try:
            return shape_of(config, source)
        except MoebenchError as exc:
            raise SuiteError(suite.path, where, str(exc)) from None
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise SuiteError(suite.path, where, f"{source!r}: no such folder, and the hub id is not in the local cache (offline)")
    return None  # a hub id: known only when downloaded


def check_tokenizer(path: Path, suite_path: str, trust_remote_code: bool = False) -> None:
    """A checkpoint folder has tokenizer files transformers can load (a clear message when it has none)."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise SuiteError(
            suite_path,
            "model.source",
            f"{path} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES[:3])}...); "
            "copy the tokenizer of the model it was made from into that folder",
        )
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 (any failure means the tokenizer is unusable; said in one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SuiteError(suite_path, "model.source", f"{path}: tokenizer cannot be loaded ({first})") from None


@lru_cache(maxsize=16)
def _zoo_shape(name: str) -> ModelShape:
    """A zoo model's shape (its config is fixed by its name; build options do not change it)."""
    from . import zoo

    return shape_of(zoo.config(name), f"zoo:{name}")


@lru_cache(maxsize=16)
def _twin_shape(name: str, layers: int | None) -> ModelShape:
    """A shape twin's shape: its published config at the asked depth (no weights written)."""
    from . import twin

    return shape_of(twin.config(name, layers=layers), f"twin:{name}")


def shape_of(config, source: str) -> ModelShape:
    """Layers, MoE layers and expert counts of ``config``'s model, built on the meta device (no weights)."""
    from .checkpoint import skeleton

    moe, config = skeleton(source, config=config)
    experts = moe.expert_counts()
    top_k = {b.layer: b.top_k for b in moe.blocks()}
    return ModelShape(len(moe.layers), list(moe.moe_layers), experts, top_k, config)


# --------------------------------------------------------------------------- methods


def check_methods(suite, shape: ModelShape | None) -> None:
    """Each run's first step against the model's shape (``Method.check_model``); later steps see a changed model."""
    if shape is None:
        return
    from .plugins import host

    index = {entry["name"]: i for i, entry in enumerate(suite.methods)}
    for spec in suite.runs():
        if not spec.pipeline:
            continue
        step = spec.pipeline[0]
        i = index.get(spec.entry, 0)
        entry = suite.raw.get("methods", [{}])[i] if isinstance(suite.raw.get("methods"), list) else {}
        prefix = f"methods[{i}].pipeline[0]" if isinstance(entry, dict) and "pipeline" in entry else f"methods[{i}].params"
        try:
            host().method(step.method).check_model(step.params, shape)
        except ParamError as exc:
            message = str(exc).split(": ", 1)[1]
            raise SuiteError(suite.path, f"{prefix}.{exc.field}", f"{message} (run {spec.name})") from None


# --------------------------------------------------------------------------- output


def min_free_bytes() -> int:
    try:
        return int(float(os.environ.get("MOEBENCH_MIN_FREE_MB", MIN_FREE_MB)) * 2**20)
    except ValueError:
        raise MoebenchError(f"MOEBENCH_MIN_FREE_MB={os.environ['MOEBENCH_MIN_FREE_MB']!r}: expected a number of MiB") from None


def _existing_ancestor(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return Path("/")


def check_output(out: Path, flag: str = "--out", create: bool = False) -> None:
    """``out`` is (or can become) a writable folder on a disk with free space.

    With ``create`` the folder is made and a probe file written and removed (the start of
    a run); without, only the nearest existing folder is checked (``validate``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoebenchError(f"{flag} {out}: is an existing file; expected a folder (new, or a run directory to resume)")
    base = _existing_ancestor(out.absolute())
    if not base.is_dir():
        raise MoebenchError(f"{flag} {out}: {base} is a file, so the folder cannot be made there")
    try:
        if create:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".moebench-write-probe"
            with open(probe, "wb") as fh:
                fh.write(b"ok\n")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        elif not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(base))
    except OSError as exc:
        raise MoebenchError(f"{flag} {out}: cannot write there ({exc.strerror or exc}); expected a writable folder") from None
    free = shutil.disk_usage(_existing_ancestor(out.absolute())).free
    need = min_free_bytes()
    if free < need:
        raise MoebenchError(
            f"{flag} {out}: only {free / 2**20:.0f} MiB free on its disk; expected at least {need / 2**20:.0f} MiB "
            "(set MOEBENCH_MIN_FREE_MB to change)"
        )


def inside(base: Path, path: Path, what: str) -> Path:
    """``path`` resolved, after checking it lies under ``base`` (every file the harness writes does)."""
    root = Path(base).resolve()
    resolved = Path(path).resolve()
    if resolved != root and root not in resolved.parents:
        raise MoebenchError(f"{what} {path}: resolves to {resolved}, outside the output folder {root}; refusing to write there")
    return resolved


def disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the disk refusing data (full, quota, file-size limit, read-only, I/O error)."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def disk_failure(error: str | None) -> bool:
    """Whether a record's ``error`` (``"Type: message"``, possibly from another process) is such a disk error."""
    import re

    found = re.search(r"\[Errno (\d+)\]", error or "")
    return bool(found) and int(found.group(1)) in DISK_ERRNOS
