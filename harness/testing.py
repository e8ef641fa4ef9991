"""Conformance checks for method plugins, to call from a plugin's own pytest suite.

::

    from moebench.testing import check_method, check_registered

    def test_conformance():
        check_method(MyMethod, params={"keep_ratio": 0.5})

    def test_registered():            # needs the package installed (pip install -e .)
        check_registered(MyMethod)

:func:`check_method` runs the method the way the runner does, on a small random model
of every zoo architecture (real transformers classes; seconds each) — or, with
``trained=True``, on the trained zoo checkpoints — and checks what a suite relies on:
the parameters parse, validate and survive the record's JSON round trip; the statistics
it asks for exist; ``apply`` returns a JSON-able record of what changed and the model
did change; the compressed model still runs (forward and generate), its MoE view still
works, and it saves and reloads to the same outputs. Every problem on every
architecture is reported together in one :class:`ConformanceError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .method import Context, Method

#: calibration small enough for seconds per architecture, large enough to route every expert
CALIBRATION = dict(data="embedded:prose", samples=8, seqlen=64, batch_size=8)


class ConformanceError(AssertionError):
    """A method that does not meet the plugin contract; the message lists every problem."""


@dataclass
class Outcome:
    """What happened on one architecture."""

    architecture: str
    changes: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_method(
    method: type[Method] | str,
    params: dict[str, Any] | None = None,
    architectures: Iterable[str] | None = None,
    *,
    trained: bool = False,
    seed: int = 0,
    expect_change: bool = True,
    calibration: dict[str, Any] | None = None,
) -> list[Outcome]:
    """Run ``method`` with ``params`` (a suite's parameter table) on each architecture; raise on any problem.

    ``architectures`` are zoo names (default: all). ``trained`` uses the trained zoo
    checkpoints (built on first use, minutes) instead of random models. Set
    ``expect_change=False`` for a method that may legitimately leave a model as it is.
    """
    from . import zoo

    cls = _resolve(method)
    parsed, problems = check_params(cls, params or {})
    if problems:
        raise ConformanceError(f"{_name(cls)}: " + "; ".join(problems))
    names = list(architectures) if architectures is not None else zoo.names()
    for arch in names:
        zoo.entry(arch)  # a one-line error for an unknown name, before any work
    outcomes = [_check_on(cls, parsed, arch, trained, seed, expect_change, {**CALIBRATION, **(calibration or {})}) for arch in names]
    failed = [o for o in outcomes if not o.ok]
    if failed:
        lines = [f"{_name(cls)} failed conformance on {len(failed)} of {len(outcomes)} architecture(s):"]
        lines += [f"  {o.architecture}: {p}" for o in failed for p in o.problems]
        raise ConformanceError("\n".join(lines))
    return outcomes


def check_params(cls: type[Method], params: dict[str, Any]) -> tuple[Any, list[str]]:
    """Parse ``params`` like a suite would; returns the parameters and any contract problems."""
    from .params import ParamError, describe, parse, to_dict
    from .plugins import host

    problems: list[str] = []
    if not isinstance(getattr(cls, "name", None), str) or not cls.name:
        problems.append("class attribute name must be a non-empty string (what suites write as method = '...')")
    if not dataclasses.is_dataclass(cls.Params):
        return None, problems + [f"Params must be a dataclass, got {cls.Params!r}"]
    try:
        typing.get_type_hints(cls.Params)
    except Exception as exc:  # unresolvable annotations break suite parsing
        return None, problems + [f"Params type hints do not resolve: {exc}"]
    for row in describe(cls.Params):
        if not row["help"]:
            problems.append(f"parameter {row['name']!r} has no help text (declare it with moebench.params.param(default, help=...))")
    try:
        parsed = parse(cls.Params, params)
    except ParamError as exc:
        return None, problems + [f"parameters {params!r} do not parse: {exc}"]
    record = to_dict(parsed)
    try:
        again = parse(cls.Params, json.loads(json.dumps(record)))
    except (TypeError, ValueError) as exc:
        problems.append(f"parameters do not survive the record's JSON round trip: {exc}")
    else:
        if again != parsed:
            problems.append(f"parameters change in the record's JSON round trip: {parsed!r} -> {again!r}")
    try:
        needs = tuple(cls().needs(parsed))
    except Exception as exc:
        return parsed, problems + [f"needs() raised {type(exc).__name__}: {exc}"]
    known = host().statistics
    for stat in needs:
        if stat not in known:
            problems.append(f"needs() names unknown statistic {stat!r}; known: {', '.join(sorted(known))}")
    return parsed, problems


def check_registered(method: type[Method] | str):
    """Check that the installed entry point exposes the method (as ``moebench plugins`` shows it); returns its PluginInfo."""
    from .plugins import Host

    name = method if isinstance(method, str) else method.name
    host = Host()  # fresh, so a package installed after the process started is seen
    for info in host.plugins:
        if name in info.provides.get("methods", []):
            found = host.methods[name]
            if not isinstance(method, str) and (found.__module__, found.__qualname__) != (method.__module__, method.__qualname__):
                raise ConformanceError(f"method {name!r} resolves to {found.__module__}.{found.__qualname__}, not {method.__module__}.{method.__qualname__}")
            return info
    broken = [f"{p.name}: {p.error}" for p in host.plugins if p.error]
    hint = f"; plugins that failed to load: {'; '.join(broken)}" if broken else ""
    raise ConformanceError(f"no installed moebench plugin provides method {name!r} (is the package installed, e.g. pip install -e .?){hint}")


# --------------------------------------------------------------------------- one architecture


def _check_on(cls, params, arch: str, trained: bool, seed: int, expect_change: bool, calibration: dict) -> Outcome:
    from .calibration import Calibration, CalibrationSpec
    from .models import load_pretrained

    outcome = Outcome(arch)
    problem = outcome.problems.append
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        model = _model(arch, trained, seed)
    except Exception as exc:  # pragma: no cover - the zoo itself is tested elsewhere
        problem(f"could not build the {arch} model: {type(exc).__name__}: {exc}")
        return outcome
    ids = _probe_ids(model.tokenizer)
    state_before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    config_before = model.config.to_json_string(use_diff=False)
    cal = Calibration(CalibrationSpec(seed=seed, **calibration), cache=trained)
    ctx = Context(seed=seed, calibration=cal, device="cpu", log=lambda *_: None)
    try:
        changes = cls().apply(model, params, ctx)
    except Exception as exc:
        problem(f"apply raised {type(exc).__name__}: {exc}")
        return _done(outcome, start)
    outcome.notes = list(ctx.notes)

    # the record says what changed
    if not isinstance(changes, dict):
        problem(f"apply must return a dict of what changed, got {type(changes).__name__}")
        changes = {}
    outcome.changes = changes
    try:
        json.dumps(changes, default=_recordable)
    except (TypeError, ValueError) as exc:
        problem(f"the returned changes cannot be written to the record: {exc}")
    state_after = model.model.state_dict()
    changed = (
        state_after.keys() != state_before.keys()
        or any(state_after[k].shape != v.shape or not torch.equal(state_after[k], v) for k, v in state_before.items())
        or model.config.to_json_string(use_diff=False) != config_before
    )
    if expect_change and not changed:
        problem("the model is unchanged after apply (pass expect_change=False if that is intended)")
    if expect_change and changed and not changes:
        problem("apply changed the model but returned no changes; say what it removed, merged or quantized")

    # the model still runs, and its MoE view still works
    try:
        list(model.blocks()), model.expert_counts()
        for block in model.blocks():
            if block.num_experts < 1 or block.top_k < 1:
                problem(f"layer {block.layer}: {block.num_experts} experts with top-k {block.top_k}")
    except Exception as exc:
        problem(f"the MoE view of the compressed model fails: {type(exc).__name__}: {exc}")
    model.model.eval()
    try:
        with torch.no_grad():
            logits = model.model(input_ids=ids, use_cache=False).logits
        if logits.shape[:2] != ids.shape:
            problem(f"forward gives logits of shape {tuple(logits.shape)} for input {tuple(ids.shape)}")
        elif not torch.isfinite(logits).all():
            problem("forward gives non-finite logits after apply")
    except Exception as exc:
        problem(f"forward fails after apply: {type(exc).__name__}: {exc}")
        return _done(outcome, start)
    try:
        with torch.no_grad():
            model.model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
    except Exception as exc:
        problem(f"generate fails after apply: {type(exc).__name__}: {exc}")

    # it saves, and reloads to the same outputs
    with tempfile.TemporaryDirectory(prefix="moebench-conformance-") as tmp:
        try:
            model.save(tmp)
            reloaded = load_pretrained(tmp)
            with torch.no_grad():
                again = reloaded(input_ids=ids, use_cache=False).logits
            diff = (again.float() - logits.float()).abs().max().item()
            if not math.isfinite(diff) or diff > 1e-4 * max(1.0, logits.abs().max().item()):
                problem(f"the saved model reloads with different outputs (max |Δlogit| {diff:.3g})")
        except Exception as exc:
            problem(f"save or reload fails: {type(exc).__name__}: {exc}")
    return _done(outcome, start)


# --------------------------------------------------------------------------- saved models
#: run in a fresh interpreter that never imports moebench: what a user of transformers alone sees
_PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
spec = json.loads(sys.argv[1])
ids = torch.tensor(spec["ids"])
out = {}
for key, folder in spec["folders"].items():
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        torch.save(logits, spec["out"] + "/" + key + ".pt")
        out[key] = None
    except Exception as exc:
        out[key] = type(exc).__name__ + ": " + str(exc)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("moebench", "moebench_plugins"))
print(json.dumps({"errors": out, "leaked": leaked}))
"""


@dataclass
class PlainLoad:
    """What ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` alone did with one saved folder."""

    folder: str
    logits: torch.Tensor | None = None  # float32 logits on the probe ids, when it loaded
    error: str | None = None  # the exception it raised, when it refused


def plain_loads(folders: dict[str, Any], ids: torch.Tensor, timeout: float = 600) -> dict[str, PlainLoad]:
    """Load each saved folder with transformers alone, in one fresh process without moebench, and run ``ids``."""
    import os
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="moebench-plain-") as out:
        spec = {"folders": {k: str(v) for k, v in folders.items()}, "ids": ids.tolist(), "out": out}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=out)
        if proc.returncode != 0:
            raise RuntimeError(f"the plain-transformers process failed: {proc.stderr.strip()[-2000:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["leaked"]:
            raise RuntimeError(f"the plain-transformers process imported {report['leaked']}")
        return {
            k: PlainLoad(str(folders[k]), None if err else torch.load(f"{out}/{k}.pt", weights_only=True), err)
            for k, err in report["errors"].items()
        }


def check_saved(folders: dict[str, Any], rtol: float = 1e-5) -> dict[str, str]:
    """The saved-model contract: each folder loads in plain transformers to the logits
    :func:`moebench.models.load_pretrained` gives (``rtol`` of the largest logit, float32),
    or plain transformers refuses it with an error naming that loader.

    Returns ``{key: "same" | "refused"}``; raises :class:`ConformanceError` listing every
    folder that plain transformers loads silently wrong or refuses without saying how.
    """
    from .models import LOADER, load_pretrained, reproducible_experts

    ids = torch.arange(3, 67).reshape(2, 32)
    plain = plain_loads(folders, ids)
    verdicts, problems = {}, []
    for key, result in plain.items():
        if result.error is not None:
            if LOADER in result.error:
                verdicts[key] = "refused"
            else:
                problems.append(f"{key}: plain transformers fails without naming {LOADER}: {result.error[:300]}")
            continue
        model = load_pretrained(result.folder, dtype=torch.float32)
        reproducible_experts(model, "cpu")
        with torch.no_grad():
            ours = model(input_ids=ids, use_cache=False).logits
        diff = (result.logits - ours).abs().max().item()
        scale = ours.abs().max().item()
        if not diff <= rtol * scale:
            problems.append(f"{key}: plain transformers loads it silently wrong (max |Δlogit| {diff:.3g}, largest logit {scale:.3g})")
        else:
            verdicts[key] = "same"
    if problems:
        raise ConformanceError("saved models that break the contract:\n  " + "\n  ".join(problems))
    return verdicts


def _recordable(value: Any) -> Any:
    """What the result store turns into JSON (tensors, sets, tuples, paths); anything else would be a useless str()."""
    from pathlib import Path

    from .store import _jsonable

    if hasattr(value, "tolist") or isinstance(value, (set, tuple, Path)):
        return _jsonable(value)
    raise TypeError(f"a {type(value).__name__} is not a plain value (numbers, strings, lists, dicts, tensors)")


def _model(arch: str, trained: bool, seed: int):
    """A trained zoo checkpoint, or a random model of the zoo architecture with the zoo tokenizer."""
    from . import zoo
    from .adapter import MoEModel
    from .models import load
    from .plugins import host

    if trained:
        return load(f"zoo:{arch}")
    entry = zoo.entry(arch)
    model = entry.cls(entry.config()).eval()
    identity = f"random:{arch}:{seed}"
    return MoEModel(model, host().adapter_for(model), tokenizer=zoo.tokenizer(), source=identity, identity=identity)


def _probe_ids(tokenizer) -> torch.Tensor:
    """Two fixed 32-token windows of held-out prose."""
    from . import corpus

    text = "\n\n".join(corpus.documents("prose", "validation")[:20])[:2000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids[:64].reshape(2, 32)


def _done(outcome: Outcome, start: float) -> Outcome:
    outcome.seconds = time.perf_counter() - start
    return outcome


def _resolve(method) -> type[Method]:
    if isinstance(method, str):
        from .plugins import host

        return host().method(method)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ConformanceError(f"{method!r} is not a moebench.method.Method subclass")
    return method


def _name(cls) -> str:
    return getattr(cls, "name", None) or cls.__name__

