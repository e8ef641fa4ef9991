"""Executors: where a suite's runs execute. The runner plans, records and resumes; an executor
only turns jobs into records.

:class:`SerialExecutor` runs them in this process, one after another (the default).
``moebench.ray_executor.RayExecutor`` submits each as a Ray task. Either way the driver
alone appends to ``results.jsonl``, one record at a time as runs finish. An executor is a
context manager: ``with make_executor("ray") as ex: run_suite(suite, RunOptions(..., executor=ex))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from .errors import MoebenchError

if TYPE_CHECKING:
    from .calibration import Calibration
    from .runner import Job
    from .suite import RunSpec, Suite

EXECUTORS = ("serial", "ray")


class Executor(Protocol):
    def precalibrate(self, suite: "Suite", todo: list["RunSpec"], calibration: "Calibration", log: Callable[[str], None]) -> None:
        """Gather the statistics the runs' first steps read, into ``calibration`` and its disk cache."""

    def measure(self, suite: "Suite", spec: "RunSpec", names: list[str], calibration: "Calibration | None") -> dict[str, Any]:
        """Re-measure only the named metrics of ``spec`` (the baseline, on resume, for relative metrics)."""

    def run(self, jobs: list["Job"], started: Callable[["RunSpec"], None], log: Callable[[str], None]) -> Iterator[tuple["RunSpec", dict]]:
        """Each job's ``(spec, record)``, in the order they finish; closing the iterator cancels the rest."""


class SerialExecutor:
    """Runs here, in this process, one after another."""

    def __enter__(self) -> "SerialExecutor":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def precalibrate(self, suite, todo, calibration, log) -> None:
        from .runner import precalibrate

        precalibrate(suite, todo, calibration, log)

    def measure(self, suite, spec, names, calibration) -> dict[str, Any]:
        from .runner import measure_only

        return measure_only(suite, spec, names, calibration)

    def run(self, jobs, started, log):
        from .runner import run_job

        for job in jobs:
            started(job.spec)
            yield job.spec, run_job(job, log)


def make_executor(name: str, address: str | None = None, retries: int = 1):
    """The executor ``--executor NAME`` names; a one-line error for an unknown one or a missing extra."""
    if name == "serial":
        if address is not None:
            raise MoebenchError("--address: only meaningful with --executor ray")
        return SerialExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=address, retries=retries)
    raise MoebenchError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
