"""Sharding a suite across CI jobs or GPUs, and merging the shards' results.

``--shard K/N`` deals the suite's method runs round-robin, in suite order, into N
shards and keeps shard K's (1-based): every run lands in exactly one shard, neighbouring
grid points (often of similar cost) spread across shards, and the split depends only on
the suite. The runner adds the baseline to every shard that runs anything, so speedups
are measured against a baseline from the same process; :func:`merge` keeps one copy.

``--shard slurm`` takes K/N from a SLURM job array (:func:`slurm_shard`): task K of an
array of N, whatever id the array starts at or steps by. It is explicit rather than
detected, because a job array may as well run a different suite in each task.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from .errors import MoebenchError
from .record import Record


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def pick(self, runs: list) -> list:
        """This shard's runs: method runs dealt round-robin; the baseline goes to shard 1 when there are none."""
        methods = [r for r in runs if not r.is_baseline]
        if not methods:
            return [r for r in runs if r.is_baseline] if self.index == 1 else []
        return [r for i, r in enumerate(methods) if i % self.count == self.index - 1]

    def selector(self) -> Callable[[list], list]:
        """For :attr:`moebench.runner.RunOptions.select`."""
        return self.pick


def parse_shard(text: str) -> Shard:
    """``K/N`` with 1 <= K <= N, else a one-line error."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise MoebenchError(f"--shard {text!r}: expected K/N, e.g. 1/2 (shard K of N, counted from 1)")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 1 <= k <= n:
        raise MoebenchError(f"--shard {text!r}: expected 1 <= K <= N, got K={k}, N={n}")
    return Shard(k, n)


def resolve_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """``--shard``: None, ``K/N``, or ``slurm`` (K/N from the SLURM array variables)."""
    if text is None:
        return None
    if str(text).strip().lower() == "slurm":
        return slurm_shard(os.environ if environ is None else environ)
    return parse_shard(text)


def slurm_shard(env: Mapping[str, str]) -> Shard:
    """This array task's shard: K = position of SLURM_ARRAY_TASK_ID among the array's ids, N = SLURM_ARRAY_TASK_COUNT.

    Array ids start anywhere (``--array=5-8``) and may step (``--array=0-10:2``); the position
    is ``(id - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP + 1``. A list of ids that is not
    such a range (``--array=1,4,9``) cannot be mapped and is refused.
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        raise MoebenchError("--shard slurm: SLURM_ARRAY_TASK_ID is not set; expected to run inside a SLURM job array (sbatch --array=1-N)")
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")
    values = {}
    for name in (*names, "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP"):
        raw = env.get(name)
        if raw is None:
            if name in names:
                raise MoebenchError(f"--shard slurm: {name} is not set; expected SLURM's job-array variables (SLURM 17.11 or later)")
            continue
        if not str(raw).strip().isdigit():
            raise MoebenchError(f"--shard slurm: {name}={raw!r}; expected a non-negative integer")
        values[name] = int(raw)
    task, count, first = values["SLURM_ARRAY_TASK_ID"], values["SLURM_ARRAY_TASK_COUNT"], values["SLURM_ARRAY_TASK_MIN"]
    step = values.get("SLURM_ARRAY_TASK_STEP", 1) or 1
    last = values.get("SLURM_ARRAY_TASK_MAX", first + (count - 1) * step)
    if count < 1 or (last - first) % step or (last - first) // step + 1 != count:
        raise MoebenchError(
            f"--shard slurm: array ids {first}-{last}:{step} do not form {count} evenly spaced tasks; "
            "expected a range such as --array=0-3, 1-4 or 0-6:2, not a list of ids"
        )
    if not first <= task <= last or (task - first) % step:
        raise MoebenchError(f"--shard slurm: SLURM_ARRAY_TASK_ID={task} is not one of the array's ids {first}-{last}:{step}")
    return Shard((task - first) // step + 1, count)


@dataclass
class Merged:
    records: list[dict[str, Any]]
    duplicates: list[str] = field(default_factory=list)  # "suite/name" of records dropped as copies
    missing: list[str] = field(default_factory=list)  # runs of the suite (when given) found in no input


def merge(inputs: Iterable[Iterable[dict[str, Any]]], order: list[str] | None = None) -> Merged:
    """Join several results into one: one record per (suite, run id), ``ok`` preferred, then the first seen.

    ``order`` (run ids, e.g. from the suite) sorts the result and reports runs no input has;
    otherwise each suite's baseline comes first and the rest keep their order of appearance.
    """
    chosen: dict[tuple, dict[str, Any]] = {}
    duplicates = []
    typed: dict[int, Record] = {}  # the typed view of each record, by the identity of its JSON object
    for records in inputs:
        for r in records:
            t = typed[id(r)] = Record.from_dict(r)
            key = (t.suite, t.run_id)
            if key not in chosen:
                chosen[key] = r
                continue
            duplicates.append(f"{t.suite}/{t.name}")
            if not typed[id(chosen[key])].ok and t.ok:
                chosen[key] = r
    records = list(chosen.values())
    missing: list[str] = []
    if order is not None:
        rank = {rid: i for i, rid in enumerate(order)}
        present = {typed[id(r)].run_id for r in records}
        missing = [rid for rid in order if rid not in present]
        records.sort(key=lambda r: rank.get(typed[id(r)].run_id, len(rank)))
    else:
        suites = list(dict.fromkeys(typed[id(r)].suite for r in records))
        records.sort(key=lambda r: (suites.index(typed[id(r)].suite), typed[id(r)].name != "baseline"))
    return Merged(records, duplicates, missing)
